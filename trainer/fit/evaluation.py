"""Exact evaluation across replicas and workers: `Trainer.evaluate`.

One pass over the data; every example counts once, whatever the batch and
replica count: a partial last batch is averaged over its real size, and a
replica that receives no example runs the model on one zero row whose
outputs are dropped (trainer/step/builtin.py `call_nonempty`).
"""

from typing import Callable

import keras
import tensorflow as tf

from trainer.step.loss import ComputeLoss
from trainer.step.replica import call_nonempty


def as_float32(outputs):
  """Model outputs (a tensor or a nest) cast to float32 for metrics."""
  return tf.nest.map_structure(lambda t: tf.cast(t, tf.float32), outputs)


class Evaluator:
  """The eval loss and metrics of one model under one strategy.

  Args:
    model: a Keras model built under `strategy.scope()`.
    compute_loss: (model, batch, training) -> (per-example loss, outputs).
    strategy: the tf.distribute strategy.
    metrics: Keras metrics created under the scope (reset every call).
    distribute: `Trainer.distribute` (dataset [function] -> its input).
  """

  def __init__(self, *, model, compute_loss: ComputeLoss,
               strategy: tf.distribute.Strategy, metrics,
               distribute: Callable):
    self.model, self.strategy = model, strategy
    self._compute_loss, self.distribute = compute_loss, distribute
    self.metrics = list(metrics)
    with strategy.scope():
      self.loss = keras.metrics.Mean(name="loss")
    self._loop = tf.function(self._loop_fn)

  def _step(self, batch):
    per_example, y_pred = call_nonempty(self._compute_loss, self.model, batch,
                                        False)
    _, y, sample_weight = keras.utils.unpack_x_y_sample_weight(batch)
    self.loss.update_state(per_example)
    for metric in self.metrics:
      metric.update_state(y, as_float32(y_pred), sample_weight)

  def _loop_fn(self, dataset):
    with self.strategy.scope():
      for batch in dataset:
        self.strategy.run(self._step, args=(batch,))

  def __call__(self, data) -> dict[str, float]:
    """One full pass over `data`: `loss`, each metric, `num_examples`."""
    for metric in self.metrics + [self.loss]:
      metric.reset_state()
    self._loop(self.distribute(data))
    logs = {"loss": float(self.loss.result()),
            "num_examples": int(self.loss.count.numpy())}
    for metric in self.metrics:
      logs[metric.name] = float(metric.result())
    return logs
