"""What the built-in step (builtin.py) and a task's own (custom.py) share:
the int64 global step, the hook after every step, the None -> zeros
gradient fix, and the one interface the Trainer's host loop uses.
"""

from typing import Callable, TypedDict

import tensorflow as tf


class StepOutput(TypedDict, total=False):
  """What one step returns in cross-replica context: scalar float32 tensors.

  sum: added up over the host loop's steps (`loss_sum`, `count`, `skipped`,
    and a task's own step's `log/<name>`, `skipped/<name>`).
  last: kept from the loop's last step (`grad_norm`, `grad_norm/<name>`).
  last_if: {key of `last`: bool}: keep that value from the last step where
    it is True instead (an update made only on some steps).
  """
  sum: dict
  last: dict
  last_if: dict


def dense_gradients(grads: list, variables: list) -> list:
  """Gradients with None (a variable the loss does not use) as zeros."""
  return [tf.zeros_like(v) if g is None else tf.convert_to_tensor(g)
          for g, v in zip(grads, variables)]


class Step:
  """The host loop's view of a train step.

  Subclasses set `updates_metrics` (the Trainer's train metrics see the
  step's predictions) and implement `__call__(batch, want_norm) ->
  StepOutput`, `zero_outputs(element_spec) -> StepOutput` (the same
  structure as zeros: the loop's start), `loss_scales` ({name: variable})
  and `check_compiles(batch_spec)`.

  Args:
    strategy: the tf.distribute strategy.
    after_update: called in cross-replica context with the new int64 global
      step after every step, applied or skipped (e.g. `Pruner.after_update`).
  """

  updates_metrics = True
  log_names: tuple | list = ()  # more values the step logs (sums per example)

  def __init__(self, strategy: tf.distribute.Strategy,
               after_update: Callable[[tf.Tensor], None] | None = None):
    self.strategy = strategy
    self._after_update = after_update
    with strategy.scope():
      self.global_step = tf.Variable(
          0, dtype=tf.int64, trainable=False, name="global_step",
          aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)

  def _advance(self) -> tf.Tensor:
    """Counts one step, applied or skipped (DESIGN.md fact 7), and runs the
    after-update hook; returns the new global step."""
    step = self.global_step.assign_add(1)
    if self._after_update is not None:
      self._after_update(step)
    return step
