"""DenseLayer: a fully connected layer written the way users write theirs.

y = activation(x @ kernel + bias), with the same operations, in the same
order and with the same default initializers as `keras.layers.Dense`, so
swapping one for the other keeps a model's numbers and variable paths
("<name>/kernel", "<name>/bias").
"""

from typing import Any

import keras
from keras import ops

from trainer.layers import activations


@keras.saving.register_keras_serializable(package="trainer")
class DenseLayer(keras.layers.Layer):
  """A densely connected layer.

  Shapes and dtypes: input [..., in_features] -> output [..., units] in
  `compute_dtype`. kernel [in_features, units] and bias [units] are
  variables of `variable_dtype` (float32 under every policy). Under a mixed
  policy Keras casts the inputs to the compute dtype before `call`, and
  reading a variable inside `call` yields it cast to the compute dtype (the
  layer's autocast scope), so the matmul runs in float16/bfloat16 while the
  optimizer updates float32 weights.

  Args:
    units: output features, a positive int.
    activation: anything `trainer.layers.activations.get` accepts: None, a
      callable, a Keras name ("relu"), "squared_relu", "trainer>squared_relu",
      or a registered "package>name".
    use_bias: add a bias vector.
    kernel_initializer, bias_initializer: Keras initializers or names.
    kernel_regularizer, bias_regularizer: Keras regularizers, names or None;
      their penalties appear in `model.losses`.
    **kwargs: Layer arguments (name, dtype, trainable, ...).
  """

  def __init__(self, units: int, *, activation: Any = None,
               use_bias: bool = True,
               kernel_initializer: Any = "glorot_uniform",
               bias_initializer: Any = "zeros",
               kernel_regularizer: Any = None, bias_regularizer: Any = None,
               **kwargs):
    super().__init__(**kwargs)
    if isinstance(units, bool) or not isinstance(units, int) or units < 1:
      raise ValueError(f"DenseLayer units must be a positive int, got "
                       f"{units!r}")
    self.units = units
    self.activation = activations.get(activation)
    self.use_bias = bool(use_bias)
    self.kernel_initializer = keras.initializers.get(kernel_initializer)
    self.bias_initializer = keras.initializers.get(bias_initializer)
    self.kernel_regularizer = keras.regularizers.get(kernel_regularizer)
    self.bias_regularizer = keras.regularizers.get(bias_regularizer)
    self.supports_masking = True

  def build(self, input_shape):
    in_features = input_shape[-1]
    if in_features is None:
      raise ValueError(f"DenseLayer {self.name} needs a known last input "
                       f"dimension, got input shape {input_shape}")
    self.kernel = self.add_weight(
        name="kernel", shape=(in_features, self.units),
        initializer=self.kernel_initializer,
        regularizer=self.kernel_regularizer)
    self.bias = self.add_weight(
        name="bias", shape=(self.units,), initializer=self.bias_initializer,
        regularizer=self.bias_regularizer) if self.use_bias else None
    self.input_spec = keras.InputSpec(min_ndim=2, axes={-1: in_features})

  def call(self, inputs):
    x = ops.matmul(inputs, self.kernel)
    if self.bias is not None:
      x = ops.add(x, self.bias)
    return self.activation(x)

  def compute_output_shape(self, input_shape):
    return (*input_shape[:-1], self.units)

  def get_config(self) -> dict:
    return {
        **super().get_config(),
        "units": self.units,
        "activation": keras.activations.serialize(self.activation),
        "use_bias": self.use_bias,
        "kernel_initializer": keras.initializers.serialize(
            self.kernel_initializer),
        "bias_initializer": keras.initializers.serialize(
            self.bias_initializer),
        "kernel_regularizer": keras.regularizers.serialize(
            self.kernel_regularizer),
        "bias_regularizer": keras.regularizers.serialize(
            self.bias_regularizer),
    }
