"""Your own experiment, the seed program: a custom dense layer, the Keras
dense head, sparse cross-entropy from logits and an epoch-end callback, on
random data (100 examples x 10 features, labels 0-9), trained on 2 replicas
under mixed_float16 from one command:

  python -m launch.train --config=configs/custom_dense.py --workdir=runs/dense

The config and the task live together in this file; `task` names the class
below. Its own settings are under `user`.
"""

import keras
import numpy as np

from trainer.config import default_config


def get_config():
  c = default_config()
  c.task = "configs.custom_dense:CustomDenseTask"
  c.user.num_examples = 100
  c.user.features = 10
  c.user.units = 64
  c.data.global_batch_size = 32
  c.data.eval_batch_size = 32
  c.optimizer.name = "adam"
  c.optimizer.learning_rate = 1e-2
  c.train.steps = 30  # 10 epochs of 3 steps (100 // 32)
  c.train.steps_per_loop = 3
  c.train.checkpoint_every = 15
  c.distribution.strategy = "mirrored"
  c.distribution.num_cpu_devices = 2  # 2 logical CPUs; your GPUs on a GPU host
  c.precision.policy = "mixed_float16"
  return c


@keras.saving.register_keras_serializable(package="custom_dense")
class MyDense(keras.layers.Layer):
  """y = activation(x @ kernel + bias), as users write their layers."""

  def __init__(self, units, activation=None, **kwargs):
    super().__init__(**kwargs)
    self.units = units
    self.activation = keras.activations.get(activation)

  def build(self, input_shape):
    self.kernel = self.add_weight(shape=(input_shape[-1], self.units),
                                  initializer="glorot_uniform", name="kernel")
    self.bias = self.add_weight(shape=(self.units,), initializer="zeros",
                                name="bias")

  def call(self, x):  # x and the variables arrive in self.compute_dtype
    return self.activation(keras.ops.matmul(x, self.kernel) + self.bias)

  def get_config(self):
    return {**super().get_config(), "units": self.units,
            "activation": keras.activations.serialize(self.activation)}


class PrintEpoch(keras.callbacks.Callback):
  """Prints loss and accuracy at every epoch end (on the chief only)."""

  chief_only = True

  def on_epoch_end(self, epoch, logs=None):
    logs = logs or {}
    print(f"epoch {epoch + 1}: loss {logs.get('loss', float('nan')):.4f}, "
          f"accuracy {logs.get('accuracy', float('nan')):.4f}", flush=True)


class CustomDenseTask:
  """Classifies 10 random features into 10 classes (the seed's data)."""

  def __init__(self, config):
    self.user = config.user
    rng = np.random.default_rng(config.seed)
    n, d = self.user.num_examples, self.user.features
    self.x = rng.random((n, d), dtype=np.float32)
    self.y = rng.integers(0, 10, size=n).astype(np.int32)

  def build_model(self):
    return keras.Sequential([
        keras.Input((self.user.features,), name="features"),
        MyDense(self.user.units, activation="relu", name="my_dense"),
        keras.layers.Dense(10, dtype="float32", name="logits")])

  def train_data(self):
    return self.x, self.y

  def eval_data(self):
    return self.x, self.y

  def build_losses(self, labels, logits):
    return keras.losses.sparse_categorical_crossentropy(labels, logits,
                                                        from_logits=True)

  def build_metrics(self):
    return [keras.metrics.SparseCategoricalAccuracy(name="accuracy")]

  def callbacks(self):
    return [PrintEpoch()]
