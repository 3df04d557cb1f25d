"""Replica-context primitives shared by the built-in and the custom step:
empty-replica padding (DESIGN.md fact 17), batch-norm statistics averaged
over replicas (fact 19), the one SUM all-reduce, and XLA's refusal of a step
as one ConfigError line (fact 18)."""

from typing import Callable

import keras
import tensorflow as tf

from trainer import compat
from trainer.errors import ConfigError, message_line
from trainer.step.loss import ComputeLoss

def pad_empty(batch) -> tuple:
  """(batch, n) for this replica's batch of n examples; an empty dynamic
  batch gets one zero row (see call_nonempty), so the returned batch has
  max(n, 1) rows. Static (full) batches pass unchanged."""
  first = tf.nest.flatten(batch)[0]
  if first.shape[0] is not None:
    return batch, tf.shape(first)[0]
  n = tf.shape(first)[0]
  pad = tf.maximum(1 - n, 0)
  return tf.nest.map_structure(
      lambda t: tf.pad(t, [[0, pad]] + [[0, 0]] * (t.shape.rank - 1)),
      batch), n


def call_nonempty(compute_loss: ComputeLoss, model, batch, training):
  """`compute_loss` on this replica's batch, never on an empty one.

  A replica can receive zero examples (a partial last batch smaller than
  the replica count, or one that ends before this replica's turn). oneDNN's
  convolution returns a wrongly shaped result on an empty batch (measured:
  [0, 8, 8, 1] -> [0, 8, 8, 1] for a 32-filter Conv2D; DESIGN.md fact 17),
  so an empty batch gets one zero row, and the outputs are cut back to the
  real rows: the per-example loss [n] and predictions [n, ...] of the n real
  examples, whatever the model. Static (full) batches pass unchanged.
  """
  if tf.nest.flatten(batch)[0].shape[0] is not None:
    return compute_loss(model, batch, training)
  padded, n = pad_empty(batch)
  per_example, y_pred = compute_loss(model, padded, training)
  return per_example[:n], tf.nest.map_structure(lambda t: t[:n], y_pred)


BATCH_NORM_STATISTICS = ("moving_mean", "moving_variance", "moving_stddev",
                         "renorm_mean", "renorm_stddev")


def replica_statistics(model) -> list:
  """The moving statistics that each replica updates on its own: those of
  the model's unsynchronized, trainable BatchNormalization layers (Keras 3
  gives them no aggregation, so under MirroredStrategy each replica keeps a
  different copy; DESIGN.md fact 19). The train step averages them over the
  replicas every step. Nothing else is touched: frozen layers, synchronized
  batch norm (already global) and other non-trainable state (an RNN's
  per-replica state, a user's buffers) stay as they are."""
  stats = []
  for layer in compat.all_layers(model):
    if (isinstance(layer, keras.layers.BatchNormalization) and
        layer.trainable and not getattr(layer, "synchronized", False)):
      stats += [getattr(layer, name) for name in BATCH_NORM_STATISTICS
                if getattr(layer, name, None) is not None]
  return stats


def has_synchronized_bn(model) -> bool:
  return any(isinstance(layer, keras.layers.BatchNormalization) and
             getattr(layer, "synchronized", False)
             for layer in compat.all_layers(model))



def average_statistics(statistics: list, count: tf.Tensor, values: list,
                       reduce: Callable[[list], list]) -> list:
  """All-reduces `values` (a flat list of tensors) once, together with each
  replica's moving `statistics` weighted by its example `count` (an empty
  replica counts 0), which it sets to their weighted mean. Returns the
  reduced `values`."""
  weighted = [tf.cast(v.value, tf.float32) * count for v in statistics]
  reduced = reduce(values + [count] + weighted)
  total = reduced[len(values)]
  for v, stat in zip(statistics, reduced[len(values) + 1:]):
    v.assign(tf.cast(stat / total, v.dtype))
  return reduced[:len(values)]


def all_reduce_sum(values: list) -> list:
  """Replica context: one SUM all-reduce of a flat list of tensors."""
  return tf.distribute.get_replica_context().all_reduce(
      tf.distribute.ReduceOp.SUM, values)



def lower_to_hlo(lower: Callable[[], object]) -> None:
  """Runs `lower` (an `experimental_get_compiler_ir(...)(stage="hlo")`
  call) and turns XLA's refusal of an op into one ConfigError line.

  Raises:
    ConfigError: XLA refuses an op, e.g. MaxPool's gradient under op
      determinism (DESIGN.md fact 18).
  """
  try:
    lower()
  except (tf.errors.UnimplementedError, tf.errors.InvalidArgumentError,
          ValueError) as e:  # ValueError: "Failed getting HLO text: ..."
    if isinstance(e, ValueError) and "HLO" not in str(e):
      raise  # the model's own bug, not XLA's refusal
    first = message_line(e).replace("Failed getting HLO text: '", "")
    raise ConfigError(
        f"XLA cannot compile this model's train step with "
        f"train.deterministic=True ({first.rstrip('.')}); turn off "
        "train.jit_compile or train.deterministic") from None
