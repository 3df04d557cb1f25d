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

Order of updates. By default an update is applied after the step, with
every other one in ONE all-reduce, so a loss never sees another update of
the same step (simultaneous updates; alternate them across steps with
`when=`, as configs/gan.py does). `step.apply(loss, optimizer, now=True)`
applies it where it is called (its own all-reduce): what the step computes
after it sees the new weights, as in a Keras `train_step` that calls
`optimizer.apply_gradients` for the discriminator before it computes the
generator's loss (configs/dcgan.py). A deferred loss that reads variables
an earlier update of the same step changes is logged once as a warning.

Randomness: each `step.random_normal` / `step.random_uniform` call draws
new numbers, keyed by (seed, global step, call number in the step, global
example), so a resumed run draws the same ones (`tf.random.*` inside a
step does not).
"""

from typing import Callable, NamedTuple

import tensorflow as tf

from trainer.errors import ConfigError
from trainer.step.update import OptimizerUpdate


def always(when) -> bool:
  """Whether a `when` is True whatever the step (a constant, not a
  tensor that depends on it)."""
  value = tf.get_static_value(when)
  return value is not None and bool(value)


class _Applied(NamedTuple):
  """One `step.apply` call, recorded while `train_step` runs."""
  name: str  # the optimizer's name
  variables: list
  target: object  # the scaled loss, or the given (scaled) gradients
  loss: tf.Tensor | None  # the unscaled loss, for the logged total
  when: tf.Tensor  # bool scalar
  # With now=True, what applying it in place gave (identical on every
  # replica): {"skipped": float32, "norm": float32, "when": bool}; else None.
  done: dict | None = None


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
               seed: int, num_replicas: int,
               apply_now: Callable[[_Applied], dict] | None = None,
               metrics=()):
    self.models = models
    self.optimizers = {n: u.optimizer for n, u in updates.items()}
    self._updates, self._aliases = updates, aliases
    self.global_count, self.count, self.step = global_count, count, step
    self.num_replicas = num_replicas
    self._rows, self._row_offset, self._seed = rows, row_offset, seed
    self._apply_now = apply_now  # None: the step is jit-compiled
    self._draws = 0  # random_* calls so far in this step
    self.applied: list[_Applied] = []
    self.means: list[tf.Tensor] = []  # what `mean` returned
    self._metrics = list(metrics)  # the task's build_metrics(), for training
    self.updated_metrics = False  # update_metrics was called

  def update_metrics(self, y_true, y_pred, sample_weight=None) -> None:
    """Updates the task's `build_metrics()` with this replica's examples,
    as Keras' `self.compiled_metrics.update_state(y, y_pred)` does: they
    are read summed over replicas and workers and logged after every host
    loop (`train/<name>`, accumulated over the epoch, as the built-in step
    logs them). y_pred is cast to float32; an empty replica's zero row is
    left out.

    Raises:
      ConfigError: the task has no build_metrics().
    """
    if not self._metrics:
      raise ConfigError("step.update_metrics: the task has no "
                        "build_metrics(); add one that returns the metrics "
                        "to update")
    real = lambda nest: None if nest is None else tf.nest.map_structure(
        lambda t: t[:self.count], nest)
    y_pred = tf.nest.map_structure(lambda t: tf.cast(t, tf.float32),
                                   real(y_pred))
    for metric in self._metrics:
      metric.update_state(real(y_true), y_pred, real(sample_weight))
    self.updated_metrics = True

  def mean(self, per_example_loss, model=None, *,
           per_example: bool = True) -> tf.Tensor:
    """This replica's share of the global mean: sum(per_example_loss) /
    global_count, float32 scalar; summed over replicas it is the mean over
    every example of the step.

    Args:
      per_example_loss: [rows of the batch] values (any float dtype), one
        per example of the batch this replica was given.
      model: also add this model's regularization losses (`model.losses`),
        once over all replicas.
      per_example: False: the values are k per example in any shape (e.g.
        [2 * rows, 1] for a discriminator's real and fake logits, as Keras'
        mean over all of them): their mean over all replicas, sum / (k *
        global_count).
    """
    values = tf.convert_to_tensor(per_example_loss)
    if not per_example:
      mean = self._mean_of_all(values)
    else:
      mean = self._mean_per_example(values)
    if model is not None and model.losses:
      mean += tf.add_n([tf.cast(l, tf.float32) for l in model.losses]
                      ) / self.num_replicas
    self.means.append(mean)
    return mean

  def _mean_of_all(self, values: tf.Tensor) -> tf.Tensor:
    """sum(values) / (k * global_count), k = values per example; an empty
    replica's padding row counts nothing."""
    size = tf.cast(tf.size(values), tf.float32)
    per_example = size / tf.cast(self._rows, tf.float32)
    real = tf.cast(self.count > 0, tf.float32)
    return real * tf.reduce_sum(tf.cast(values, tf.float32)) / (
        per_example * self.global_count)

  def _mean_per_example(self, values: tf.Tensor) -> tf.Tensor:
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
          "(average each part with its own step.mean and add them, or "
          "step.mean(values, per_example=False) for the mean of all of "
          "them)")
    return tf.reduce_sum(tf.cast(values, tf.float32)[:self.count]
                        ) / self.global_count

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
            when=True, now: bool = False) -> None:
    """Updates `variables` with `optimizer` after the step (`now`: here).

    Args:
      loss_or_grads: a float scalar loss (a sum of `step.mean(...)` terms),
        whose gradients are taken; or a list of gradients, one per variable,
        of a loss scaled with `step.scale_loss`.
      optimizer: its name in `step.optimizers`, or the optimizer itself.
      variables: what to update: by default every trainable variable of
        the model the optimizer belongs to; else a subset of them.
      when: bool scalar; False leaves this update out of this step (neither
        applied nor counted as skipped), e.g. `step.step % 2 == 0`.
      now: apply it here, with its own all-reduce, so what the step
        computes next sees the new weights (the order of a Keras
        train_step); not with train.jit_compile.
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
    applied = _Applied(name, variables, target, loss,
                       tf.convert_to_tensor(when, tf.bool))
    if now:
      if self._apply_now is None:
        raise ConfigError(
            f"train_step: step.apply(..., {name!r}, now=True) updates in the "
            "middle of the step, which train.jit_compile cannot compile; "
            "turn off train.jit_compile or apply after the step (now=False)")
      applied = applied._replace(done=self._apply_now(applied))
    self.applied.append(applied)

  def _seed_of_call(self) -> tf.Tensor:
    """The stateless seed of this step's next random_* call: (seed, step)
    for the first, folded with the call number for the others."""
    seed = tf.stack([tf.constant(self._seed, tf.int64),
                     tf.cast(self.step, tf.int64)])
    call, self._draws = self._draws, self._draws + 1
    if call == 0:
      return seed
    return tf.random.experimental.stateless_fold_in(seed, call)

  def _per_example(self, draw: Callable, shape) -> tf.Tensor:
    """This replica's rows of one draw [global examples + 1, *shape]."""
    total = tf.cast(self.global_count, tf.int32) + 1  # + an empty one's row
    full = draw(tf.concat([[total], tf.constant(shape, tf.int32)], 0),
                self._seed_of_call())
    return full[self._row_offset:self._row_offset + self._rows]

  def random_normal(self, shape, mean: float = 0.0, stddev: float = 1.0,
                    dtype=tf.float32) -> tf.Tensor:
    """[rows of the batch, *shape] normal noise (`mean`, `stddev`), one draw
    per example of the global batch: the same numbers for an example
    whatever the number of replicas, new numbers at each call."""
    return self._per_example(
        lambda full, seed: tf.random.stateless_normal(
            full, seed=seed, mean=mean, stddev=stddev, dtype=dtype), shape)

  def random_uniform(self, shape, minval: float = 0.0, maxval: float = 1.0,
                     dtype=tf.float32) -> tf.Tensor:
    """[rows of the batch, *shape] uniform noise in [minval, maxval), one
    draw per example of the global batch, like `random_normal`."""
    return self._per_example(
        lambda full, seed: tf.random.stateless_uniform(
            full, seed=seed, minval=minval, maxval=maxval, dtype=dtype),
        shape)
