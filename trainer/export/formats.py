"""Each export format: how it is written from the float32 model, and how it
is loaded back and run (trainer/export/exporter.py evaluates and reports them).

A format that cannot apply to a model raises `Skipped` with the reason:
Keras quantization that finds no layer it can quantize, a model Keras cannot
copy for quantizing, TFLite conversion of ops TFLite has no kernel for.
Every other exception is a failure of that format.
"""

import contextlib
import os
import re
import sys
import tempfile
import warnings
from typing import Callable, Iterator

import keras
import numpy as np
import tensorflow as tf

from trainer import compat
from trainer import layers
from trainer.errors import first_line
from trainer.export.signature import Signature

FILES = {  # format name -> its file (or directory) in WORKDIR/export
    "keras": "model.keras", "saved_model": "saved_model",
    "keras_int8": "model_int8.keras", "keras_float8": "model_float8.keras",
    "keras_int4": "model_int4.keras",
    "tflite_float32": "model_float32.tflite",
    "tflite_float16": "model_float16.tflite",
    "tflite_dynamic_range": "model_dynamic_range.tflite",
    "tflite_int8": "model_int8.tflite"}
FORMATS = tuple(FILES)
QUANTIZABLE = "Dense, EinsumDense and Embedding"  # Keras 3.15 model.quantize


class Skipped(Exception):
  """The format cannot apply to this model; the message says why."""


def check_saveable(model: keras.Model) -> None:
  """Raises ValueError naming each layer (and its class) that a `.keras`
  file could not load back: a class that is neither Keras' own nor
  registered, so `keras.models.load_model` cannot find it.

  The fix is the user's: `@keras.saving.register_keras_serializable()` on
  the class, and a `get_config()` that returns its constructor arguments.
  """
  unknown = []
  for layer in [model, *compat.all_layers(model)]:
    cls = type(layer)
    if cls.__module__.split(".")[0] == "keras":
      continue
    if keras.saving.get_registered_object(
        keras.saving.get_registered_name(cls)) is cls:
      continue
    unknown.append(f"{layer.name!r} ({cls.__module__}.{cls.__qualname__})")
  if unknown:
    raise ValueError(
        f"{', '.join(unknown)} cannot be loaded back from a .keras file: "
        "decorate the class with @keras.saving.register_keras_serializable("
        "package=...) and give it get_config() returning its constructor "
        "arguments")


def with_builtin_layers(model: keras.Model) -> keras.Model:
  """A copy of `model` with `trainer.layers.DenseLayer` as `keras.layers.Dense`.

  `model.quantize` only reaches layers that implement `quantize` (Keras'
  Dense, EinsumDense, Embedding); it skips custom layers with a warning.
  DenseLayer computes exactly what Dense does with the same weights, so the
  copy has the same outputs and is quantizable.
  """

  def clone(layer):
    if isinstance(layer, layers.DenseLayer):
      return keras.layers.Dense(layer.units, activation=layer.activation,
                                use_bias=layer.use_bias, name=layer.name)
    return layer.__class__.from_config(layer.get_config())

  copy = keras.models.clone_model(model, clone_function=clone)
  for layer in model.layers:  # weights, not dropout seed states (renamed)
    if layer.weights:
      copy.get_layer(layer.name).set_weights(layer.get_weights())
  return copy


def _copy(model: keras.Model) -> keras.Model:
  """with_builtin_layers(model) for a Functional or Sequential model; for a
  subclassed one (clone_model cannot take a clone function), the model saved
  and loaded back.

  Raises:
    Skipped: neither works.
  """
  try:
    return with_builtin_layers(model)
  except ValueError:
    pass
  with tempfile.TemporaryDirectory() as folder:
    path = os.path.join(folder, "copy.keras")
    try:
      model.save(path)
      return keras.models.load_model(path)
    except Exception as e:  # pylint: disable=broad-except
      raise Skipped("model.quantize works on a copy, and this model can "
                    "neither be cloned nor saved and loaded "
                    f"({first_line(e)})") from None


def quantize_keras(model: keras.Model, mode: str) -> tuple[keras.Model,
                                                           list[str]]:
  """`model.quantize(mode)` on a quantizable copy; returns it and the names
  of the layers it quantized.

  Raises:
    Skipped: the model cannot be copied, or has no layer Keras quantizes.
  """
  copy = _copy(model)
  with warnings.catch_warnings():  # "Layer X has no `quantize` method"
    warnings.simplefilter("ignore")
    copy.quantize(mode)
  names = [l.name for l in copy.layers
           if l.dtype_policy.quantization_mode == mode]
  if not names:
    raise Skipped(f"model.quantize({mode!r}) found no layer to quantize "
                  f"(Keras quantizes {QUANTIZABLE}; other layers stay float)")
  return copy, names


def tflite_model(saved_model: str, kind: str,
                 representative: Callable[[], Iterator[dict]] | None = None
                ) -> bytes:
  """A SavedModel converted to TFLite: `kind` is `float32`; `float16`
  (float16 weights); `dynamic_range` (int8 weights, activations quantized
  at run time); `int8` (full integer, calibrated on `representative`, which
  yields {input name: array}: float inputs and outputs become int8,
  integer inputs such as token ids stay as they are).

  Raises:
    Skipped: the model has ops TFLite has no kernel for.
  """
  converter = tf.lite.TFLiteConverter.from_saved_model(saved_model)
  if kind != "float32":
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
  if kind == "float16":
    converter.target_spec.supported_types = [tf.float16]
  elif kind == "int8":
    converter.representative_dataset = representative
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = tf.int8
    converter.inference_output_type = tf.int8
  try:
    with warnings.catch_warnings(), _native_stderr_muted():
      warnings.simplefilter("ignore")  # calibration's tf.lite.Interpreter
      return converter.convert()
  except Exception as e:  # pylint: disable=broad-except
    reason = unsupported_ops(str(e))
    if reason:
      raise Skipped(reason) from None
    raise


@contextlib.contextmanager
def _native_stderr_muted():
  """What native code writes to file descriptor 2 meanwhile is dropped: the
  converter prints its diagnostics there as `error: ...` lines, also for a
  format that is only skipped; the exception it raises carries them."""
  sys.stderr.flush()
  saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
  try:
    os.dup2(devnull, 2)
    yield
  finally:
    os.dup2(saved, 2)
    os.close(saved)
    os.close(devnull)


def unsupported_ops(message: str) -> str | None:
  """The reason to skip, if converter error `message` says the model has
  ops TFLite lacks (TF Select or custom ops), else None."""
  select = re.search(r"TF Select ops: (.+)", message)
  if select:
    return (f"TFLite has no built-in op for {select.group(1).strip()} (it "
            "would need TF Select ops, the Flex delegate, at run time)")
  custom = re.search(r"Custom ops: (.+)", message)
  if custom:
    return f"TFLite has no op for {custom.group(1).strip()}"
  quantize = re.search(r"[Qq]uantization (?:is )?not (?:yet )?supported for "
                       r"op:? '?([\w.]+)", message)
  if quantize:
    return f"TFLite cannot quantize the op {quantize.group(1)} to int8"
  return None


def predictor(name: str, path: str, signature: Signature
             ) -> Callable[[object], list[np.ndarray]]:
  """Format `name` loaded from `path`, as a function from one batch of the
  task's x to the model's outputs, flat, in `signature.outputs` order.
  TFLite runs whole batches (the inputs are resized to each batch); its
  int8 inputs are quantized, its int8 outputs dequantized, by each tensor's
  scale and zero point."""
  if name.startswith("keras"):
    model = keras.models.load_model(path)
    return lambda x: [keras.ops.convert_to_numpy(t) for t in tf.nest.flatten(
        model(x, training=False))]
  if name == "saved_model":
    serve = tf.saved_model.load(path).signatures["serving_default"]
    return lambda x: _in_order(serve(**{
        n: tf.constant(a) for n, a in signature.named(x).items()}),
                               signature)
  with warnings.catch_warnings():  # tf.lite.Interpreter is deprecated
    warnings.simplefilter("ignore")
    interpreter = tf.lite.Interpreter(model_path=path)
  runner = interpreter.get_signature_runner("serving_default")
  inputs, outputs = runner.get_input_details(), runner.get_output_details()

  def predict(x):
    feed = {}
    for n, a in signature.named(x).items():
      dtype, (scale, zero) = inputs[n]["dtype"], inputs[n]["quantization"]
      if scale and np.issubdtype(a.dtype, np.floating):
        info = np.iinfo(dtype)
        a = np.clip(np.round(a / scale + zero), info.min, info.max)
      feed[n] = a.astype(dtype)
    result = runner(**feed)
    for n, y in result.items():
      scale, zero = outputs[n]["quantization"]
      if scale:
        result[n] = (y.astype(np.float32) - zero) * scale
    return _in_order(result, signature)

  return predict


def _in_order(outputs: dict, signature: Signature) -> list[np.ndarray]:
  return [np.asarray(outputs[n]) for n in signature.outputs]
