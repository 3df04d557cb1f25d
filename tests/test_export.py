"""Export and post-training quantization of a trained run (trainer/export/exporter.py,
launch/export.py): every format loads, computes what the float32 model
computes within its format's tolerance, and the report says what we measure.
"""

import json
import os
import shutil

import keras
import numpy as np
import pytest
import tensorflow as tf

import trainer  # registers trainer.layers for keras.models.load_model
from configs import digits
from conftest import run_module, run_modules
from tests.helpers import image_files
from trainer.export import exporter as export_lib
from trainer import layers
from trainer.export import formats as export_formats
from trainer.tasks import models
from trainer.checkpoint import restore as restore_lib
from trainer import run as run_lib
from trainer import task as task_lib
from trainer.data import DataInfo
from trainer.errors import UserError

del trainer
pytestmark = pytest.mark.filterwarnings(
    "ignore:.*tf.lite.Interpreter is deprecated:UserWarning")

# format -> (max |logit - float32 logit| over the eval set, max accuracy
# drop in points). Measured on this 200-step run: int8 0.13, float8 0.56,
# int4 0.83, TFLite float16 2.6e-3, dynamic range 0.07, full int8 0.28.
TOLERANCE = {
    "keras": (1e-6, 0.0),
    "saved_model": (1e-5, 0.0),
    "keras_int8": (0.6, 2.0),
    "keras_float8": (2.0, 3.0),
    "keras_int4": (2.5, 4.0),
    "tflite_float32": (1e-4, 0.0),
    "tflite_float16": (2e-2, 0.5),
    "tflite_dynamic_range": (0.6, 2.0),
    "tflite_int8": (0.8, 3.0),
}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """A digits run of 200 steps (97% eval accuracy)."""
  config = digits.get_config()
  config.train.steps = 200
  config.distribution.strategy = "one_device"
  config.callbacks.progress_bar = False
  config.callbacks.tensorboard = False
  path = tmp_path_factory.mktemp("export") / "run"
  result = run_lib.run(config, str(path))
  assert result.steps == 200
  path.joinpath("final_eval_accuracy").write_text(
      str(result.logs["eval/accuracy"]))
  return path


@pytest.fixture(scope="module")
def report(workdir):
  return export_lib.export(str(workdir))


@pytest.fixture(scope="module")
def eval_data(workdir, report):
  """(images [300, 8, 8, 1], labels [300], float32 logits [300, 10])."""
  del report  # exported first, so restoring here cannot interfere
  restored = restore_lib.restore(str(workdir))
  evals = task_lib.examples(restored.task.eval_data(), "eval_data")
  x, y = (np.concatenate(a) for a in zip(
      *evals.dataset.batch(1000).as_numpy_iterator()))
  return x, y, keras.ops.convert_to_numpy(restored.model(x, training=False))


def copy_run(src, dst):
  """The run's config and checkpoints, without its export."""
  dst.mkdir()
  shutil.copy(src / "config.json", dst)
  shutil.copytree(src / "checkpoints", dst / "checkpoints")
  return dst


def tflite_logits(path, x):
  """One example at a time (the test's own way, unlike the library's
  batches), with the int8 input/output quantization applied by hand."""
  interpreter = tf.lite.Interpreter(model_path=str(path))
  interpreter.allocate_tensors()
  inp = interpreter.get_input_details()[0]
  out = interpreter.get_output_details()[0]
  assert list(inp["shape_signature"]) == [-1, 8, 8, 1]
  rows = []
  for image in x:
    image = image[None]
    if inp["dtype"] == np.int8:
      scale, zero = inp["quantization"]
      image = np.clip(np.round(image / scale) + zero, -128, 127)
    interpreter.set_tensor(inp["index"], image.astype(inp["dtype"]))
    interpreter.invoke()
    logits = interpreter.get_tensor(out["index"])[0].astype(np.float32)
    if out["dtype"] == np.int8:
      scale, zero = out["quantization"]
      logits = (logits - zero) * scale
    rows.append(logits)
  return np.stack(rows), inp["dtype"], out["dtype"]


def measured_logits(name, path, x):
  if name == "saved_model":
    serve = tf.saved_model.load(str(path)).signatures["serving_default"]
    return serve(images=tf.constant(x))["logits"].numpy()
  if name.startswith("tflite"):
    return tflite_logits(path, x)[0]
  model = keras.models.load_model(path)
  return keras.ops.convert_to_numpy(model(x, training=False))


def test_every_format_is_written_and_reported(workdir, report):
  export = workdir / "export"
  assert sorted(report["formats"]) == sorted(export_lib.FORMATS)
  for name, row in report["formats"].items():
    assert "error" not in row and "skipped" not in row, (name, row)
    assert (export / row["file"]).exists()
    assert row["bytes"] > 0
  on_disk = json.loads((export / "report.json").read_text())
  assert on_disk == report
  assert report["eval_examples"] == 300
  assert report["checkpoint"].endswith("ckpt-200")
  assert not [p for p in os.listdir(workdir) if p.startswith(".export")]


def test_float32_reference_is_the_trained_model(workdir, report, eval_data):
  _, y, logits = eval_data
  final = float((workdir / "final_eval_accuracy").read_text())
  assert report["float32_metrics"] == {
      "accuracy": pytest.approx(final, abs=1e-6)}
  assert np.mean(logits.argmax(1) == y) == pytest.approx(final, abs=1e-6)


@pytest.mark.parametrize("name", export_lib.FORMATS)
def test_format_loads_and_is_close_to_float32(name, workdir, report,
                                              eval_data):
  x, y, reference = eval_data
  logits = measured_logits(name, workdir / "export" / export_lib.FILES[name],
                           x)
  assert logits.shape == (300, 10) and logits.dtype == np.float32
  max_diff, max_drop = TOLERANCE[name]
  assert np.abs(logits - reference).max() <= max_diff
  accuracy = np.mean(logits.argmax(1) == y)
  assert accuracy >= np.mean(reference.argmax(1) == y) - max_drop / 100
  row = report["formats"][name]
  # The library evaluates in batches of 256, this test one by one (TFLite)
  # or all at once: the same predictions, so the same accuracy (the task's
  # metric counts in float32).
  assert row["metrics"] == {"accuracy": pytest.approx(accuracy, abs=1e-6)}
  assert row["max_abs_diff"] == pytest.approx(
      np.abs(logits - reference).max(), rel=1e-3, abs=1e-5)


def test_saved_model_signature_is_float32_images_to_logits(workdir, report):
  loaded = tf.saved_model.load(str(workdir / "export" / "saved_model"))
  serve = loaded.signatures["serving_default"]
  _, inputs = serve.structured_input_signature
  assert list(inputs) == ["images"]  # the model's own input and output names
  assert inputs["images"].shape.as_list() == [None, 8, 8, 1]
  assert inputs["images"].dtype == tf.float32
  assert list(serve.structured_outputs) == ["logits"]
  assert serve.structured_outputs["logits"].shape.as_list() == [None, 10]
  assert serve.structured_outputs["logits"].dtype == tf.float32
  assert report["signature"] == {
      "inputs": {"images": {"dtype": "float32", "shape": [None, 8, 8, 1]}},
      "outputs": {"logits": {"dtype": "float32", "shape": [None, 10]}}}


def test_quantized_files_are_smaller_and_int8_tflite_is_integer(
    workdir, report, eval_data):
  rows = report["formats"]
  assert rows["tflite_int8"]["bytes"] < rows["tflite_float32"]["bytes"] / 2
  assert rows["tflite_float16"]["bytes"] < rows["tflite_float32"]["bytes"]
  assert rows["keras_int8"]["bytes"] < rows["keras"]["bytes"] / 2
  # Every Dense layer is quantized, the custom DenseLayer ones included.
  assert rows["keras_int8"]["quantized_layers"] == ["dense_0", "dense_1",
                                                    "logits"]
  _, in_dtype, out_dtype = tflite_logits(
      workdir / "export" / "model_int8.tflite", eval_data[0][:1])
  assert in_dtype == np.int8 and out_dtype == np.int8


def test_prepare_hook_runs_before_saving(workdir, tmp_path):
  run = copy_run(workdir, tmp_path / "run")
  seen = []

  def prepare(model):
    seen.append(model.name)
    model.get_layer("logits").bias.assign(np.arange(10, dtype=np.float32))
    return model

  report = export_lib.export(str(run), ("keras",), prepare=prepare)
  assert seen == ["mlp"]
  saved = keras.models.load_model(run / "export" / "model.keras")
  np.testing.assert_array_equal(saved.get_layer("logits").bias.numpy(),
                                np.arange(10))
  assert report["formats"]["keras"]["max_abs_diff"] == 0.0
  assert sorted(os.listdir(run / "export")) == ["model.keras", "report.json"]


def test_a_failed_export_leaves_the_previous_one(workdir, tmp_path):
  run = copy_run(workdir, tmp_path / "run")
  export_lib.export(str(run), ("keras",))
  before = sorted(os.listdir(run / "export"))

  def broken(model):
    model.save(str(run / "unused.keras"))
    raise RuntimeError("boom")

  with pytest.raises(RuntimeError, match="boom"):
    export_lib.export(str(run), ("keras", "tflite_float32"), prepare=broken)
  assert sorted(os.listdir(run / "export")) == before
  assert not [p for p in os.listdir(run) if p.startswith(".export")]


def test_a_failing_format_is_reported_and_left_out(workdir, tmp_path,
                                                   monkeypatch):
  run = copy_run(workdir, tmp_path / "run")

  def unsupported(*args):
    raise ValueError("this converter cannot\nsecond line")

  monkeypatch.setattr(export_lib, "tflite_model", unsupported)
  report = export_lib.export(str(run), ("keras", "tflite_float16"))
  assert report["formats"]["tflite_float16"] == {
      "file": "model_float16.tflite",
      "error": "ValueError: this converter cannot"}
  assert report["formats"]["keras"]["metrics"]["accuracy"] > 0.9
  assert sorted(os.listdir(run / "export")) == ["model.keras", "report.json"]
  assert ("tflite_float16", "failed:", "ValueError:") in [
      tuple(line.split()[:3])
      for line in export_lib.format_table(report).splitlines()]


def test_custom_dense_layers_are_quantized_through_keras_dense():
  config = digits.get_config()
  config.model.dropout = 0.1  # seed generators are not copied, weights are
  info = DataInfo((8, 8, 1), 10, None, None)
  model = models.build_model(config.model, info)
  x = np.random.default_rng(0).uniform(size=(16, 8, 8, 1)).astype("float32")
  builtin = export_formats.with_builtin_layers(model)
  assert not [l for l in builtin.layers if isinstance(l, layers.DenseLayer)]
  np.testing.assert_array_equal(builtin(x), model(x))
  quantized, names = export_formats.quantize_keras(model, "int8")
  assert names == ["dense_0", "dense_1", "logits"]
  np.testing.assert_allclose(quantized(x), model(x), atol=0.1)


@pytest.mark.parametrize("case,message", [
    ("missing", "does not exist"),
    ("no_config", "config.json not found"),
    ("no_checkpoint", "no checkpoint in"),
    ("bad_format", "unknown export format 'onnx'"),
    ("bad_task", "task 'no_such_module:Task': cannot import 'no_such_module'"),
])
def test_bad_input_raises_before_writing(case, message, workdir, tmp_path):
  run = tmp_path / "run"
  if case != "missing":
    copy_run(workdir, run)
  if case == "no_config":
    (run / "config.json").unlink()
  if case == "bad_task":
    saved = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps(
        {**saved, "task": "no_such_module:Task"}))
  if case == "no_checkpoint":
    shutil.rmtree(run / "checkpoints")
  with pytest.raises(UserError, match=message):
    export_lib.export(str(run), ("keras", "onnx") if case == "bad_format"
                      else ("keras",))
  assert not run.exists() or sorted(os.listdir(run)) == sorted(
      {"missing": [], "no_config": ["checkpoints"],
       "no_checkpoint": ["config.json"],
       "bad_format": ["checkpoints", "config.json"],
       "bad_task": ["checkpoints", "config.json"]}[case])


def test_a_config_from_before_tasks_exports_the_builtin_task(workdir,
                                                             tmp_path):
  run = copy_run(workdir, tmp_path / "run")
  saved = json.loads((run / "config.json").read_text())
  del saved["task"]  # config.json of a run trained before the `task` key
  (run / "config.json").write_text(json.dumps(saved))
  report = export_lib.export(str(run), ("keras",))
  assert report["task"] == ("trainer.tasks.image_classification:"
                            "ImageClassification")
  assert report["formats"]["keras"]["metrics"]["accuracy"] > 0.9


@pytest.mark.slow
def test_launcher_exports_and_prints_the_table(workdir, tmp_path):
  run = copy_run(workdir, tmp_path / "run")
  proc = run_module("launch.export", f"--workdir={run}",
                    "--formats=keras,tflite_int8",
                    "--representative_batches=2", timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = proc.stdout.splitlines()
  assert lines[0].split() == ["format", "bytes", "accuracy", "max|diff|",
                              "agreement"]
  assert lines[1].startswith("keras ") and lines[2].startswith("tflite_int8 ")
  report = json.loads((run / "export" / "report.json").read_text())
  assert report["representative_examples"] == 64
  assert sorted(report["formats"]) == ["keras", "tflite_int8"]


LAUNCHER_BAD_INPUT = {  # message -> launch.export arguments
    "does not exist": ["--workdir=MISSING"],
    "unknown export format": ["--workdir=RUN", "--formats=keras,onnx"],
    "must be a positive": ["--workdir=RUN", "--representative_batches=0"],
    "--workdir is required": [],
}


@pytest.fixture(scope="module")
def launcher_bad_input_runs(workdir, tmp_path_factory) -> dict:
  """Every LAUNCHER_BAD_INPUT case, several at once: {message:
  (CompletedProcess, the run it was given)}."""
  jobs, runs = {}, {}
  for message, args in LAUNCHER_BAD_INPUT.items():
    folder = tmp_path_factory.mktemp("export_bad_input")
    runs[message] = copy_run(workdir, folder / "run")
    args = [a.replace("MISSING", str(folder / "missing")).replace(
        "RUN", str(runs[message])) for a in args]
    jobs[message] = (("launch.export", *args), {"timeout": 180})
  return {k: (proc, runs[k]) for k, proc in run_modules(jobs).items()}


@pytest.mark.slow
@pytest.mark.parametrize("message", LAUNCHER_BAD_INPUT)
def test_launcher_bad_input_is_one_line_and_exit_2(message,
                                                   launcher_bad_input_runs):
  proc, run = launcher_bad_input_runs[message]
  assert proc.returncode == 2
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("error: ") and message in last, proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr
  assert not (run / "export").exists()


def test_an_image_folder_run_exports_a_classify_signature(tmp_path):
  """Output i is class_names[i]: the SavedModel's `classify` signature
  returns the top class's name for each image (and its index and the
  scores, equal to serving_default's), and report.json says so."""
  root = image_files.write_image_folder(str(tmp_path / "images"),
                                        per_class=4,
                                        classes=("ant", "bee", "cat"))
  image_files.on_disk_run(tmp_path / "run", name="image_folder",
                          data_dir=root, steps=4)
  report = export_lib.export(str(tmp_path / "run"), ("saved_model",))
  assert report["class_names"] == ["ant", "bee", "cat"]
  assert report["saved_model_signatures"] == ["serving_default", "classify"]
  loaded = tf.saved_model.load(str(tmp_path / "run" / "export" /
                                   "saved_model"))
  serve = loaded.signatures["serving_default"]
  (name, spec), = serve.structured_input_signature[1].items()
  images = tf.random.stateless_uniform([5, *spec.shape[1:]], seed=(1, 2))
  classified = loaded.signatures["classify"](**{name: images})
  scores = next(iter(serve(**{name: images}).values())).numpy()
  np.testing.assert_array_equal(classified["scores"].numpy(), scores)
  index = scores.argmax(-1)
  np.testing.assert_array_equal(classified["class_index"].numpy(), index)
  assert [n.decode() for n in classified["class_name"].numpy()] == [
      ("ant", "bee", "cat")[i] for i in index]
