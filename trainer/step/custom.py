"""Runs a task's own `train_step(batch, step)` under a strategy
(trainer/step/context.py has the `step` it gets): the same interface to the
Trainer's loop as trainer/step/builtin.py's TrainStep, one update per optimizer.
"""

from typing import Callable

import tensorflow as tf
from absl import logging

from trainer import compat
from trainer.errors import ConfigError, untraced_message
from trainer.step.base import Step, StepOutput, dense_gradients
from trainer.step.context import StepContext, always
from trainer.step.habits import StepHabits
from trainer.step.replica import (all_reduce_sum, average_statistics,
                                  lower_to_hlo, pad_empty, replica_statistics)
from trainer.step.update import OptimizerUpdate

# Log names the trainer writes itself (and their `<name>/...` forms); a
# train_step may return `loss`, which replaces the sum of the applied losses.
RESERVED_LOGS = frozenset((
    "loss_sum", "steps", "examples", "examples_per_sec", "step_time",
    "skipped_steps", "learning_rate", "grad_norm", "loss_scale", "sparsity",
    "loop_loss", "input_wait"))



def _rows(batch):
  """The rows of a batch: a Python int when static, else a scalar tensor."""
  first = tf.nest.flatten(batch)[0]
  return first.shape[0] if first.shape[0] is not None else tf.shape(first)[0]


def _gradients(tape, loss, variables) -> list:
  return dense_gradients(tape.gradient(loss, variables), variables)


class CustomStep(Step):
  """Runs a task's `train_step(batch, step)` under a strategy, one update per
  optimizer it applies; the same interface to the Trainer's loop as
  trainer.step.builtin.TrainStep.

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
    metrics: the task's train metrics, for `step.update_metrics` (created
      under the scope).
  """

  def __init__(self, *, train_step: Callable, models: dict, optimizers: dict,
               strategy: tf.distribute.Strategy, aliases: list | None = None,
               global_clipnorm: float = 0.0, jit_compile: bool = False,
               seed: int = 0,
               after_update: Callable[[tf.Tensor], None] | None = None,
               metrics=()):
    super().__init__(strategy, after_update)
    # Train logs are what train_step returns, and the metrics it updates
    # with step.update_metrics (known once traced).
    self.metrics = list(metrics)
    self.updates_metrics = False
    self._train_step = compat.converted(train_step)
    self.models = models
    self.updates = {name: OptimizerUpdate(opt, models[name].trainable_variables,
                                          strategy, global_clipnorm)
                    for name, opt in optimizers.items()}
    self._aliases = list(aliases or ())  # (object, name), matched by `is`
    for name, update in self.updates.items():
      self._aliases += [(update.optimizer, name), (update.inner, name)]
    self._seed = int(seed)
    main = next(iter(models))
    if main not in optimizers:
      logging.warning(
          "build_model(): the first model, %r, is the main one (evaluated, "
          "exported, pruned), but no optimizer trains it (build_optimizer() "
          "trains %s); put the model you train first in the dict", main,
          ", ".join(map(repr, optimizers)))
    self._statistics = ([s for m in models.values()
                         for s in replica_statistics(m)]
                        if strategy.num_replicas_in_sync > 1 else [])
    self._applied = None  # [(name, variables)] of the traced step
    self._in_place = None  # [bool]: its update is made with now=True
    self._habits = StepHabits(strategy.num_replicas_in_sync)
    self._jit = bool(jit_compile)
    self._conditional = None  # [bool]: its update has a `when` not always True
    self._log_names = None  # sorted keys of the dict train_step returns
    self._local = (tf.function(self._local_fn, jit_compile=True)
                   if jit_compile else self._local_fn)

  @property
  def loss_scales(self) -> dict[str, tf.Variable]:
    return {n: u.loss_scale for n, u in self.updates.items() if u.loss_scaled}

  def check_compiles(self, batch_spec) -> None:
    """Lowers the jit-compiled user step to HLO on zeros, in a replica
    context (the step may ask for its replica), running nothing.

    Args:
      batch_spec: a nest of tf.TensorSpec, one replica's training batch.

    Raises:
      ConfigError: XLA refuses an op (trainer.step.replica.lower_to_hlo).
    """
    if not isinstance(self._local, tf.types.experimental.PolymorphicFunction):
      return  # not jit-compiled
    batch = tf.nest.map_structure(lambda s: tf.zeros(s.shape, s.dtype),
                                  batch_spec)
    rows = tf.nest.flatten(batch)[0].shape[0]
    n = self.strategy.num_replicas_in_sync
    lower = lambda: self._local.experimental_get_compiler_ir(
        batch, tf.constant(float(rows * n)), tf.constant(rows),
        tf.constant(0))(stage="hlo")
    self.strategy.run(lambda: lower_to_hlo(lower))

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

  def _run_user_step(self, batch, global_count, count, row_offset,
                     tape: tf.GradientTape | None = None
                    ) -> tuple[dict, StepContext]:
    padded, _ = pad_empty(batch)
    apply_now = None
    if not self._jit:
      apply_now = lambda applied: self._apply_now(applied, tape, count)
    ctx = StepContext(models=self.models, updates=self.updates,
                      aliases=self._aliases, global_count=global_count,
                      count=count, row_offset=row_offset,
                      rows=_rows(padded),
                      step=tf.convert_to_tensor(self.global_step),
                      seed=self._seed,
                      num_replicas=self.strategy.num_replicas_in_sync,
                      apply_now=apply_now, metrics=self.metrics)
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
    self._habits.check(ctx, out)
    return out, ctx

  def _reduced_gradients(self, tape, applied, count) -> tuple:
    """Replica context: `applied`'s gradients all-reduced (with whether
    every replica makes it), unscaled and clipped: (grads, finite, norm,
    when)."""
    if tape is None:  # traced only for its names: nothing is run
      grads = [tf.zeros_like(v) for v in applied.variables]
    else:
      with tape.stop_recording():
        grads = self._local_gradients(tape, applied)
    n_replicas = self.strategy.num_replicas_in_sync
    flat = grads + [tf.cast(applied.when, tf.float32)]
    if n_replicas > 1:
      flat = average_statistics(self._statistics, tf.cast(count, tf.float32),
                                flat, all_reduce_sum)
    when = flat[-1] > n_replicas - 0.5
    finished, finite, norm = self.updates[applied.name].finish(
        flat[:-1], tf.constant(True))
    return finished, finite, norm, when

  def _apply_now(self, applied, tape, count) -> dict:
    """Replica context: `applied` made here (`step.apply(..., now=True)`):
    its own all-reduce, then the update in cross-replica context. Returns
    {"skipped", "norm", "when"}, identical on every replica."""
    grads, finite, norm, when = self._reduced_gradients(tape, applied, count)
    update = self.updates[applied.name]

    def apply(_):  # cross-replica context; replica 0's (identical) values
      return tf.cond(when, lambda: update.apply(grads, finite,
                                                applied.variables),
                     lambda: tf.constant(0.0))

    skipped = tf.distribute.get_replica_context().merge_call(apply)
    return {"skipped": skipped, "norm": norm, "when": when}

  @staticmethod
  def _local_gradients(tape, applied) -> list:
    """This replica's gradients of one `step.apply` (zeros when its `when`
    is False: no backward pass then)."""
    if applied.loss is None:  # given gradients
      return dense_gradients(applied.target, applied.variables)
    if always(applied.when):
      return _gradients(tape, applied.target, applied.variables)
    return tf.cond(
        applied.when,
        lambda: _gradients(tape, applied.target, applied.variables),
        lambda: [tf.zeros_like(v) for v in applied.variables])

  def _local_fn(self, batch, global_count, count, row_offset):
    """This replica's gradients (scaled; none for an update made in place),
    total loss, `when`s, logs, and what the in-place updates gave."""
    with tf.GradientTape(persistent=True) as tape:
      logs, ctx = self._run_user_step(batch, global_count, count, row_offset,
                                      tape)
    self._habits.check_order(ctx, tape)
    grads = [[] if a.done else list(self._local_gradients(tape, a))
             for a in ctx.applied]
    del tape
    self._record(ctx, logs)
    losses = [tf.where(a.when, a.loss, 0.0) for a in ctx.applied
              if a.loss is not None]
    total = tf.add_n(losses) if losses else tf.constant(0.0)
    whens = [tf.cast(a.when, tf.float32) for a in ctx.applied]
    done = [a.done for a in ctx.applied if a.done]
    return grads, total, whens, [logs[k] for k in self._log_names], done

  def _record(self, ctx: StepContext, logs: dict) -> None:
    """Keeps what tracing the user's step told: its updates (and which are
    made in place), their `when`s and its log names."""
    self._applied = [(a.name, a.variables) for a in ctx.applied]
    self._in_place = [a.done is not None for a in ctx.applied]
    self._conditional = [not always(a.when) for a in ctx.applied]
    self._log_names = sorted(logs)
    self.updates_metrics = ctx.updated_metrics

  def replica_step(self, batch, want_norm=True) -> dict:
    """Replica context: the user's step, one all-reduce, then per optimizer
    finiteness, unscale and clip (all values identical on replicas). The
    norm of an update with a `when` is taken whenever it is made (the
    loop logs its last one), of the others only if `want_norm`."""
    global_count, count, row_offset = self._counts(batch)
    grads, total, whens, logs, done = self._local(batch, global_count, count,
                                                  row_offset)
    sizes = [len(g) for g in grads]
    flat = [g for group in grads for g in group] + [total] + whens + logs
    n_replicas = self.strategy.num_replicas_in_sync
    if n_replicas > 1:
      flat = average_statistics(self._statistics, tf.cast(count, tf.float32),
                                flat, all_reduce_sum)
    out = {"grads": [], "finite": [], "norm": [], "count": global_count}
    at = sum(sizes)
    out["total"] = flat[at]
    # An update is made only where every replica asked for it.
    out["when"] = [w > n_replicas - 0.5
                   for w in flat[at + 1:at + 1 + len(whens)]]
    out["logs"] = flat[at + 1 + len(whens):]
    out["skipped"] = []
    at, done = 0, iter(done)
    for i, ((name, _), size, conditional) in enumerate(zip(
        self._applied, sizes, self._conditional)):
      if self._in_place[i]:  # made in place: its results
        made = next(done)
        out["grads"].append([])
        out["finite"].append(tf.constant(True))
        out["norm"].append(made["norm"])
        out["when"][i] = made["when"]
        out["skipped"].append(made["skipped"])
        continue
      finished, finite, norm = self.updates[name].finish(
          flat[at:at + size], out["when"][i] if conditional else want_norm)
      out["grads"].append(finished)
      out["finite"].append(finite)
      out["norm"].append(norm)
      out["skipped"].append(tf.constant(0.0))
      at += size
    return out

  @property
  def log_names(self) -> list[str]:
    """The values train_step returns, but `loss` (known once traced)."""
    return [k for k in self._log_names or () if k != "loss"]

  def _names(self) -> tuple[list, list]:
    return [n for n, _ in self._applied], self._log_names

  def zero_outputs(self, element_spec) -> StepOutput:
    """The structure `__call__` returns, as zeros: traces (does not run) the
    user's step once for its log names and applied optimizers."""
    if self._applied is None:

      def replica(batch):
        counts = self._counts(batch)
        logs, ctx = self._run_user_step(batch, *counts)
        self._record(ctx, logs)
        return counts[0]

      trace = tf.function(lambda b: self.strategy.run(replica, args=(b,)))
      try:
        trace.get_concrete_function(element_spec)
      except ConfigError as e:  # a misused `step`: its line, not autograph's
        raise ConfigError(untraced_message(e)) from None
    names, logs = self._names()
    zero = tf.constant(0.0)
    sums = {"loss_sum": zero, "count": zero, "skipped": zero}
    sums.update({f"skipped/{n}": zero for n in names})
    sums.update({f"log/{k}": zero for k in logs if k != "loss"})
    # -1: no update made yet in the host loop (its key is left out).
    norms = [tf.constant(-1.0) if c else zero for c in self._conditional]
    return {"sum": sums, "last": self._norm_logs(norms)}

  def _norm_logs(self, values: list) -> dict:
    """{grad_norm: value} for one optimizer, else {grad_norm/<name>: ...}."""
    names, _ = self._names()
    if len(self.updates) == 1:
      return {"grad_norm": values[0]}
    return {f"grad_norm/{n}": v for n, v in zip(names, values)}

  def __call__(self, batch, want_norm=True) -> StepOutput:
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
      if self._in_place[i]:
        skipped = first(out["skipped"][i])
      else:
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
    last = self._norm_logs([first(n) for n in out["norm"]])
    made = self._norm_logs([first(w) for w in out["when"]])
    self._advance()
    return {"sum": sums, "last": last,
            "last_if": {k: made[k] for k, c in zip(last, self._conditional)
                        if c}}
