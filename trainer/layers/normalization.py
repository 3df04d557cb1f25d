"""Batch normalization across replicas (`model.sync_batch_norm`).

`keras.layers.BatchNormalization(synchronized=True)` (TensorFlow backend)
all-reduces each replica's sum, sum of squares and count, so the batch
mean/variance, and the moving statistics updated from them, are those of
the *global* batch. Unsynchronized under MirroredStrategy (Keras 3.15, our
measurement): each replica normalizes with its own batch's statistics and
updates its own copy of the moving statistics, which then differ between
replicas (the variables have no aggregation); a checkpoint or
`get_weights()` sees replica 0's copy.
"""

import keras


def batch_normalization(*, synchronized: bool = False,
                        **kwargs) -> keras.layers.BatchNormalization:
  """A Keras BatchNormalization layer, cross-replica if `synchronized`.

  Args:
    synchronized: compute training statistics over all replicas' batches.
      Outside a strategy, or with one replica, it equals the plain layer.
    **kwargs: other BatchNormalization arguments (name, momentum, ...).

  Returns:
    The layer: input [batch, ..., channels] -> same shape, compute dtype;
    gamma, beta, moving_mean, moving_variance [channels] float32.
  """
  return keras.layers.BatchNormalization(synchronized=synchronized, **kwargs)


def synchronize_batch_norm(model: keras.Model) -> keras.Model:
  """A copy of `model` whose BatchNormalization layers are synchronized.

  For models not built layer by layer here (`keras.applications`). Layer
  names and the architecture are kept; the copy has *fresh* weights (call it
  on a randomly initialized model, or copy the weights over after).
  Call inside `strategy.scope()`.

  Args:
    model: a functional or Sequential Keras model.

  Returns:
    The clone, every BatchNormalization layer with `synchronized=True`.
  """

  def clone(layer):
    config = layer.get_config()
    if isinstance(layer, keras.layers.BatchNormalization):
      config["synchronized"] = True
    return layer.__class__.from_config(config)

  return keras.models.clone_model(model, clone_function=clone)
