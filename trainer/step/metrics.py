"""Metrics as Keras' `compile(metrics=[...])` takes them: objects, or names
("accuracy", "mae", "AUC"), resolved once into fresh metric objects."""

import keras


def clone_metric(metric: keras.metrics.Metric) -> keras.metrics.Metric:
  """A fresh metric of the same class and config (no state)."""
  return metric.__class__.from_config(metric.get_config())


# "accuracy" in Keras' compile: the kind its loss implies.
_ACCURACY_BY_LOSS = (("sparse_categorical", "SparseCategoricalAccuracy"),
                     ("categorical", "CategoricalAccuracy"),
                     ("binary", "BinaryAccuracy"))


def resolve_metric(metric, loss) -> keras.metrics.Metric:
  """A Keras metric from what `compile(metrics=[...])` takes: an instance,
  or a name ("accuracy" is the accuracy `loss` implies, as in Keras;
  "mae", "AUC", ... as `keras.metrics.get` reads them), logged under it.

  Raises:
    ValueError: a name Keras does not know, or "accuracy" with a loss
      that does not say which accuracy.
  """
  if not isinstance(metric, str):
    return metric
  if metric in ("accuracy", "acc"):
    name = getattr(loss, "__name__", None) or type(loss).__name__
    snake = "".join(f"_{c.lower()}" if c.isupper() else c
                    for c in str(loss if isinstance(loss, str) else name))
    kind = next((k for key, k in _ACCURACY_BY_LOSS if key in snake), None)
    if kind is None:
      raise ValueError(
          f"metrics={metric!r} with loss {loss!r}: say which accuracy, e.g. "
          "keras.metrics.SparseCategoricalAccuracy(name='accuracy') (integer "
          "labels) or keras.metrics.CategoricalAccuracy(name='accuracy')")
    return getattr(keras.metrics, kind)(name=metric)
  try:
    found = keras.metrics.get(metric)
  except (ValueError, TypeError):
    found = None
  if not isinstance(found, keras.metrics.Metric):
    raise ValueError(f"unknown metric {metric!r}; give a Keras metric "
                     "object or name (e.g. 'mae', 'AUC')")
  return found.__class__.from_config({**found.get_config(), "name": metric})
