"""The Keras dtype policy and the loss scale that goes with `mixed_float16`.

Variables stay float32 under every policy; layers compute in float16 or
bfloat16; model outputs and losses are float32 (the models end in a float32
layer). Only `mixed_float16` needs loss scaling: the optimizer is wrapped in
Keras 3's `LossScaleOptimizer`, whose `dynamic_scale` and `step_counter`
variables the train step updates itself (see trainer/step/builtin.py).
"""

import keras
import tensorflow as tf
from absl import logging

from trainer.config import POLICIES
from trainer.errors import ConfigError


def set_policy(name: str) -> None:
  """Sets the global Keras dtype policy; call before building the model."""
  if name not in POLICIES:
    raise ConfigError(f"unknown precision.policy {name!r}; use one of: "
                      f"{', '.join(POLICIES)}")
  if name == "mixed_float16" and not tf.config.list_physical_devices("GPU"):
    logging.warning(
        "precision.policy=mixed_float16 on a machine with no GPU: it runs, but "
        "slowly (CPUs have no fast float16 math); use float32 or "
        "mixed_bfloat16 on CPU.")
  keras.mixed_precision.set_dtype_policy(name)


def uses_loss_scale(name: str) -> bool:
  return name == "mixed_float16"


def wrap_optimizer(optimizer: keras.optimizers.Optimizer,
                   policy: str) -> keras.optimizers.Optimizer:
  """Wraps in a dynamic LossScaleOptimizer when `policy` needs one."""
  if uses_loss_scale(policy) and not isinstance(
      optimizer, keras.optimizers.LossScaleOptimizer):
    return keras.optimizers.LossScaleOptimizer(optimizer)
  return optimizer
