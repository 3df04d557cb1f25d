"""Per-example losses for the train step: ComputeLoss and the helpers that
turn a Keras loss, a name or a task's `compute_loss` into one (float32,
shape [batch]; DESIGN.md fact 5: never reduced by Keras)."""

from typing import Callable

import keras
import tensorflow as tf

from trainer import compat

# (model, batch, training) -> (per-example loss [batch] float32, predictions)
ComputeLoss = Callable[..., tuple]


def unpack_batch(batch):
  """(x, y) or (x, y, sample_weight) -> (x, y, sample_weight or None)."""
  return keras.utils.unpack_x_y_sample_weight(batch)


def resolve_loss(loss) -> Callable:
  """A per-example loss callable from a name, a Keras loss or a function."""
  if isinstance(loss, str):
    try:  # a class name: one loss per example with reduction="none"
      return keras.losses.get({"class_name": loss,
                               "config": {"reduction": "none"}})
    except (ValueError, TypeError):
      pass
    try:  # a function name ("mse", "sparse_categorical_crossentropy")
      function = keras.losses.get(loss)
    except (ValueError, TypeError):
      function = None
    if not callable(function) or isinstance(function, keras.losses.Loss):
      raise ValueError(
          f"unknown loss {loss!r}; give a Keras loss class name (e.g. "
          "'MeanSquaredError') or function name (e.g. 'mse', "
          "'sparse_categorical_crossentropy'), or a callable (y_true, "
          "y_pred) -> [batch]")
    return function  # Keras' loss functions give one value per example
  if isinstance(loss, keras.losses.Loss) and loss.reduction != "none":
    raise ValueError(f"the loss {loss.name!r} reduces with "
                     f"{loss.reduction!r}; create it with reduction='none' so "
                     "the trainer can average over the global batch")
  return loss


def float32_losses(compute_loss: ComputeLoss) -> ComputeLoss:
  """A user's `compute_loss` whose per-example losses are float32 (a model
  ending in a float16 layer under mixed_float16 gives float16 ones)."""

  compute_loss = compat.converted(compute_loss)

  def wrapped(model, batch, training):
    per_example, y_pred = compute_loss(model, batch, training)
    return tf.cast(per_example, tf.float32), y_pred

  return wrapped


def make_compute_loss(loss_fn: Callable) -> ComputeLoss:
  """Wraps a per-example `loss_fn(y_true, y_pred) -> [batch]` as ComputeLoss."""
  loss_fn = compat.converted(loss_fn)

  def compute_loss(model, batch, training):
    x, y, sample_weight = unpack_batch(batch)
    y_pred = model(x, training=training)
    per_example = tf.cast(loss_fn(y, y_pred), tf.float32)
    if per_example.shape.rank != 1:
      raise ValueError(
          "the loss must return one value per example (shape [batch]), got "
          f"shape {per_example.shape}; for a Keras loss use reduction='none'")
    if sample_weight is not None:
      per_example *= tf.cast(sample_weight, tf.float32)
    return per_example, y_pred

  return compute_loss
