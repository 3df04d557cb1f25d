"""A task's own train step: `train_step(batch, step)` with several models or
optimizers, still exact across replicas.

`StepContext` is the `step` a task's `train_step(batch, step)` receives, on
each replica, inside the trainer's tf.function loop; `CustomStep`
(trainer/step/custom.py) runs it
under the strategy. The rules the built-in step follows (trainer/step/builtin.py)
hold by construction:

  - `step.mean(per_example)` averages over the *global* example count of the
    step (a partial last batch included; DESIGN.md facts 5 and 6);
  - `step.apply(loss_or_grads, optimizer)` only records the update: after
    `train_step` returns, the gradients of every applied loss are taken, ONE
    all-reduce carries all of them (and the logged values, and the moving
    statistics of unsynchronized batch norm), then each optimizer checks
    finiteness on its reduced gradients, unscales by its own loss scale,
    clips, and applies -- or skips and halves its scale, on every replica
    (facts 2, 3, 7);
  - the dict of scalars `train_step` returns is summed over replicas and
    workers (each value a `step.mean(...)`, as the loss is) and logged like
    the built-in `loss`.

An update is applied after the step, so a loss cannot see another update of
the same step: alternate updates across steps with `when=` (the GAN in
configs/gan.py updates its discriminator on even steps).
"""

from typing import NamedTuple

import tensorflow as tf

from trainer.errors import ConfigError
from trainer.step.update import OptimizerUpdate


class _Applied(NamedTuple):
  """One `step.apply` call, recorded while `train_step` runs."""
  name: str  # the optimizer's name
  variables: list
  target: object  # the scaled loss, or the given (scaled) gradients
  loss: tf.Tensor | None  # the unscaled loss, for the logged total
  when: tf.Tensor  # bool scalar


class StepContext:
  """What `train_step(batch, step)` gets on each replica.

  Attributes:
    models: {name: keras.Model}, as build_model() returned them.
    optimizers: {name: optimizer} (LossScaleOptimizer under mixed_float16),
      one per model it trains.
    global_count: float32 scalar, examples in this step over all replicas
      and workers (a partial last batch has fewer).
    count: int32 scalar, this replica's real examples (the batch it is given
      has max(count, 1) rows: an empty replica gets one zero row, which
      `mean` leaves out).
    step: int64 scalar, the global step this update makes (0, 1, ...).
    num_replicas: replicas in sync (all workers).
  """

  def __init__(self, *, models: dict, updates: dict[str, OptimizerUpdate],
               aliases: list, global_count, count, rows, row_offset, step,
               seed: int, num_replicas: int):
    self.models = models
    self.optimizers = {n: u.optimizer for n, u in updates.items()}
    self._updates, self._aliases = updates, aliases
    self.global_count, self.count, self.step = global_count, count, step
    self.num_replicas = num_replicas
    self._rows, self._row_offset, self._seed = rows, row_offset, seed
    self.applied: list[_Applied] = []

  def mean(self, per_example_loss, model=None) -> tf.Tensor:
    """This replica's share of the global mean: sum(per_example_loss) /
    global_count, float32 scalar; summed over replicas it is the mean over
    every example of the step.

    Args:
      per_example_loss: [rows of the batch] values (any float dtype), one
        per example of the batch this replica was given.
      model: also add this model's regularization losses (`model.losses`),
        once over all replicas.
    """
    values = tf.convert_to_tensor(per_example_loss)
    if values.shape.rank != 1:
      raise ConfigError(
          "train_step: step.mean() takes one value per example (shape "
          f"[batch]), got shape {values.shape}; for a Keras loss use "
          "reduction='none'")
    rows = self._rows
    if isinstance(rows, int) and values.shape[0] not in (None, rows):
      raise ConfigError(
          f"train_step: step.mean() got {values.shape[0]} values for a batch "
          f"of {rows} examples; it takes one value per example of the batch "
          "(average each part with its own step.mean and add them)")
    mean = tf.reduce_sum(tf.cast(values, tf.float32)[:self.count]
                        ) / self.global_count
    if model is not None and model.losses:
      mean += tf.add_n([tf.cast(l, tf.float32) for l in model.losses]
                      ) / self.num_replicas
    return mean

  def _name_of(self, optimizer) -> str:
    if isinstance(optimizer, str):
      if optimizer not in self._updates:
        raise ConfigError(
            f"train_step: step.apply(..., {optimizer!r}): no optimizer of "
            f"that name; the task's optimizers are {sorted(self._updates)} "
            "(build_optimizer() returns one per model it trains)")
      return optimizer
    name = next((n for o, n in self._aliases if o is optimizer), None)
    if name is None:
      raise ConfigError(
          f"train_step: step.apply() got {type(optimizer).__name__}, which "
          "is not one of the task's optimizers; pass step.optimizers[name] "
          f"or its name, one of {sorted(self._updates)}")
    return name

  def scale_loss(self, loss, optimizer) -> tf.Tensor:
    """`loss` times `optimizer`'s loss scale (the loss itself without one),
    for a step that takes its own gradients and passes them to `apply`."""
    return self._updates[self._name_of(optimizer)].scale(
        tf.cast(loss, tf.float32))

  def apply(self, loss_or_grads, optimizer, variables=None, *,
            when=True) -> None:
    """Updates `variables` with `optimizer` after the step.

    Args:
      loss_or_grads: a float scalar loss (a sum of `step.mean(...)` terms),
        whose gradients are taken; or a list of gradients, one per variable,
        of a loss scaled with `step.scale_loss`.
      optimizer: its name in `step.optimizers`, or the optimizer itself.
      variables: what to update: by default every trainable variable of
        the model the optimizer belongs to; else a subset of them.
      when: bool scalar; False leaves this update out of this step (neither
        applied nor counted as skipped), e.g. `step.step % 2 == 0`.
    """
    name = self._name_of(optimizer)
    update = self._updates[name]
    if any(a.name == name for a in self.applied):
      raise ConfigError(f"train_step: optimizer {name!r} is applied twice in "
                        "one step; add the losses and apply once")
    if variables is None:
      variables = update.variables
    else:
      variables = list(variables)
      known = {id(v) for v in update.variables}
      foreign = [v for v in variables if id(v) not in known]
      if foreign:
        raise ConfigError(
            f"train_step: step.apply(..., {name!r}) got variable "
            f"{foreign[0].path!r}, which is not a trainable variable of model "
            f"{name!r}")
    if isinstance(loss_or_grads, (list, tuple)):
      if len(loss_or_grads) != len(variables):
        raise ConfigError(
            f"train_step: step.apply(grads, {name!r}) got {len(loss_or_grads)}"
            f" gradients for {len(variables)} variables")
      target, loss = list(loss_or_grads), None
    else:
      loss = tf.cast(loss_or_grads, tf.float32)
      if loss.shape.rank != 0:
        raise ConfigError(
            f"train_step: step.apply(loss, {name!r}) got a loss of shape "
            f"{loss.shape}; pass a scalar such as step.mean(per_example)")
      target = update.scale(loss)
    self.applied.append(_Applied(name, variables, target, loss,
                                 tf.convert_to_tensor(when, tf.bool)))

  def random_normal(self, shape, dtype=tf.float32) -> tf.Tensor:
    """[rows of the batch, *shape] standard normal noise, one draw per
    example of the global batch: the same numbers for an example whatever
    the number of replicas (stateless, seeded by the trainer's seed and the
    global step)."""
    rows = self._rows  # max(count, 1)
    total = tf.cast(self.global_count, tf.int32) + 1  # + an empty one's row
    noise = tf.random.stateless_normal(
        tf.concat([[total], tf.constant(shape, tf.int32)], 0),
        seed=tf.stack([tf.constant(self._seed, tf.int64), self.step]),
        dtype=dtype)
    return noise[self._row_offset:self._row_offset + rows]
