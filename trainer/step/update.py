"""One optimizer's part of a train step, after the gradients are all-reduced.

Shared by the built-in step (trainer/step/builtin.py: one optimizer) and a task's
own step (trainer/step/context.py: one per optimizer it applies). In
replica context, on the reduced gradients (identical on every replica):
check finiteness (so one replica's inf skips the update everywhere,
DESIGN.md fact 2), unscale by this optimizer's own loss scale, clip to the
global norm (after the reduction, fact 3). In cross-replica context: apply,
or skip and halve the loss scale; grow it after `dynamic_growth_steps`
applied steps in a row, as Keras' LossScaleOptimizer does.
"""

import tensorflow as tf

from trainer.optimize.optimizers import (disable_gradient_aggregation,
                                        fused_update, inner_optimizer,
                                        is_loss_scaled)


class OptimizerUpdate:
  """Applies one optimizer (wrapped in LossScaleOptimizer or not) to its
  variables with gradients that are already all-reduced.

  Args:
    optimizer: a Keras optimizer built under `strategy.scope()`.
    variables: the trainable variables it may update (it was built on them).
    strategy: the tf.distribute strategy.
    global_clipnorm: clip the reduced gradient to this global norm (0 = off).
  """

  def __init__(self, optimizer, variables, strategy: tf.distribute.Strategy,
               global_clipnorm: float = 0.0):
    self.optimizer, self.strategy = optimizer, strategy
    self.variables = list(variables)
    self.global_clipnorm = float(global_clipnorm)
    self.loss_scaled = is_loss_scaled(optimizer)
    self.inner = inner_optimizer(optimizer)
    disable_gradient_aggregation(optimizer)
    self._fused = fused_update(self.inner, strategy, self.variables)

  @property
  def loss_scale(self) -> tf.Variable | None:
    return self.optimizer.dynamic_scale if self.loss_scaled else None

  @property
  def fused(self) -> bool:
    """True if the update runs as TensorFlow's fused kernels (plain Adam
    and SGD), False if through Keras' `optimizer.apply`."""
    return self._fused is not None

  def scale(self, loss: tf.Tensor) -> tf.Tensor:
    """`loss` times this optimizer's loss scale (itself without one)."""
    return self.optimizer.scale_loss(loss) if self.loss_scaled else loss

  def finish(self, grads: list, want_norm=True) -> tuple:
    """Replica context, on all-reduced scaled gradients.

    Returns (grads unscaled and clipped, finite: bool scalar, norm: the
    global norm before clipping, 0 when neither `want_norm` nor clipping
    asks for it).
    """
    if self.loss_scaled:
      finite = tf.reduce_all([tf.reduce_all(tf.math.is_finite(g))
                              for g in grads])
      grads = [g / self.optimizer.dynamic_scale for g in grads]
    else:
      finite = tf.constant(True)
    if self.global_clipnorm > 0:
      norm = tf.linalg.global_norm(grads)
      grads, _ = tf.clip_by_global_norm(grads, self.global_clipnorm,
                                        use_norm=norm)
    else:
      norm = tf.cond(want_norm, lambda: tf.linalg.global_norm(grads),
                     lambda: tf.constant(0.0))
    return grads, finite, norm

  def _apply(self, grads, variables) -> None:
    if self._fused is not None:
      self._fused.apply(grads, variables)
      return
    self.strategy.extended.call_for_each_replica(
        lambda g: self.inner.apply(g, variables), args=(grads,))

  def _grow(self) -> None:
    opt = self.optimizer
    if_grow = tf.equal(opt.step_counter, opt.dynamic_growth_steps - 1)
    opt.step_counter.assign(tf.where(if_grow, tf.zeros_like(opt.step_counter),
                                     opt.step_counter + 1))
    opt.dynamic_scale.assign(tf.where(if_grow, opt.dynamic_scale * 2.0,
                                      opt.dynamic_scale))

  def _skip(self) -> None:
    self.optimizer.step_counter.assign(
        tf.zeros_like(self.optimizer.step_counter))
    self.optimizer.dynamic_scale.assign(self.optimizer.dynamic_scale * 0.5)

  def apply(self, grads, finite, variables=None) -> tf.Tensor:
    """Cross-replica: applies `grads` (from `finish`, replica 0's) to
    `variables` (default: all of this optimizer's), or under a loss scale
    skips a non-finite update and halves the scale. Returns a float32 1.0
    if the update was skipped, else 0.0."""
    variables = self.variables if variables is None else variables
    if not self.loss_scaled:
      self._apply(grads, variables)
      return tf.constant(0.0)

    def apply_and_grow():
      self._apply(grads, variables)
      self._grow()
      return tf.constant(0.0)

    def skip():
      self._skip()
      return tf.constant(1.0)

    return tf.cond(finite, apply_and_grow, skip)
