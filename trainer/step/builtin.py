"""The train step: one tf.GradientTape step per replica, correct across replicas.

Per step, in order:
  1. each replica computes per-example losses (float32, shape [local_batch])
     and divides their sum by the *global* example count of the step (a
     static number for full batches, an all-reduced count for a partial one;
     DESIGN.md facts 5 and 6), scales by the loss scale under mixed_float16
     and takes gradients;
  2. gradients, the loss sum and the example count are all-reduced once;
  3. every replica (now holding identical values) unscales, checks
     finiteness of the *reduced* gradient (so one replica's inf skips the
     step everywhere, fact 2) and clips to `global_clipnorm` (fact 3);
  4. in cross-replica context the update is applied, or skipped and the
     loss scale halved; the int64 global step advances either way (fact 7).

With `accum_steps=k` (gradient accumulation, DESIGN.md fact 4), step 1 runs
over k micro-batches of each replica's batch in turn, summing their
gradients; everything after it is unchanged, so a step is one update on the
whole global batch, with 1/k of the activation memory.
"""

from typing import Callable, NamedTuple

import tensorflow as tf

from trainer import compat
from trainer.errors import ConfigError
from trainer.step.base import Step, StepOutput, dense_gradients
from trainer.step.loss import ComputeLoss, unpack_batch
from trainer.step.replica import (all_reduce_sum, average_statistics,
                                  call_nonempty, has_synchronized_bn,
                                  lower_to_hlo, replica_statistics)
from trainer.step.update import OptimizerUpdate


class ReplicaOutput(NamedTuple):
  """What one replica returns from a step; all values identical on replicas."""
  grads: list  # unscaled, clipped, all-reduced; float32, like the variables
  finite: tf.Tensor  # bool scalar: every reduced gradient is finite
  grad_norm: tf.Tensor  # global norm of the reduced, unscaled gradient
  loss_sum: tf.Tensor  # sum of per-example losses over the global batch
  count: tf.Tensor  # examples in the global batch (float32)


class TrainStep(Step):
  """Builds the per-step functions for one model, optimizer and strategy.

  Args:
    model: a Keras model built under `strategy.scope()`.
    optimizer: a Keras optimizer (wrapped in LossScaleOptimizer under
      mixed_float16) built under `strategy.scope()`.
    compute_loss: (model, batch, training) -> (per_example_loss, y_pred).
    strategy: the tf.distribute strategy.
    metrics: Keras metrics created under the scope, updated with (y, y_pred).
    global_clipnorm: clip the reduced gradient to this global norm (0 = off).
    jit_compile: XLA-compile the per-replica forward and backward pass.
    accum_steps: micro-batches per replica batch (gradient accumulation);
      must divide the per-replica batch size.
    after_update: called in cross-replica context with the new int64 global
      step after every step, applied or skipped (e.g. `Pruner.after_update`).
  """

  def __init__(self, *, model, optimizer, compute_loss: ComputeLoss,
               strategy: tf.distribute.Strategy, metrics=(),
               global_clipnorm: float = 0.0, jit_compile: bool = False,
               accum_steps: int = 1,
               after_update: Callable[[tf.Tensor], None] | None = None):
    if accum_steps < 1:
      raise ValueError(f"accum_steps must be >= 1, got {accum_steps}")
    super().__init__(strategy, after_update)
    self.accum_steps = int(accum_steps)
    self.model = model
    self.optimizer = optimizer
    self.metrics = list(metrics)
    self._compute_loss = compute_loss
    self.update = OptimizerUpdate(optimizer, model.trainable_variables,
                                  strategy, global_clipnorm)
    self.loss_scaled = self.update.loss_scaled
    if ((jit_compile or self.accum_steps > 1) and
        strategy.num_replicas_in_sync > 1 and has_synchronized_bn(model)):
      raise ConfigError(
          "synchronized batch norm cannot run inside "
          f"{'jit_compile' if jit_compile else 'gradient accumulation'} "
          "with several replicas (TensorFlow refuses its cross-replica "
          "all-reduce in a nested graph: 'merge_call called while defining "
          "a new graph'); turn off model.sync_batch_norm, or "
          f"{'train.jit_compile' if jit_compile else 'train.grad_accum_steps'}")
    self._statistics = (replica_statistics(model)
                        if strategy.num_replicas_in_sync > 1 else [])
    self._local_grads = (tf.function(self._local_grads_fn, jit_compile=True)
                         if jit_compile else self._local_grads_fn)

  def check_compiles(self, batch_spec) -> None:
    """Lowers the XLA-compiled part of the step to HLO, running nothing.

    Args:
      batch_spec: a nest of tf.TensorSpec, one replica's training batch.

    Raises:
      ConfigError: XLA refuses an op of the model, e.g. under
        `enable_op_determinism()` MaxPool's gradient ("GPU MaxPool gradient
        ops do not yet have a deterministic XLA implementation", even on a
        CPU; DESIGN.md fact 18).
    """
    if not isinstance(self._local_grads, tf.types.experimental.PolymorphicFunction):
      return  # not jit-compiled
    rows = lambda s: [s.shape[0] // self.accum_steps, *s.shape[1:]]
    batch = tf.nest.map_structure(lambda s: tf.zeros(rows(s), s.dtype),
                                  batch_spec)
    with self.strategy.scope():
      lower_to_hlo(lambda: self._local_grads.experimental_get_compiler_ir(
          batch, tf.constant(1.0))(stage="hlo"))


  @property
  def loss_scales(self) -> dict[str, tf.Variable]:
    """The loss scale by optimizer name ({} without loss scaling)."""
    return {"model": self.update.loss_scale} if self.loss_scaled else {}

  def _global_count(self, batch) -> tf.Tensor:
    """Examples in this step over all replicas (float32 scalar).

    Static for full batches (drop_remainder datasets); an all-reduced count
    when the batch size is dynamic, so a partial last batch is averaged over
    the examples it really has.
    """
    first = tf.nest.flatten(batch)[0]
    if first.shape[0] is not None:
      return tf.constant(
          float(first.shape[0] * self.strategy.num_replicas_in_sync))
    ctx = tf.distribute.get_replica_context()
    return ctx.all_reduce(tf.distribute.ReduceOp.SUM,
                          tf.cast(tf.shape(first)[0], tf.float32))

  def _local_grads_fn(self, batch, global_count):
    variables = self.model.trainable_variables
    with tf.GradientTape() as tape:
      per_example, y_pred = call_nonempty(self._compute_loss, self.model,
                                          batch, True)
      loss_sum = tf.reduce_sum(per_example)
      loss = loss_sum / global_count
      if self.model.losses:  # regularizers: identical on every replica
        loss += tf.add_n([tf.cast(l, tf.float32) for l in self.model.losses]
                        ) / (self.strategy.num_replicas_in_sync *
                             self.accum_steps)
      if self.loss_scaled:
        loss = self.optimizer.scale_loss(loss)
    grads = dense_gradients(tape.gradient(loss, variables), variables)
    return grads, loss_sum, tf.cast(tf.size(per_example), tf.float32), y_pred

  def _update_metrics(self, batch, y_pred) -> None:
    _, y, sample_weight = unpack_batch(batch)
    for metric in self.metrics:
      metric.update_state(y, tf.nest.map_structure(
          lambda t: tf.cast(t, tf.float32), y_pred), sample_weight)

  def _micro_batch(self, batch, i: tf.Tensor):
    """Micro-batch i of `accum_steps` of this replica's batch.

    Full batches are reshaped to [k, b/k, ...] so every micro-batch keeps a
    static shape (XLA, fewer retraces); a partial batch of n is split into
    sizes n//k or n//k + 1, none empty unless n < k.
    """
    k = self.accum_steps
    size = tf.nest.flatten(batch)[0].shape[0]
    if size is not None and size % k == 0:
      return tf.nest.map_structure(
          lambda t: tf.reshape(t, [k, size // k, *t.shape[1:]])[i], batch)
    n = tf.cast(tf.shape(tf.nest.flatten(batch)[0])[0], i.dtype)
    start, end = i * n // k, (i + 1) * n // k
    return tf.nest.map_structure(lambda t: t[start:end], batch)

  def _accumulated_grads(self, batch, global_count):
    """Sums gradients over `accum_steps` micro-batches, one after another."""
    grads = [tf.zeros_like(v) for v in self.model.trainable_variables]
    loss_sum, count = tf.constant(0.0), tf.constant(0.0)
    for i in tf.range(self.accum_steps):
      part = self._micro_batch(batch, i)
      if tf.shape(tf.nest.flatten(part)[0])[0] > 0:  # n < k leaves some empty
        part_grads, part_loss, part_count, y_pred = self._local_grads(
            part, global_count)
        grads = [g + tf.cast(p, g.dtype) for g, p in zip(grads, part_grads)]
        loss_sum += part_loss
        count += part_count
        self._update_metrics(part, y_pred)
    return grads, loss_sum, count

  def replica_step(self, batch, want_norm=True) -> ReplicaOutput:
    """Runs in replica context: gradients, one all-reduce, unscale, clip.

    `want_norm` (bool tensor): compute `grad_norm` for the logs; when False
    and nothing is clipped it is skipped (0), saving ~2 ops per variable.
    """
    global_count = self._global_count(batch)
    if self.accum_steps == 1:
      grads, loss_sum, count, y_pred = self._local_grads(batch, global_count)
      self._update_metrics(batch, y_pred)
    else:  # a loop over micro-batches: autograph makes it a while_loop
      grads, loss_sum, count = compat.converted(
          self._accumulated_grads, ours=True)(batch, global_count)
    if self.strategy.num_replicas_in_sync > 1:  # one replica: already global
      # One all-reduce: gradients, loss, count, and each replica's moving
      # statistics weighted by its examples.
      reduced = average_statistics(self._statistics, count, grads + [loss_sum],
                                   all_reduce_sum)
      grads, loss_sum, count = reduced[:-1], reduced[-1], global_count
    grads, finite, grad_norm = self.update.finish(grads, want_norm)
    return ReplicaOutput(grads, finite, grad_norm, loss_sum, count)

  def zero_outputs(self, element_spec) -> StepOutput:  # pylint: disable=unused-argument
    """The structure `__call__` returns, as zeros (the loop's start)."""
    zero = tf.constant(0.0)
    return {"sum": {"loss_sum": zero, "count": zero, "skipped": zero},
            "last": {"grad_norm": zero}}

  def __call__(self, batch, want_norm=True) -> StepOutput:
    """One step in cross-replica context (inside tf.function, under scope).

    Returns {"sum": {loss_sum, count, skipped}, "last": {grad_norm}}: scalar
    float32 tensors that the host loop adds up over its steps, or keeps the
    last of (grad_norm: 0 unless `want_norm` or clipping).
    """
    out = self.strategy.run(self.replica_step, args=(batch, want_norm))
    first = lambda t: self.strategy.experimental_local_results(t)[0]
    skipped = self.update.apply(out.grads, first(out.finite))
    self._advance()
    return {"sum": {"loss_sum": first(out.loss_sum),
                    "count": first(out.count), "skipped": skipped},
            "last": {"grad_norm": first(out.grad_norm)}}
