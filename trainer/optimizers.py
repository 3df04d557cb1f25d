"""Optimizers from config, and the one Keras hook the train step replaces.

The train step all-reduces gradients itself (once, so that the global
finiteness check and global-norm clipping see the reduced gradient; DESIGN.md
facts 2 and 3). Keras 3's TF optimizer would all-reduce them a second time
inside `apply`, so `disable_gradient_aggregation` turns that off for one
optimizer instance. tests/test_step.py pins the result (mirrored == one device).
"""

import keras
import ml_collections

from trainer.errors import ConfigError


def _no_aggregation(grads_and_vars):
  return list(grads_and_vars)


def disable_gradient_aggregation(
    optimizer: keras.optimizers.Optimizer) -> None:
  """Makes `optimizer.apply` use the gradients as given (already reduced)."""
  if not hasattr(optimizer, "_all_reduce_sum_gradients"):
    raise RuntimeError(
        "this Keras version has no _all_reduce_sum_gradients hook; the train "
        "step cannot stop Keras from all-reducing gradients a second time")
  optimizer._all_reduce_sum_gradients = _no_aggregation  # pylint: disable=protected-access
  inner = getattr(optimizer, "inner_optimizer", None)
  if inner is not None:
    disable_gradient_aggregation(inner)


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
