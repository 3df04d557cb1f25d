"""Your own experiment: regression on tabular arrays with a custom loss
(Huber), a custom metric (`keras.metrics.Metric` subclass: R^2) and a
custom activation, on generated data (2000 rows x 8 features).

  python -m launch.train --config=configs/regression.py --workdir=runs/reg
"""

import keras
import numpy as np

from trainer.config import default_config


def get_config():
  c = default_config()
  c.task = "configs.regression:Regression"
  c.user.num_train = 2000
  c.user.num_eval = 500
  c.user.features = 8
  c.user.huber_delta = 1.0
  c.data.global_batch_size = 64
  c.data.eval_batch_size = 128
  c.optimizer.name = "adam"
  c.optimizer.learning_rate = 3e-3
  c.train.steps = 600
  c.train.steps_per_loop = 25
  c.train.steps_per_epoch = 100
  c.train.checkpoint_every = 200
  return c


@keras.saving.register_keras_serializable(package="regression")
def soft_square(x):
  """A custom activation: x^2 / 2 for |x| < 1, |x| - 1/2 beyond (smooth)."""
  ax = keras.ops.abs(x)
  return keras.ops.where(ax < 1.0, 0.5 * x * x, ax - 0.5)


class RSquared(keras.metrics.Metric):
  """Coefficient of determination 1 - SS_res / SS_tot over all examples,
  from running sums (exact across batches and replicas)."""

  def __init__(self, name="r2", **kwargs):
    super().__init__(name=name, **kwargs)
    sums = ("n", "y", "yy", "res")
    self._sums = {k: self.add_variable((), initializer="zeros", name=k)
                  for k in sums}

  def update_state(self, y_true, y_pred, sample_weight=None):
    y = keras.ops.reshape(keras.ops.cast(y_true, "float32"), [-1])
    p = keras.ops.reshape(keras.ops.cast(y_pred, "float32"), [-1])
    w = (keras.ops.ones_like(y) if sample_weight is None else
         keras.ops.reshape(keras.ops.cast(sample_weight, "float32"), [-1]))
    for key, value in (("n", w), ("y", w * y), ("yy", w * y * y),
                       ("res", w * (y - p) ** 2)):
      self._sums[key].assign_add(keras.ops.sum(value))

  def result(self):
    n = keras.ops.maximum(self._sums["n"], 1.0)
    total = self._sums["yy"] - self._sums["y"] ** 2 / n
    return 1.0 - self._sums["res"] / keras.ops.maximum(total, 1e-12)

  def reset_state(self):
    for v in self._sums.values():
      v.assign(0.0)


class Regression:
  """y = sin(x . a) + 0.5 (x . b)^2 + noise, predicted by an MLP."""

  def __init__(self, config):
    self.user = config.user
    rng = np.random.default_rng(config.seed)
    n = self.user.num_train + self.user.num_eval
    x = rng.normal(size=(n, self.user.features)).astype(np.float32)
    a, b = rng.normal(size=(2, self.user.features)) / np.sqrt(
        self.user.features)
    y = np.sin(x @ a) + 0.5 * (x @ b) ** 2 + 0.1 * rng.normal(size=n)
    self.x, self.y = x, y.astype(np.float32)[:, None]

  def build_model(self):
    return keras.Sequential([
        keras.Input((self.user.features,), name="features"),
        keras.layers.Dense(64, activation=soft_square, name="hidden_0"),
        keras.layers.Dense(64, activation=soft_square, name="hidden_1"),
        keras.layers.Dense(1, dtype="float32", name="prediction")])

  def train_data(self):
    return self.x[:self.user.num_train], self.y[:self.user.num_train]

  def eval_data(self):
    return self.x[self.user.num_train:], self.y[self.user.num_train:]

  def build_losses(self, y_true, y_pred):
    """Huber loss per example: [batch]."""
    err = keras.ops.abs(keras.ops.cast(y_pred, "float32") - y_true)[:, 0]
    delta = self.user.huber_delta
    return keras.ops.where(err < delta, 0.5 * err * err,
                           delta * (err - 0.5 * delta))

  def build_metrics(self):
    return [RSquared(), keras.metrics.MeanAbsoluteError(name="mae")]
