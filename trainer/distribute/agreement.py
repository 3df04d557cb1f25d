"""What every worker must agree on, one all-reduce at a time.

In multi-worker runs every worker takes part in every collective at the same
points (DESIGN.md fact 11); these are the host-side agreements the Trainer
needs between host loops: stop/preempt flags, the chief's learning rate, a
barrier, and a check that all workers restored the same step.
"""

import tensorflow as tf

from trainer.errors import DataError


class WorkerAgreement:
  """Host-side agreements over `strategy`'s workers (no-ops on one host)."""

  def __init__(self, strategy: tf.distribute.Strategy, num_workers: int):
    self.strategy = strategy
    self.num_workers = num_workers
    self._all_reduce = tf.function(self._all_reduce_fn)

  def _all_reduce_fn(self, stop, learning_rate, preempt):
    def replica_fn():
      ctx = tf.distribute.get_replica_context()
      first = tf.cast(tf.equal(ctx.replica_id_in_sync_group, 0), tf.float32)
      # A sum of zeros and one value is exact: replica 0 (the chief's) wins.
      return ctx.all_reduce("sum", tf.stack(
          [stop, first * learning_rate, preempt]))
    out = self.strategy.run(replica_fn)
    return self.strategy.experimental_local_results(out)[0]

  def decide(self, stop: bool, learning_rate: float,
             preempt: bool) -> tuple[bool, float, bool]:
    """(stop on any worker, the chief's learning rate, preempt on any)."""
    if self.num_workers == 1:
      return stop, learning_rate, preempt
    out = self._all_reduce(tf.constant(1.0 if stop else 0.0),
                           tf.constant(learning_rate, tf.float32),
                           tf.constant(1.0 if preempt else 0.0)).numpy()
    return bool(out[0] > 0), float(out[1]), bool(out[2] > 0)

  def total(self, count: int) -> int:
    """The sum of every worker's `count` (exact below 2**24)."""
    if self.num_workers == 1:
      return count
    local = self.strategy.num_replicas_in_sync // self.num_workers
    zero = tf.constant(0.0)
    # every local replica adds the worker's count: divide them out
    summed = self._all_reduce(tf.constant(float(count)), zero, zero)
    return int(round(float(summed.numpy()[0]) / local))

  def barrier(self) -> None:
    """Returns when every worker has called it."""
    if self.num_workers > 1:
      zero = tf.constant(0.0)
      self._all_reduce(zero, zero, zero)

  def check_same_step(self, step: int) -> None:
    """Raises DataError on every worker if they hold different steps.

    Two collectives, taken by every worker: the chief's step, exact (a sum
    of zeros and one value), then whether any worker differs from it.
    """
    if self.num_workers == 1:
      return
    zero = tf.constant(0.0)
    mine = float(tf.constant(float(step), tf.float32).numpy())
    chief_step = self._all_reduce(zero, tf.constant(mine), zero).numpy()[1]
    differs = tf.constant(0.0 if mine == chief_step else 1.0)
    if self._all_reduce(differs, zero, zero).numpy()[0] > 0:
      raise DataError(
          f"the workers resumed from different steps (this one {step}, the "
          f"chief {int(chief_step)}): every worker restores from "
          "WORKDIR/checkpoints, so the workdir must be on a filesystem all "
          "workers share")
