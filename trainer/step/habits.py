"""Warnings for a task's own `train_step` written the single-device way,
found once, while the step is traced (nothing runs for them):

  - a scalar it logs or applies that was reduced with `tf.reduce_mean` or
    `tf.reduce_sum` (a Keras loss's own reduction) outside `step.mean`:
    every replica's scalar is summed over replicas, so on N replicas it is
    N times the mean (exactly 2x on 2, tests/test_step_keras_train_step.py);
  - a loss applied after the step that reads variables an earlier update
    of the same step changes: it sees them before that update, where a
    Keras train_step that applies the first update before computing the
    second loss sees them after (`step.apply(..., now=True)`).
"""

import tensorflow as tf
from absl import logging

from trainer.step.context import always

# Ops that reduce a tensor to one value (tf.reduce_mean, tf.reduce_sum and
# the Keras ops and loss reductions built on them).
REDUCTIONS = {"Mean": "tf.reduce_mean", "Sum": "tf.reduce_sum"}
MAX_OPS = 20_000  # ops looked at per value (a trace of a big model)


def scalar_reduction(value, means: list) -> str | None:
  """The reduction (`tf.reduce_mean`, ...) that made scalar `value` from
  its inputs outside any of `means` (what `step.mean` returned), or None.
  Only traced (symbolic) values are looked at."""
  if not tf.is_symbolic_tensor(value):
    return None
  stop = {m.ref() for m in means if tf.is_symbolic_tensor(m)}
  if value.ref() in stop:
    return None
  seen, todo = set(), [value.op]
  while todo and len(seen) < MAX_OPS:
    op = todo.pop()
    if op.name in seen:
      continue
    seen.add(op.name)
    if (op.type in REDUCTIONS and op.outputs and
        op.outputs[0].shape.rank == 0):
      return REDUCTIONS[op.type]
    todo.extend(t.op for t in op.inputs if t.ref() not in stop)
  return None


class StepHabits:
  """Looks at each trace of a task's step; warns once per finding.

  Args:
    num_replicas: replicas in sync (named in the warning).
  """

  def __init__(self, num_replicas: int):
    self.num_replicas = num_replicas
    self.warned: set[str] = set()

  def _warn(self, key: str, message: str) -> None:
    if key not in self.warned:
      self.warned.add(key)
      logging.warning("train_step: %s", message)

  def check(self, ctx, logs: dict) -> None:
    """Scalars of `logs` and of `ctx.applied` losses not made by step.mean."""
    values = [(f"the logged {name!r}", v) for name, v in logs.items()]
    values += [(f"the loss applied with {a.name!r}", a.loss)
               for a in ctx.applied if a.loss is not None]
    for what, value in values:
      how = scalar_reduction(value, ctx.means)
      if how:
        n = self.num_replicas
        self._warn(f"reduce {what}", (
            f"{what} is reduced with {how} outside step.mean: each "
            f"replica's value is summed over the replicas ({n} here: {n}x "
            "the mean), and a partial batch is mis-weighted; average "
            "per-example values with step.mean(values) (a Keras loss with "
            "reduction='none'), or all of them with step.mean(values, "
            "per_example=False)"))

  def check_order(self, ctx, tape: tf.GradientTape) -> None:
    """A deferred loss that depends on variables an earlier deferred update
    of the same step changes (both always made)."""
    made = [a for a in ctx.applied
            if a.done is None and a.loss is not None and always(a.when)]
    for i, later in enumerate(made):
      for earlier in made[:i]:
        grads = tape.gradient(later.target, earlier.variables)
        if any(g is not None for g in grads):
          self._warn(f"order {earlier.name} {later.name}", (
              f"the loss applied with {later.name!r} reads variables that "
              f"the {earlier.name!r} update of the same step changes; both "
              "are applied after the step, so it sees them before that "
              f"update. For Keras' order ({earlier.name!r} updated, then "
              f"{later.name!r}'s loss computed against it) apply the first "
              "with step.apply(..., now=True) and compute the second loss "
              "after it"))
