"""A task's own train step: `train_step(batch, step)` with several models or
optimizers, still exact across replicas.

`StepContext` is the `step` a task's `train_step(batch, step)` receives, on
each replica, inside the trainer's tf.function loop; `CustomStep` runs it
under the strategy. The rules the built-in step follows (trainer/step.py)
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

from typing import Callable, NamedTuple

import tensorflow as tf

from trainer.errors import ConfigError
from trainer.step import (all_reduce_sum, average_statistics, pad_empty,
                          replica_statistics)
from trainer.update import OptimizerUpdate


# Log names the trainer writes itself (and their `<name>/...` forms); a
# train_step may return `loss`, which replaces the sum of the applied losses.
RESERVED_LOGS = frozenset((
    "loss_sum", "steps", "examples", "examples_per_sec", "step_time",
    "skipped_steps", "learning_rate", "grad_norm", "loss_scale", "sparsity",
    "loop_loss"))


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


def _rows(batch):
  """The rows of a batch: a Python int when static, else a scalar tensor."""
  first = tf.nest.flatten(batch)[0]
  return first.shape[0] if first.shape[0] is not None else tf.shape(first)[0]


def _gradients(tape, loss, variables) -> list:
  grads = tape.gradient(loss, variables)
  return [tf.zeros_like(v) if g is None else tf.convert_to_tensor(g)
          for g, v in zip(grads, variables)]


class CustomStep:
  """Runs a task's `train_step(batch, step)` under a strategy, one update per
  optimizer it applies; the same interface to the Trainer's loop as
  trainer.step.TrainStep.

  Args:
    train_step: the task's `train_step(batch, step: StepContext) -> dict`.
    models: {name: keras.Model} built under `strategy.scope()`.
    optimizers: {model name: optimizer} built under the scope on that
      model's trainable variables.
    aliases: [(object, name)]: more objects that name an optimizer (the
      task's own, before it was wrapped or re-created in the scope).
    strategy, global_clipnorm, jit_compile, after_update: as for TrainStep
      (each optimizer's reduced gradient is clipped to global_clipnorm).
    seed: seeds `step.random_normal`.
  """

  updates_metrics = False  # train logs are what train_step returns

  def __init__(self, *, train_step: Callable, models: dict, optimizers: dict,
               strategy: tf.distribute.Strategy, aliases: list | None = None,
               global_clipnorm: float = 0.0, jit_compile: bool = False,
               seed: int = 0,
               after_update: Callable[[tf.Tensor], None] | None = None):
    self._train_step, self.models, self.strategy = train_step, models, strategy
    self.updates = {name: OptimizerUpdate(opt, models[name].trainable_variables,
                                          strategy, global_clipnorm)
                    for name, opt in optimizers.items()}
    self._aliases = list(aliases or ())  # (object, name), matched by `is`
    for name, update in self.updates.items():
      self._aliases += [(update.optimizer, name), (update.inner, name)]
    self._seed, self._after_update = int(seed), after_update
    with strategy.scope():
      self.global_step = tf.Variable(
          0, dtype=tf.int64, trainable=False, name="global_step",
          aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
    self._statistics = ([s for m in models.values()
                         for s in replica_statistics(m)]
                        if strategy.num_replicas_in_sync > 1 else [])
    self._applied = None  # [(name, variables)] of the traced step
    self._log_names = None  # sorted keys of the dict train_step returns
    self._local = (tf.function(self._local_fn, jit_compile=True)
                   if jit_compile else self._local_fn)

  @property
  def loss_scales(self) -> dict[str, tf.Variable]:
    return {n: u.loss_scale for n, u in self.updates.items() if u.loss_scaled}

  def _counts(self, batch) -> tuple:
    """(global count float32, this replica's count, its first row in the
    global batch); one small all-reduce only for a dynamic (partial) batch."""
    first = tf.nest.flatten(batch)[0]
    n_replicas = self.strategy.num_replicas_in_sync
    ctx = tf.distribute.get_replica_context()
    replica = ctx.replica_id_in_sync_group
    if first.shape[0] is not None:
      n = first.shape[0]
      return (tf.constant(float(n * n_replicas)), tf.constant(n),
              tf.cast(replica, tf.int32) * n)
    n = tf.shape(first)[0]
    counts = ctx.all_reduce(tf.distribute.ReduceOp.SUM,
                            tf.one_hot(replica, n_replicas) * tf.cast(
                                n, tf.float32))
    offset = tf.reduce_sum(counts[:replica])
    return tf.reduce_sum(counts), n, tf.cast(offset, tf.int32)

  def _run_user_step(self, batch, global_count, count, row_offset
                    ) -> tuple[dict, StepContext]:
    padded, _ = pad_empty(batch)
    ctx = StepContext(models=self.models, updates=self.updates,
                      aliases=self._aliases, global_count=global_count,
                      count=count, row_offset=row_offset,
                      rows=_rows(padded),
                      step=tf.convert_to_tensor(self.global_step),
                      seed=self._seed,
                      num_replicas=self.strategy.num_replicas_in_sync)
    logs = self._train_step(padded, ctx)
    if logs is None:
      logs = {}
    if not isinstance(logs, dict):
      raise ConfigError(f"train_step returned {type(logs).__name__}; return a "
                        "dict of scalars to log (or nothing)")
    out = {}
    for key, value in logs.items():
      if str(key) in RESERVED_LOGS or str(key).split("/")[0] in RESERVED_LOGS:
        raise ConfigError(
            f"train_step returned {key!r}, a name the trainer logs itself "
            f"({', '.join(sorted(RESERVED_LOGS))}); rename it")
      value = tf.cast(value, tf.float32)
      if value.shape.rank != 0:
        raise ConfigError(f"train_step returned {key!r} of shape "
                          f"{value.shape}; logged values are scalars such as "
                          "step.mean(per_example)")
      out[str(key)] = value
    if not ctx.applied:
      raise ConfigError("train_step applied no update: call step.apply(loss, "
                        "optimizer) for each optimizer it trains")
    return out, ctx

  def _local_fn(self, batch, global_count, count, row_offset):
    """This replica's gradients (scaled), total loss, `when`s and logs."""
    with tf.GradientTape(persistent=True) as tape:
      logs, ctx = self._run_user_step(batch, global_count, count, row_offset)
    grads = []
    for applied in ctx.applied:
      if applied.loss is None:  # given gradients
        got = [tf.zeros_like(v) if g is None else tf.convert_to_tensor(g)
               for g, v in zip(applied.target, applied.variables)]
      elif tf.get_static_value(applied.when):  # always applied
        got = _gradients(tape, applied.target, applied.variables)
      else:  # no backward pass for an update left out of this step
        got = tf.cond(
            applied.when,
            lambda a=applied, t=tape: _gradients(t, a.target, a.variables),
            lambda a=applied: [tf.zeros_like(v) for v in a.variables])
      grads.append(list(got))
    del tape
    self._applied = [(a.name, a.variables) for a in ctx.applied]
    self._log_names = sorted(logs)
    losses = [tf.where(a.when, a.loss, 0.0) for a in ctx.applied
              if a.loss is not None]
    total = tf.add_n(losses) if losses else tf.constant(0.0)
    whens = [tf.cast(a.when, tf.float32) for a in ctx.applied]
    return grads, total, whens, [logs[k] for k in self._log_names]

  def replica_step(self, batch, want_norm=True) -> dict:
    """Replica context: the user's step, one all-reduce, then per optimizer
    finiteness, unscale and clip (all values identical on replicas)."""
    global_count, count, row_offset = self._counts(batch)
    grads, total, whens, logs = self._local(batch, global_count, count,
                                            row_offset)
    sizes = [len(g) for g in grads]
    flat = [g for group in grads for g in group] + [total] + whens + logs
    n_replicas = self.strategy.num_replicas_in_sync
    if n_replicas > 1:
      flat = average_statistics(self._statistics, tf.cast(count, tf.float32),
                                flat, all_reduce_sum)
    out = {"grads": [], "finite": [], "norm": [], "when": [],
           "count": global_count}
    at = 0
    for (name, _), size in zip(self._applied, sizes):
      finished, finite, norm = self.updates[name].finish(flat[at:at + size],
                                                         want_norm)
      out["grads"].append(finished)
      out["finite"].append(finite)
      out["norm"].append(norm)
      at += size
    out["total"] = flat[at]
    # An update is made only where every replica asked for it.
    out["when"] = [w > n_replicas - 0.5
                   for w in flat[at + 1:at + 1 + len(whens)]]
    out["logs"] = flat[at + 1 + len(whens):]
    return out

  @property
  def log_names(self) -> list[str]:
    """The values train_step returns, but `loss` (known once traced)."""
    return [k for k in self._log_names or () if k != "loss"]

  def _names(self) -> tuple[list, list]:
    return [n for n, _ in self._applied], self._log_names

  def zero_outputs(self, element_spec) -> dict:
    """The structure `__call__` returns, as zeros: traces (does not run) the
    user's step once for its log names and applied optimizers."""
    if self._applied is None:

      def replica(batch):
        counts = self._counts(batch)
        logs, ctx = self._run_user_step(batch, *counts)
        self._applied = [(a.name, a.variables) for a in ctx.applied]
        self._log_names = sorted(logs)
        return counts[0]

      trace = tf.function(lambda b: self.strategy.run(replica, args=(b,)))
      trace.get_concrete_function(element_spec)
    names, logs = self._names()
    zero = tf.constant(0.0)
    sums = {"loss_sum": zero, "count": zero, "skipped": zero}
    sums.update({f"skipped/{n}": zero for n in names})
    sums.update({f"log/{k}": zero for k in logs if k != "loss"})
    last = ({"grad_norm": zero} if len(self.updates) == 1 else
            {f"grad_norm/{n}": zero for n in names})
    return {"sum": sums, "last": last}

  def __call__(self, batch, want_norm=True) -> dict:
    """One step in cross-replica context; see TrainStep.__call__. Adds
    `skipped/<optimizer>` and `log/<name>` (value x count) to the sums,
    and `grad_norm/<optimizer>` (several optimizers) to the last values."""
    out = self.strategy.run(self.replica_step, args=(batch, want_norm))
    first = lambda t: self.strategy.experimental_local_results(t)[0]
    names, log_names = self._names()
    count = first(out["count"])
    sums = {"count": count}
    any_skipped = tf.constant(0.0)
    for i, (name, variables) in enumerate(self._applied):
      update = self.updates[name]
      grads, finite = out["grads"][i], first(out["finite"][i])
      skipped = tf.cond(first(out["when"][i]),
                        lambda u=update, g=grads, f=finite, v=variables:
                        u.apply(g, f, v),
                        lambda: tf.constant(0.0))
      sums[f"skipped/{name}"] = skipped
      any_skipped = tf.maximum(any_skipped, skipped)
    sums["skipped"] = any_skipped
    logs = dict(zip(log_names, [first(v) for v in out["logs"]]))
    sums["loss_sum"] = logs.pop("loss", first(out["total"])) * count
    sums.update({f"log/{k}": v * count for k, v in logs.items()})
    norms = [first(n) for n in out["norm"]]
    last = ({"grad_norm": norms[0]} if len(self.updates) == 1 else
            {f"grad_norm/{n}": v for n, v in zip(names, norms)})
    step = self.global_step.assign_add(1)
    if self._after_update is not None:
      self._after_update(step)
    return {"sum": sums, "last": last}
