"""Lambda layers that survive save and load.

`keras.models.load_model` runs in safe mode by default (`safe_mode=True`).
What a saved `keras.layers.Lambda(fn)` needs to load again (Keras 3.15):

- `fn` registered with `@keras.saving.register_keras_serializable(...)`, its
  module imported before loading: loads with safe_mode=True (and False).
- `fn` a Python `lambda`: safe_mode=True raises ValueError ("... whose
  `function` is a Python lambda ..."); safe_mode=False loads it from its
  stored bytecode (same Python version only; it runs arbitrary code).
- `fn` a named `def`, not registered: fails in both modes with TypeError
  ("Could not locate function '<name>'"), unless passed in `custom_objects`.

So: name the function, register it, and import its module before
`load_model`. `lambda_layer` checks this when the model is built, instead of
when somebody tries to load it.
"""

from typing import Callable

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="trainer")
def l2_normalize(x):
  """Scales each vector along the last axis to unit L2 norm.

  Computed in float32 (a float16 sum of squares overflows at norms > 255)
  and returned in the input dtype.

  Args:
    x: float tensor [..., features].

  Returns:
    Tensor [..., features], dtype of `x`; an all-zero vector stays zero.
  """
  x32 = ops.cast(x, "float32")
  sum_sq = ops.sum(ops.square(x32), axis=-1, keepdims=True)
  return ops.cast(x32 * ops.rsqrt(ops.maximum(sum_sq, 1e-12)), x.dtype)


def _is_python_lambda(fn: Callable) -> bool:
  return getattr(fn, "__name__", None) == "<lambda>"


def lambda_layer(fn: Callable, **kwargs) -> keras.layers.Lambda:
  """A `keras.layers.Lambda(fn, **kwargs)` that loads with safe_mode=True.

  Args:
    fn: a function registered with
      `@keras.saving.register_keras_serializable(package=...)`, e.g.
      `trainer.layers.l2_normalize`. Shape and dtype as `fn` returns them.
    **kwargs: Lambda arguments (name, output_shape, arguments, ...).

  Returns:
    The Lambda layer.

  Raises:
    ValueError: `fn` is a Python lambda or not registered, so a saved model
      holding it would not load in safe mode.
  """
  if _is_python_lambda(fn):
    raise ValueError(
        "lambda_layer got a Python lambda; load_model refuses it in safe "
        "mode. Define a named function, decorate it with "
        "@keras.saving.register_keras_serializable(package='my_package') "
        "and pass that")
  name = keras.saving.get_registered_name(fn)
  if keras.saving.get_registered_object(name) is not fn:
    raise ValueError(
        f"lambda_layer got {name!r}, which is not registered, so a saved "
        "model could not find it; decorate it with "
        "@keras.saving.register_keras_serializable(package='my_package')")
  return keras.layers.Lambda(fn, **kwargs)
