"""Activations: a plain function (`squared_relu`), a learnable one
(`ParametricSwish`), and `get`, the name resolver our layers use.

Keras 3.15's `keras.activations.get("...")` only knows Keras' built-in names:
a function registered with `register_keras_serializable` is *not* found by
its string, not even as "package>name". `get` below also accepts
"trainer>squared_relu", the short "squared_relu", and any registered
"package>name" of your own, so `trainer.layers.DenseLayer(64,
activation="squared_relu")` works. Stock Keras layers take the function
object instead:
`keras.layers.Dense(64, activation=trainer.layers.squared_relu)`; both forms
serialize as "trainer>squared_relu" and load in safe mode.
"""

from typing import Any, Callable

import keras
from keras import ops

PACKAGE = "trainer"


@keras.saving.register_keras_serializable(package=PACKAGE)
def squared_relu(x):
  """relu(x)**2 (So et al. 2021, "Primer").

  Args:
    x: a float tensor of any shape, computed in its own dtype (float16 under
      mixed_float16: overflows to inf for x > 255, like any float16 square).

  Returns:
    A tensor of the shape and dtype of `x`.
  """
  return ops.square(ops.relu(x))


def get(identifier: Any) -> Callable:
  """Resolves an activation identifier to a function.

  Args:
    identifier: None (linear); a callable; a serialized config dict; a
      Keras built-in name ("relu", "gelu", ...); a registered name
      ("trainer>squared_relu", "my_package>my_fn"); or the short name of a
      trainer activation ("squared_relu").

  Returns:
    The activation function.

  Raises:
    ValueError: the identifier names nothing, or names a class.
  """
  if identifier is None or callable(identifier) or isinstance(identifier,
                                                              dict):
    return keras.activations.get(identifier)
  if not isinstance(identifier, str):
    raise ValueError(f"activation must be a name or a callable, got "
                     f"{identifier!r}")
  try:
    return keras.activations.get(identifier)
  except ValueError:
    pass
  for name in (identifier, f"{PACKAGE}>{identifier}"):
    fn = keras.saving.get_registered_object(name)
    if fn is not None and not isinstance(fn, type):
      return fn
  raise ValueError(
      f"unknown activation {identifier!r}: not a Keras built-in, a "
      f"{PACKAGE} activation (e.g. 'squared_relu') or a registered "
      "'package>name' function (register it with "
      "@keras.saving.register_keras_serializable(package=...))")


@keras.saving.register_keras_serializable(package=PACKAGE)
class ParametricSwish(keras.layers.Layer):
  """Swish with a learnable slope: y = x * sigmoid(beta * x).

  beta starts at `beta_initializer` (1.0 = SiLU) and is trained, one value
  per channel (the last axis) or one for the whole layer.

  Shapes and dtypes: input [..., channels] -> output of the same shape, in
  `compute_dtype` (float16 under mixed_float16); beta is a float32 variable
  ([channels] or []) that Keras casts to the compute dtype inside `call`.

  Args:
    per_channel: one beta per channel (True) or a single scalar (False).
    beta_initializer: initializer for beta (a Keras initializer or name).
    **kwargs: Layer arguments (name, dtype, ...).
  """

  def __init__(self, *, per_channel: bool = True,
               beta_initializer: Any = "ones", **kwargs):
    super().__init__(**kwargs)
    self.per_channel = bool(per_channel)
    self.beta_initializer = keras.initializers.get(beta_initializer)
    self.supports_masking = True

  def build(self, input_shape):
    if self.per_channel and input_shape[-1] is None:
      raise ValueError("ParametricSwish(per_channel=True) needs a known last "
                       f"dimension, got input shape {input_shape}")
    shape = (input_shape[-1],) if self.per_channel else ()
    self.beta = self.add_weight(name="beta", shape=shape,
                                initializer=self.beta_initializer)

  def call(self, inputs):
    return inputs * ops.sigmoid(self.beta * inputs)

  def compute_output_shape(self, input_shape):
    return input_shape

  def get_config(self) -> dict:
    return {**super().get_config(), "per_channel": self.per_channel,
            "beta_initializer": keras.initializers.serialize(
                self.beta_initializer)}
