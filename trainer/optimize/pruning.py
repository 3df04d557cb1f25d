"""Magnitude pruning for Keras 3, on every replica and worker.

tensorflow-model-optimization works only with Keras 2 (DESIGN.md fact 9), so
the trainer prunes by itself. Each pruned kernel has a 0/1 mask variable of
its shape. At the schedule's update steps the mask zeroes the kernel's
smallest-magnitude entries, exactly `round(sparsity * size)` of them; after
every optimizer update (skipped ones too) the kernel is multiplied by its
mask. Both run in cross-replica context inside the train step, on values
that are identical on every replica, so every replica and worker holds the
same masks and weights. The masks are checkpointed with the run; the model
itself holds plain kernels with zeros in them, so an exported model is
already stripped of the pruning machinery and keeps the zeros.
"""

import dataclasses
import re

import keras
import ml_collections
import tensorflow as tf

from trainer import compat
from trainer.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class PruningSchedule:
  """Polynomial-decay sparsity (Zhu & Gupta 2017), as in TF-MOT.

  sparsity(step) = target + (initial - target) * (1 - p)**power, with
  p = (step - begin_step) / (end_step - begin_step) clipped to [0, 1].
  Masks are recomputed every `frequency` steps from `begin_step` and at
  `end_step`, after which they stay fixed.

  Attributes:
    target_sparsity: fraction of each pruned kernel that ends up zero.
    begin_step, end_step: global steps where pruning starts and ends.
    frequency: steps between mask updates.
    initial_sparsity: sparsity at `begin_step`.
    power: the polynomial's exponent (3: prune fast first, then slowly).
    exclude: regex; layers whose name matches are not pruned.
  """
  target_sparsity: float
  begin_step: int
  end_step: int
  frequency: int = 100
  initial_sparsity: float = 0.0
  power: float = 3.0
  exclude: str = ""

  def __post_init__(self):
    if not 0.0 < self.target_sparsity < 1.0:
      raise ConfigError("pruning.target_sparsity must be in (0, 1), got "
                        f"{self.target_sparsity!r}")
    if not 0.0 <= self.initial_sparsity <= self.target_sparsity:
      raise ConfigError("pruning.initial_sparsity must be in [0, "
                        f"target_sparsity], got {self.initial_sparsity!r}")
    if not 0 <= self.begin_step < self.end_step:
      raise ConfigError("pruning needs 0 <= begin_step < end_step, got "
                        f"{self.begin_step} and {self.end_step}")
    try:
      re.compile(self.exclude)
    except re.error as e:
      raise ConfigError(f"pruning.exclude {self.exclude!r} is not a valid "
                        f"regular expression ({e})") from None
    if self.frequency < 1:
      raise ConfigError(f"pruning.frequency must be >= 1, got "
                        f"{self.frequency}")

  def sparsity(self, step: tf.Tensor) -> tf.Tensor:
    """The sparsity to reach at int64 `step` (float32 scalar)."""
    progress = tf.clip_by_value(
        tf.cast(step - self.begin_step, tf.float32) /
        float(self.end_step - self.begin_step), 0.0, 1.0)
    return self.target_sparsity + (
        self.initial_sparsity - self.target_sparsity) * (1.0 - progress
                                                         )**self.power

  def is_update_step(self, step: tf.Tensor) -> tf.Tensor:
    """True at begin_step + i * frequency up to end_step, and at end_step."""
    inside = (step >= self.begin_step) & (step <= self.end_step)
    on_frequency = tf.equal((step - self.begin_step) % self.frequency, 0)
    return inside & (on_frequency | tf.equal(step, self.end_step))


def prunable_kernels(model: keras.Model, exclude: str = "") -> list:
  """The `kernel` variables of the model's layers (Dense, Conv and custom
  layers with a `kernel`), except in layers whose name matches `exclude`."""
  kernels = []
  for layer in compat.all_layers(model):
    kernel = getattr(layer, "kernel", None)
    if isinstance(kernel, keras.Variable) and kernel.trainable and not (
        exclude and re.search(exclude, layer.name)):
      kernels.append(kernel)
  return kernels


class Pruner:
  """Masks for a model's kernels, updated and applied after every step.

  Create inside `strategy.scope()` (the masks are mirrored variables).

  Args:
    model: the Keras model being trained.
    schedule: when and how much to prune.
  """

  def __init__(self, model: keras.Model, schedule: PruningSchedule):
    self.schedule = schedule
    self.kernels = prunable_kernels(model, schedule.exclude)
    if not self.kernels:
      raise ConfigError(f"pruning found no kernel to prune in model "
                        f"{model.name!r} (exclude={schedule.exclude!r})")
    self.masks = {
        k.path: tf.Variable(
            tf.ones(k.shape, tf.float32), trainable=False,
            name=k.path.replace("/", "_") + "_mask",
            synchronization=tf.VariableSynchronization.ON_WRITE,
            aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
        for k in self.kernels}

  def _update_masks(self, step: tf.Tensor) -> None:
    sparsity = self.schedule.sparsity(step)
    for kernel in self.kernels:
      magnitude = tf.reshape(tf.abs(tf.cast(kernel.value, tf.float32)), [-1])
      size = magnitude.shape[0]
      num_zeros = tf.cast(tf.round(sparsity * size), tf.int32)
      smallest = tf.argsort(magnitude, stable=True)[:num_zeros]
      mask = tf.tensor_scatter_nd_update(
          tf.ones([size]), smallest[:, None], tf.zeros_like(smallest,
                                                            tf.float32))
      self.masks[kernel.path].assign(tf.reshape(mask, kernel.shape))

  def after_update(self, step: tf.Tensor) -> None:
    """Cross-replica, after the optimizer update of global step `step`."""

    def update():
      self._update_masks(step)
      return tf.constant(True)

    tf.cond(self.schedule.is_update_step(step), update,
            lambda: tf.constant(False))
    for kernel in self.kernels:
      kernel.assign(kernel.value * tf.cast(self.masks[kernel.path],
                                           kernel.dtype))

  def sparsity(self) -> float:
    """Fraction of zeros over all pruned kernels now."""
    zeros = sum(int(tf.math.count_nonzero(k.value == 0)) for k in self.kernels)
    return zeros / sum(int(k.value.shape.num_elements()) for k in self.kernels)


def default_end_step(total_steps: int) -> int:
  """`pruning.end_step=0`: three quarters of the run, so the pruned model
  trains for the last quarter with fixed masks."""
  return max(total_steps * 3 // 4, 1)


def schedule_from_config(cfg: ml_collections.ConfigDict,
                         total_steps: int) -> PruningSchedule | None:
  """The config's `pruning` section as a schedule; None when off.

  `end_step` 0 means three quarters of the run, so the pruned model trains
  for the last quarter with fixed masks.
  """
  if not cfg.target_sparsity:
    return None
  return PruningSchedule(
      target_sparsity=float(cfg.target_sparsity),
      begin_step=int(cfg.begin_step),
      end_step=int(cfg.end_step) or default_end_step(total_steps),
      frequency=int(cfg.frequency), initial_sparsity=float(
          cfg.initial_sparsity), power=float(cfg.power), exclude=cfg.exclude)
