"""Export a trained run for inference, quantized and not, with a report.

WORKDIR/config.json -> float32 model (trainer.models) <- latest checkpoint ->
`prepare` hook -> each format in WORKDIR/export/ -> each file loaded back and
run on the whole eval split -> report.json (size, accuracy, difference from
the float32 model). The model is float32 whatever policy the run trained
with (variables are float32 under every policy). Files are written to a
staging directory renamed to WORKDIR/export at the end: a failed export
leaves the previous WORKDIR/export, if any, as it was.

`tflite_int8` is full-integer with int8 input and output: images are
quantized by the input tensor's scale and zero point (1/255 and -128 for
images in [0, 1]), logits dequantized by the output's. It is calibrated on
`representative_batches` batches of REPRESENTATIVE_BATCH_SIZE training
images, shuffled with `config.seed`.
"""

import dataclasses
import json
import os
import shutil
import warnings
from typing import Callable, Iterator

import keras
import ml_collections
import numpy as np
import tensorflow as tf

from trainer import checkpoint as checkpoint_lib
from trainer import config as config_lib
from trainer import data as data_lib
from trainer import layers, models
from trainer.errors import ConfigError, DataError

FILES = {  # format name -> its file (or directory) in WORKDIR/export
    "keras": "model.keras", "saved_model": "saved_model",
    "keras_int8": "model_int8.keras", "keras_float8": "model_float8.keras",
    "keras_int4": "model_int4.keras",
    "tflite_float32": "model_float32.tflite",
    "tflite_float16": "model_float16.tflite",
    "tflite_dynamic_range": "model_dynamic_range.tflite",
    "tflite_int8": "model_int8.tflite"}
FORMATS = tuple(FILES)
REPRESENTATIVE_BATCH_SIZE = 32
SERVING_INPUT = "images"  # the SavedModel signature's input name


@dataclasses.dataclass(frozen=True)
class Restored:
  """A trained run rebuilt for export."""
  model: keras.Model  # float32, weights from `checkpoint`
  config: ml_collections.ConfigDict  # the run's resolved config
  source: data_lib.Source
  checkpoint: str  # the checkpoint path restored


def parse_formats(text: str) -> tuple[str, ...]:
  """`all` or comma-separated names from FORMATS; raises ConfigError."""
  names = [n.strip() for n in text.split(",") if n.strip()]
  if names == ["all"]:
    return FORMATS
  unknown = [n for n in names if n not in FILES]
  if unknown or not names:
    raise ConfigError(f"unknown export format {', '.join(unknown) or text!r}"
                      f"; use all or a comma-separated list of: "
                      f"{', '.join(FORMATS)}")
  return tuple(dict.fromkeys(names))


def restore(workdir: str) -> Restored:
  """Rebuilds the run's model in float32 and restores its latest checkpoint.

  Raises:
    ConfigError, DataError: no such run, or a checkpoint that does not fit.
  """
  if not os.path.isdir(workdir):
    raise DataError(f"workdir {workdir} does not exist; pass the --workdir "
                    "of a finished `launch.train` run")
  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    raise DataError(f"{path} not found: {workdir} holds no training run; "
                    "train first with `python -m launch.train`")
  try:
    with open(path, encoding="utf-8") as f:
      config = config_lib.with_defaults(json.load(f))
  except (ValueError, OSError) as e:
    raise DataError(f"cannot read {path}: {e}") from None
  checkpoint = tf.train.latest_checkpoint(os.path.join(workdir, "checkpoints"))
  if checkpoint is None:
    raise DataError(f"no checkpoint in {workdir}/checkpoints; train (or "
                    "resume) the run until it saves one")
  source = data_lib.load_source(config.data, config.seed)
  previous = keras.config.dtype_policy()
  keras.config.set_dtype_policy("float32")
  try:
    model = models.build_model(config.model, source.info)
  finally:
    keras.config.set_dtype_policy(previous)
  reader = tf.train.Checkpoint(model=checkpoint_lib.model_state(model))
  try:  # only the model: not the optimizer, step or input offset
    status = reader.restore(checkpoint).expect_partial()
    status.assert_existing_objects_matched()
  except (AssertionError, ValueError, tf.errors.OpError) as e:
    raise DataError(f"checkpoint {checkpoint} does not fit the model of "
                    f"{path}: {str(e).splitlines()[0]}") from None
  return Restored(model, config, source, checkpoint)


def prepare_for_export(model: keras.Model) -> keras.Model:
  """The default `prepare` hook: the restored model, unchanged.

  Every format and the float32 reference are made from what the hook
  returns: the place for a rewrite before saving (e.g. stripping pruning
  masks into plain weights).
  """
  return model


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


def quantize_keras(model: keras.Model, mode: str) -> tuple[keras.Model,
                                                           list[str]]:
  """`model.quantize(mode)` on a quantizable copy; returns it and the names
  of the layers it quantized. Raises RuntimeError if it quantized none."""
  copy = with_builtin_layers(model)
  with warnings.catch_warnings():  # "Layer X has no `quantize` method"
    warnings.simplefilter("ignore")
    copy.quantize(mode)
  names = [l.name for l in copy.layers
           if l.dtype_policy.quantization_mode == mode]
  if not names:
    raise RuntimeError(f"model.quantize({mode!r}) found no layer to quantize")
  return copy, names


def write_saved_model(model: keras.Model, path: str) -> None:
  """A SavedModel whose `serving_default` signature maps float32 `images`
  [batch, H, W, C] to float32 logits `output_0` [batch, num_classes]."""
  spec = tf.TensorSpec([None, *model.input_shape[1:]], tf.float32,
                       name=SERVING_INPUT)
  model.export(path, format="tf_saved_model", verbose=False,
               input_signature=[spec])


def tflite_model(saved_model: str, kind: str,
                 representative: Callable[[], Iterator[list]] | None = None
                ) -> bytes:
  """A SavedModel converted to TFLite: `kind` is `float32`; `float16`
  (float16 weights); `dynamic_range` (int8 weights, activations quantized
  at run time); `int8` (full integer, int8 input and output, calibrated on
  `representative`, which yields `[images float32 [b, H, W, C]]`)."""
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
  return converter.convert()


def representative_dataset(source: data_lib.Source, batches: int, seed: int
                          ) -> Callable[[], Iterator[list]]:
  """`batches` batches of REPRESENTATIVE_BATCH_SIZE training images."""
  ds = source.train.shuffle(10_000, seed=seed).batch(
      REPRESENTATIVE_BATCH_SIZE).take(batches)
  return lambda: ([images] for images, _ in ds.as_numpy_iterator())


def predictor(name: str, path: str) -> Callable[[np.ndarray], np.ndarray]:
  """Format `name` loaded from `path`, as a function from images float32
  [b, H, W, C] to logits float32 [b, classes]. TFLite runs whole batches
  (the input is resized to each batch), with int8 inputs quantized and
  int8 outputs dequantized by the tensors' scale and zero point."""
  if name.startswith("keras"):
    model = keras.models.load_model(path)
    return lambda x: keras.ops.convert_to_numpy(model(x, training=False))
  if name == "saved_model":
    serve = tf.saved_model.load(path).signatures["serving_default"]
    return lambda x: serve(**{SERVING_INPUT: tf.constant(x)})[
        "output_0"].numpy()
  with warnings.catch_warnings():  # tf.lite.Interpreter is deprecated
    warnings.simplefilter("ignore")
    interpreter = tf.lite.Interpreter(model_path=path)
  inp = interpreter.get_input_details()[0]
  out = interpreter.get_output_details()[0]
  shape = [None]

  def predict(x):
    if shape[0] != x.shape:
      interpreter.resize_tensor_input(inp["index"], x.shape)
      interpreter.allocate_tensors()
      shape[0] = x.shape
    if inp["dtype"] == np.int8:
      scale, zero = inp["quantization"]
      x = np.clip(np.round(x / scale + zero), -128, 127).astype(np.int8)
    interpreter.set_tensor(inp["index"], x)
    interpreter.invoke()
    y = interpreter.get_tensor(out["index"])
    if out["dtype"] == np.int8:
      scale, zero = out["quantization"]
      y = (y.astype(np.float32) - zero) * scale
    return y

  return predict


def _compare(logits: np.ndarray, reference: np.ndarray,
             labels: np.ndarray) -> dict:
  """Accuracy, and how far `logits` [n, classes] are from `reference`."""
  probs = [np.exp(z - z.max(1, keepdims=True)) for z in (logits, reference)]
  probs = [p / p.sum(1, keepdims=True) for p in probs]
  top, top_ref = logits.argmax(1), reference.argmax(1)
  return {"accuracy": float(np.mean(top == labels)),
          "max_abs_logit_diff": float(np.abs(logits - reference).max()),
          "max_abs_prob_diff": float(np.abs(probs[0] - probs[1]).max()),
          "agreement": float(np.mean(top == top_ref))}


def _size(path: str) -> int:
  if os.path.isfile(path):
    return os.path.getsize(path)
  return sum(os.path.getsize(os.path.join(d, f))
             for d, _, files in os.walk(path) for f in files)


def export(workdir: str, formats: tuple[str, ...] = FORMATS, *,
           representative_batches: int = 20,
           prepare: Callable[[keras.Model], keras.Model] = prepare_for_export
          ) -> dict:
  """Writes `formats` and report.json into WORKDIR/export; returns the report.

  A format that fails (a quantization Keras cannot apply, a converter error)
  is left out and reported with its error under `formats`.

  Raises:
    ConfigError, DataError: bad input, before anything is written.
  """
  formats = parse_formats(",".join(formats))
  if representative_batches < 1:
    raise ConfigError("--representative_batches must be a positive int, got "
                      f"{representative_batches}")
  run = restore(workdir)
  model = prepare(run.model)
  final = os.path.join(workdir, "export")
  staging = os.path.join(workdir, f".export.tmp-{os.getpid()}")
  shutil.rmtree(staging, ignore_errors=True)
  os.makedirs(staging)
  try:
    report = _export_into(staging, model, run, formats, representative_batches)
    with open(os.path.join(staging, "report.json"), "w", encoding="utf-8") as f:
      json.dump(report, f, indent=2)
    if os.path.exists(final):
      os.rename(final, f"{staging}.old")
    os.rename(staging, final)
  finally:
    shutil.rmtree(staging, ignore_errors=True)
    shutil.rmtree(f"{staging}.old", ignore_errors=True)
  return report


def _export_into(directory: str, model: keras.Model, run: Restored,
                 formats: tuple[str, ...], representative_batches: int
                ) -> dict:
  """Writes each format into `directory`, evaluates it, returns the report."""
  batch_size = int(run.config.data.eval_batch_size)
  batches = lambda: run.source.eval.batch(batch_size).as_numpy_iterator()
  labels = np.concatenate([y for _, y in batches()])
  reference = np.concatenate([keras.ops.convert_to_numpy(
      model(x, training=False)) for x, _ in batches()])
  saved_model = os.path.join(directory, FILES["saved_model"])
  if any(f == "saved_model" or f.startswith("tflite") for f in formats):
    write_saved_model(model, saved_model)
  rows = {}
  for name in formats:
    path = os.path.join(directory, FILES[name])
    row = rows[name] = {"file": FILES[name]}
    try:
      if name == "keras":
        model.save(path)
      elif name.startswith("keras_"):
        quantized, row["quantized_layers"] = quantize_keras(model, name[6:])
        quantized.save(path)
      elif name.startswith("tflite_"):
        representative = representative_dataset(
            run.source, representative_batches, run.config.seed
        ) if name == "tflite_int8" else None
        with open(path, "wb") as f:
          f.write(tflite_model(saved_model, name[7:], representative))
      predict = predictor(name, path)
      logits = np.concatenate([predict(x) for x, _ in batches()])
    except Exception as e:  # pylint: disable=broad-except
      row["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0]}"
      if os.path.isfile(path):
        os.remove(path)
      continue
    row.update(bytes=_size(path), **_compare(logits, reference, labels))
  if "saved_model" not in formats:
    shutil.rmtree(saved_model, ignore_errors=True)
  return {
      "checkpoint": run.checkpoint, "model": run.config.model.name,
      "trained_policy": run.config.precision.policy,
      "eval_examples": len(labels),
      "float32_accuracy": float(np.mean(reference.argmax(1) == labels)),
      "compared_with": "the float32 Keras model restored from the checkpoint"
                       " (max |difference| over the eval set)",
      "representative_examples": min(
          representative_batches * REPRESENTATIVE_BATCH_SIZE,
          run.source.info.num_train or 1 << 62),
      "tflite_int8_io": "int8 (quantized by the tensors' scale, zero point)",
      "formats": rows}


def format_table(report: dict) -> str:
  """The report as a fixed-width text table, one row per format."""
  lines = [f"{'format':<22}{'bytes':>10}{'accuracy':>10}"
           f"{'max|dlogit|':>13}{'agreement':>11}"]
  for name, row in report["formats"].items():
    if "error" in row:
      lines.append(f"{name:<22}  failed: {row['error']}")
      continue
    lines.append(f"{name:<22}{row['bytes']:>10}{row['accuracy']:>10.4f}"
                 f"{row['max_abs_logit_diff']:>13.2e}{row['agreement']:>11.4f}")
  lines.append(f"float32 reference accuracy {report['float32_accuracy']:.4f} "
               f"on {report['eval_examples']} eval examples")
  return "\n".join(lines)
