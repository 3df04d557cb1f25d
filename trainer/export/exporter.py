"""Export a trained run of any task for inference, quantized and not, with a
report.

WORKDIR/config.json -> the run's task (`task`, trainer/task.py) -> its model
built in float32 <- latest checkpoint (trainer/checkpoint/restore.py) -> `prepare` hook -> each format in
WORKDIR/export/ (trainer/export/formats.py) -> each file loaded back and run
on the task's whole eval_data() -> report.json: size, the task's metrics
(fresh from build_metrics()), the largest |output difference| from the
float32 model and, for classification-shaped outputs ([..., k >= 2]), the
fraction of argmax predictions that agree with it (metrics are updated with
(labels, model outputs): a task's compute_loss is not run, so a task whose
compute_loss returns other predictions is measured on the model's outputs).
The model is float32
whatever policy the run trained with (variables are float32 under every
policy). The SavedModel's `serving_default` follows the model's own input and
output names, dtypes and shapes (trainer/export/signature.py). A format that cannot
apply to the model is reported as skipped with the reason, one that fails
with its error. Files are written to a staging directory renamed to
WORKDIR/export at the end: a failed export leaves the previous
WORKDIR/export, if any, as it was.

`tflite_int8` is full-integer: float inputs and outputs are int8 (quantized
by the tensor's scale and zero point, e.g. 1/255 and -128 for images in
[0, 1]); integer inputs (token ids) stay integer: they index, they have no
scale. It is calibrated on `representative_batches` batches of
REPRESENTATIVE_BATCH_SIZE training examples from train_data(), shuffled
with `config.seed`.
"""

import json
import os
import shutil
from typing import Callable, Iterator

import keras
import numpy as np
import tensorflow as tf

from trainer.export import signature as signature_lib
from trainer import task as task_lib
from trainer.errors import ConfigError, DataError, first_line
from trainer.export.formats import (FILES, FORMATS, Skipped, check_saveable,
                                    predictor, quantize_keras, tflite_model)
from trainer.checkpoint.restore import Restored, float32_policy, restore

REPRESENTATIVE_BATCH_SIZE = 32
SHUFFLE_BUFFER = 10_000  # representative examples are drawn from this many


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


def prepare_for_export(model: keras.Model) -> keras.Model:
  """The default `prepare` hook: the restored model, unchanged.

  Every format and the float32 reference are made from what the hook
  returns: the place for a rewrite before saving (e.g. stripping pruning
  masks into plain weights).
  """
  return model


def representative_dataset(train: task_lib.Examples,
                           signature: signature_lib.Signature, batches: int,
                           seed: int) -> Callable[[], Iterator[dict]]:
  """`batches` batches of REPRESENTATIVE_BATCH_SIZE training examples,
  shuffled with `seed`, as {input name: array}."""
  ds = train.dataset.shuffle(SHUFFLE_BUFFER, seed=seed).batch(
      REPRESENTATIVE_BATCH_SIZE).take(batches)
  return lambda: (signature.named(batch[0])
                  for batch in ds.as_numpy_iterator())


def export(workdir: str, formats: tuple[str, ...] = FORMATS, *,
           representative_batches: int = 20,
           prepare: Callable[[keras.Model], keras.Model] = prepare_for_export
          ) -> dict:
  """Writes `formats` and report.json into WORKDIR/export; returns the report.

  A format that cannot apply to the model is left out and reported with
  `skipped` (the reason); one that fails (a converter error) with `error`.

  Raises:
    ConfigError, DataError: bad input, before anything is written.
  """
  formats = parse_formats(",".join(formats))
  if representative_batches < 1:
    raise ConfigError("--representative_batches must be a positive int, got "
                      f"{representative_batches}")
  with float32_policy():
    return _export(workdir, formats, representative_batches, prepare)


def _export(workdir: str, formats: tuple[str, ...],
            representative_batches: int,
            prepare: Callable[[keras.Model], keras.Model]) -> dict:
  """export(), under the float32 policy."""
  run = restore(workdir)
  if not task_lib.has_evaluation(run.task):
    raise ConfigError(
        f"export runs the task's main model on eval_data() and reports how "
        f"each format does on it, but {type(run.task).__name__} has no "
        "eval_data(); add one that gives the main model's inputs to export")
  evals = task_lib.examples(run.task.eval_data(), "eval_data")
  train = (task_lib.examples(run.task.train_data(), "train_data")
           if "tflite_int8" in formats else None)
  model = prepare(run.model)
  final = os.path.join(workdir, "export")
  staging = os.path.join(workdir, f".export.tmp-{os.getpid()}")
  shutil.rmtree(staging, ignore_errors=True)
  os.makedirs(staging)
  try:
    report = _export_into(staging, model, run, formats, evals=evals,
                          train=train,
                          representative_batches=representative_batches)
    with open(os.path.join(staging, "report.json"), "w", encoding="utf-8") as f:
      json.dump(report, f, indent=2)
    if os.path.exists(final):
      os.rename(final, f"{staging}.old")
    os.rename(staging, final)
  finally:
    shutil.rmtree(staging, ignore_errors=True)
    shutil.rmtree(f"{staging}.old", ignore_errors=True)
  return report


class _Evaluation:
  """Runs a format over the task's eval split, batch by batch, against the
  float32 model's outputs (held in memory; the inputs are read again for
  each format, so eval_data() must give the same examples in the same order
  each time it is read, as arrays and unshuffled datasets do)."""

  def __init__(self, run: Restored, model: keras.Model,
               evals: task_lib.Examples):
    self.task = run.task
    self.dataset = evals.dataset.batch(int(run.config.data.eval_batch_size))
    self.reference, self.examples, self.signature = [], 0, None
    for batch in self.dataset.as_numpy_iterator():
      try:
        outputs = model(batch[0], training=False)
      except (ValueError, TypeError) as e:  # Keras: the input does not fit
        raise ConfigError(
            f"export runs the task's main model ({model.name!r}, the first "
            "that build_model() returns) on eval_data()'s x and compares "
            f"each format with it, but the model does not take it "
            f"({first_line(e)}); only a main model that takes eval_data()'s "
            "x can be exported") from None
      outputs = tf.nest.map_structure(keras.ops.convert_to_numpy, outputs)
      if self.signature is None:
        self.signature = signature_lib.of_model(model, batch[0], outputs)
      self.reference.append(tf.nest.flatten(outputs))
      self.examples += len(self.reference[-1][0])
    if self.signature is None:
      raise DataError("eval_data() returned no examples: the export is "
                      "evaluated on them")

  def run(self, predict: Callable[[object], list]) -> dict:
    """`metrics`: the task's metrics (fresh from build_metrics()) of
    `predict` over the eval split; `max_abs_diff`: the largest |difference|
    from the float32 outputs over every output and example; `agreement`: the
    fraction of examples whose argmax (last axis) agrees with the float32
    model's on every classification-shaped output ([..., k >= 2], float),
    if there is one."""
    metrics = self.task.build_metrics()
    diff, agree = 0.0, []
    for batch, reference in zip(self.dataset.as_numpy_iterator(),
                                self.reference):
      x, y, weight = keras.utils.unpack_x_y_sample_weight(tuple(batch))
      flat = predict(x)
      y_pred = tf.nest.map_structure(lambda t: tf.cast(t, tf.float32),
                                     self.signature.pack_outputs(flat))
      for metric in metrics:
        metric.update_state(y, y_pred, sample_weight=weight)
      same = None
      for out, ref in zip(flat, reference):
        diff = max(diff, float(np.abs(out.astype(np.float64) - ref).max()))
        if ref.ndim >= 2 and ref.shape[-1] >= 2 and ref.dtype.kind == "f":
          hit = (out.argmax(-1) == ref.argmax(-1)).reshape(len(ref), -1)
          same = hit.all(1) if same is None else same & hit.all(1)
      if same is not None:
        agree.append(same)
    row = {"metrics": {m.name: _number(m.result()) for m in metrics},
           "max_abs_diff": diff}
    if agree:
      row["agreement"] = float(np.concatenate(agree).mean())
    return row


def _number(value):
  """A metric result as a float, a list of floats, or a dict of them."""
  if isinstance(value, dict):
    return {k: _number(v) for k, v in value.items()}
  array = np.asarray(keras.ops.convert_to_numpy(value), dtype=np.float64)
  return array.item() if array.size == 1 else array.tolist()


def _write(name: str, path: str, model: keras.Model, saved_model: str,
           representative: Callable[[], Iterator[dict]] | None) -> dict:
  """Writes format `name` to `path`; returns what the report says of it."""
  row = {}
  if name == "keras":
    check_saveable(model)
    model.save(path)
  elif name.startswith("keras_"):
    check_saveable(model)
    quantized, row["quantized_layers"] = quantize_keras(model, name[6:])
    quantized.save(path)
  elif name.startswith("tflite_"):
    content = tflite_model(saved_model, name[7:], representative
                           if name == "tflite_int8" else None)
    with open(path, "wb") as f:
      f.write(content)
  return row


def _export_into(directory: str, model: keras.Model, run: Restored,
                 formats: tuple[str, ...], *, evals: task_lib.Examples,
                 train: task_lib.Examples | None,
                 representative_batches: int) -> dict:
  """Writes each format into `directory`, evaluates it, returns the report."""
  evaluation = _Evaluation(run, model, evals)
  signature = evaluation.signature
  saved_model = os.path.join(directory, FILES["saved_model"])
  if any(f == "saved_model" or f.startswith("tflite") for f in formats):
    signature_lib.write_saved_model(model, signature, saved_model,
                                    run.config.data.get("class_names", ()))
  float32 = evaluation.run(
      lambda x: [keras.ops.convert_to_numpy(t) for t in tf.nest.flatten(
          model(x, training=False))])
  representative = train and representative_dataset(
      train, signature, representative_batches, run.config.seed)
  rows = {}
  for name in formats:
    path = os.path.join(directory, FILES[name])
    row = rows[name] = {"file": FILES[name]}
    try:
      written = _write(name, path, model, saved_model, representative)
      row.update(bytes=_size(path), **written,
                 **evaluation.run(predictor(name, path, signature)))
    except Skipped as e:
      row["skipped"] = str(e)
    except Exception as e:  # pylint: disable=broad-except
      row["error"] = first_line(e)
    if "skipped" in row or "error" in row:
      for key in set(row) - {"file", "skipped", "error"}:
        del row[key]
      if os.path.isfile(path):
        os.remove(path)
  if "saved_model" not in formats:
    shutil.rmtree(saved_model, ignore_errors=True)
  report = {
      "checkpoint": run.checkpoint, "task": run.config.task,
      "model": model.name, "trained_policy": run.config.precision.policy,
      "signature": signature.describe(),
      "eval_examples": evaluation.examples,
      "float32_metrics": float32["metrics"],
      "compared_with": "the float32 Keras model restored from the checkpoint"
                       " (max |difference| over the eval set)"}
  if run.config.data.get("class_names"):  # output i is class_names[i]
    report["class_names"] = list(run.config.data.class_names)
    if "saved_model" in formats:  # `classify`: the top class's name
      reason = signature_lib.classes_reason(signature,
                                            run.config.data.class_names)
      report["saved_model_signatures"] = ["serving_default"] + (
          [] if reason else ["classify"])
      if reason:
        report["classify_skipped"] = reason
  if train:
    report["representative_examples"] = min(
        representative_batches * REPRESENTATIVE_BATCH_SIZE,
        train.size or 1 << 62)
    report["tflite_int8_io"] = ("float inputs and outputs int8 (quantized by "
                                "the tensor's scale, zero point); integer "
                                "inputs as they are")
  report["formats"] = rows
  return report


def _size(path: str) -> int:
  if os.path.isfile(path):
    return os.path.getsize(path)
  return sum(os.path.getsize(os.path.join(d, f))
             for d, _, files in os.walk(path) for f in files)


def format_table(report: dict) -> str:
  """The report as a fixed-width text table, one row per format, a column
  per (scalar) metric of the task."""
  names = [k for k, v in report["float32_metrics"].items()
           if isinstance(v, float)]
  width = max([10, *(len(n) + 2 for n in names)])
  lines = [f"{'format':<22}{'bytes':>10}" + "".join(
      f"{n:>{width}}" for n in names) + f"{'max|diff|':>12}{'agreement':>11}"]
  for name, row in report["formats"].items():
    if "error" in row or "skipped" in row:
      what = "failed" if "error" in row else "skipped"
      lines.append(f"{name:<22}  {what}: {row.get('error', row.get('skipped'))}")
      continue
    agreement = row.get("agreement")
    lines.append(
        f"{name:<22}{row['bytes']:>10}" + "".join(
            f"{row['metrics'][n]:>{width}.4f}" for n in names) +
        f"{row['max_abs_diff']:>12.2e}" +
        (f"{agreement:>11.4f}" if agreement is not None else f"{'-':>11}"))
  reference = ", ".join(f"{n} {v:.4f}" for n, v in
                        report["float32_metrics"].items()
                        if isinstance(v, float))
  lines.append(f"float32 reference: {reference} on {report['eval_examples']} "
               "eval examples")
  return "\n".join(lines)
