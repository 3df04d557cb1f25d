"""Optimizers from config, and the Keras hooks the train step replaces.

The train step all-reduces gradients itself (once, so that the global
finiteness check and global-norm clipping see the reduced gradient; DESIGN.md
facts 2 and 3). Keras 3's TF optimizer would all-reduce them a second time
inside `apply`, so `disable_gradient_aggregation` turns that off for one
optimizer instance. tests/test_step_builtin.py pins the result (mirrored == one device).

`fused_update` replaces Keras' update (Adam: a dozen elementwise ops per
variable, each a pass over its memory, plus the bias corrections recomputed
per variable) by TensorFlow's fused kernels (one multithreaded pass) where
the math is the same: plain Adam, and SGD with or without momentum.
tests/test_step_builtin.py pins it against Keras' own update.
"""

import keras
import ml_collections
import tensorflow as tf

from trainer import compat
from trainer.optimize import precision
from trainer.errors import ConfigError


def _no_aggregation(grads_and_vars):
  return list(grads_and_vars)


def inner_optimizer(optimizer: keras.optimizers.Optimizer
                    ) -> keras.optimizers.Optimizer:
  """The optimizer that holds the learning rate and the slots: a
  LossScaleOptimizer's inner one, else `optimizer` itself."""
  return getattr(optimizer, "inner_optimizer", optimizer)


def is_loss_scaled(optimizer: keras.optimizers.Optimizer) -> bool:
  """Whether `optimizer` is a LossScaleOptimizer (mixed_float16)."""
  return inner_optimizer(optimizer) is not optimizer


def set_learning_rate(optimizer: keras.optimizers.Optimizer,
                      rate: float) -> None:
  """Sets the (constant) learning rate of `optimizer`, loss-scaled or not."""
  inner_optimizer(optimizer).learning_rate = float(rate)


def disable_gradient_aggregation(
    optimizer: keras.optimizers.Optimizer) -> None:
  """Makes `optimizer.apply` use the gradients as given (already reduced)."""
  if not compat.set_gradient_aggregation(optimizer, _no_aggregation):
    raise RuntimeError(
        "this Keras version has no _all_reduce_sum_gradients hook; the train "
        "step cannot stop Keras from all-reducing gradients a second time")
  if is_loss_scaled(optimizer):
    disable_gradient_aggregation(inner_optimizer(optimizer))


def _local(variable) -> tf.Variable:
  """The tf.Variable to update on this device: a Keras variable's value,
  and inside `strategy.extended.update` a mirrored variable's component."""
  if isinstance(variable, keras.Variable):
    variable = variable.value
  component = getattr(variable, "_get_on_device_or_primary", None)
  return component() if component else variable


class FusedUpdate:
  """Keras' update of plain Adam or SGD as one fused kernel per variable.

  Call `apply(grads, variables)` in cross-replica context with the reduced
  (per-replica) gradients: the learning rate and Adam's bias corrections
  are computed once per step, each variable is updated in place on each of
  its devices, then `iterations` advances, as Keras' `apply` does.
  """

  def __init__(self, optimizer: keras.optimizers.Optimizer,
               strategy: tf.distribute.Strategy):
    self.optimizer, self.strategy = optimizer, strategy
    self.adam = isinstance(optimizer, keras.optimizers.Adam)

  def _slot(self, slots, variable) -> tf.Variable:
    return _local(slots[compat.optimizer_variable_index(self.optimizer,
                                                         variable)])

  def _update(self, variable, grad, lr, powers):
    opt, dtype = self.optimizer, variable.dtype
    grad, var = tf.cast(grad, dtype), _local(variable)
    if self.adam:
      momentums, velocities = compat.adam_slots(opt)
      tf.raw_ops.ResourceApplyAdam(
          var=var.handle, m=self._slot(momentums, variable).handle,
          v=self._slot(velocities, variable).handle,
          beta1_power=powers[0], beta2_power=powers[1], lr=lr,
          beta1=tf.cast(opt.beta_1, dtype), beta2=tf.cast(opt.beta_2, dtype),
          epsilon=tf.cast(opt.epsilon, dtype), grad=grad)
    elif opt.momentum:
      tf.raw_ops.ResourceApplyKerasMomentum(
          var=var.handle, accum=self._slot(opt.momentums, variable).handle,
          lr=lr, grad=grad, momentum=tf.cast(opt.momentum, dtype))
    else:
      tf.raw_ops.ResourceApplyGradientDescent(var=var.handle, alpha=lr,
                                              delta=grad)

  def apply(self, grads, variables) -> None:
    opt = self.optimizer
    lr = tf.cast(opt.learning_rate, tf.float32)
    step = tf.cast(opt.iterations + 1, tf.float32)
    powers = (tf.pow(tf.cast(opt.beta_1, tf.float32), step),
              tf.pow(tf.cast(opt.beta_2, tf.float32), step)) if self.adam else ()
    for grad, variable in zip(grads, variables):
      self.strategy.extended.update(
          variable.value, self._update, args=(grad, lr, powers), group=False)
    opt.iterations.assign_add(1)


def fused_update(optimizer: keras.optimizers.Optimizer,
                 strategy: tf.distribute.Strategy,
                 variables) -> FusedUpdate | None:
  """A FusedUpdate for plain Adam or SGD, else None (keep Keras' update).

  Only where the math is Keras' own: exactly `Adam` (no amsgrad) or `SGD`
  (no nesterov), float32 `variables` (the trainable ones it updates), no
  weight decay, EMA, gradient accumulation or per-optimizer clipping (the
  train step clips).
  """
  plain = (not optimizer.weight_decay and not optimizer.use_ema and
           optimizer.clipnorm is None and optimizer.clipvalue is None and
           optimizer.global_clipnorm is None and
           not optimizer.gradient_accumulation_steps and
           getattr(optimizer, "loss_scale_factor", None) is None and
           all(v.dtype == "float32" for v in variables))
  cls = type(optimizer)
  if plain and ((cls is keras.optimizers.Adam and not optimizer.amsgrad) or
                (cls is keras.optimizers.SGD and not optimizer.nesterov)):
    return FusedUpdate(optimizer, strategy)
  return None


def learning_rate_schedule(cfg: ml_collections.ConfigDict, total_steps: int):
  """A float or a Keras schedule from `optimizer.schedule`."""
  lr = float(cfg.learning_rate)
  if cfg.schedule == "constant":
    return lr
  if cfg.schedule == "cosine":
    warmup = int(cfg.warmup_steps)
    return keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=0.0 if warmup else lr,
        decay_steps=max(total_steps - warmup, 1),
        warmup_target=lr if warmup else None,
        warmup_steps=warmup)
  if cfg.schedule == "step":
    boundaries = sorted(int(b) for b in cfg.decay_steps)
    return keras.optimizers.schedules.PiecewiseConstantDecay(
        boundaries, [lr * cfg.decay_factor**i
                     for i in range(len(boundaries) + 1)])
  raise ConfigError(f"unknown optimizer.schedule {cfg.schedule!r}; use one "
                    "of: constant, cosine, step")


def build_optimizer(cfg: ml_collections.ConfigDict,
                    total_steps: int) -> keras.optimizers.Optimizer:
  """The optimizer named by `cfg.name`; build it inside `strategy.scope()`.

  Clipping is not set on the Keras optimizer: the train step clips the
  all-reduced gradient by `optimizer.global_clipnorm`.
  """
  lr = learning_rate_schedule(cfg, total_steps)
  if cfg.name == "sgd":
    return keras.optimizers.SGD(lr)
  if cfg.name == "momentum":
    return keras.optimizers.SGD(lr, momentum=cfg.momentum)
  if cfg.name == "adam":
    return keras.optimizers.Adam(lr)
  if cfg.name == "adamw":
    return keras.optimizers.AdamW(lr, weight_decay=cfg.weight_decay)
  raise ConfigError(f"unknown optimizer.name {cfg.name!r}; use one of: sgd, "
                    "momentum, adam, adamw")


def _named_optimizer(name: str) -> keras.optimizers.Optimizer:
  """`keras.optimizers.get(name)` with its defaults, or a ValueError line."""
  try:
    return keras.optimizers.get(name)
  except (ValueError, TypeError):
    raise ValueError(f"unknown optimizer {name!r}; give a Keras optimizer "
                     "object or name (e.g. 'adam', 'sgd')") from None


def prepare_optimizers(optimizer, models: dict[str, keras.Model],
                       strategy: tf.distribute.Strategy) -> tuple[dict, dict]:
  """Each model's optimizer, ready for the train step.

  Args:
    optimizer: one optimizer (for the first model) or {model name:
      optimizer}, each an object or a Keras name ("adam"); a model without
      one is not trained.
    models: {name: model}, built under `strategy.scope()`.

  Returns ({name: optimizer}, [(object given, name)]): the optimizers
  re-created inside the scope if made outside it, wrapped in a
  LossScaleOptimizer under mixed_float16 and built on their model's
  trainable variables (DESIGN.md fact 1); and the name of each given one.

  Raises:
    ConfigError: a name that is not a model's.
  """
  given = (dict(optimizer) if isinstance(optimizer, dict)
           else {next(iter(models)): optimizer})
  unknown = sorted(set(given) - set(models))
  if unknown:
    raise ConfigError(f"an optimizer for {unknown[0]!r}, which is not a "
                      f"model; the models are {sorted(models)}")
  policy = keras.mixed_precision.dtype_policy().name
  prepared, aliases = {}, []
  with strategy.scope():
    for name, opt in given.items():
      aliases.append((opt, name))
      if isinstance(opt, str):  # Keras' compile(optimizer="adam")
        opt = _named_optimizer(opt)
      if getattr(opt, "_distribution_strategy", None) is not strategy:
        opt = opt.__class__.from_config(opt.get_config())
      opt = precision.wrap_optimizer(opt, policy)
      opt.build(models[name].trainable_variables)
      prepared[name] = opt
  return prepared, aliases
