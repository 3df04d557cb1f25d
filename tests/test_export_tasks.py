"""Export of any task (issue 14, launch.export): the example experiments and a
task file outside the repository train a few steps through `launch.train`
and export through `launch.export`; the `.keras` loads in a fresh process
once the task's module is imported; the SavedModel and TFLite signatures are
the model's own inputs and outputs; each format is evaluated with the task's
metrics. Models of other kinds: tests/test_export_models.py.
"""

import concurrent.futures
import json
import os
import shutil
import subprocess
import sys
import warnings

import numpy as np
import pytest
import tensorflow as tf

from conftest import ROOT
from tests.helpers.exports import train_and_export
from trainer.export import formats as export_formats

pytestmark = pytest.mark.filterwarnings(
    "ignore:.*tf.lite.Interpreter is deprecated:UserWarning")

# config -> (its task module, signature inputs, outputs {name: (dtype,
# shape)}, the task's metrics, an expression true of the model loaded from
# model.keras once the module is imported: its custom object survived).
EXAMPLES = {
    "custom_dense": (
        "configs.custom_dense", {"features": ("float32", [None, 10])},
        {"logits": ("float32", [None, 10])}, ["accuracy"],
        "type(model.get_layer('my_dense')) is module.MyDense"),
    "regression": (
        "configs.regression", {"features": ("float32", [None, 8])},
        {"prediction": ("float32", [None, 1])}, ["r2", "mae"],
        "model.get_layer('hidden_0').activation is module.soft_square"),
    "sequence": (
        "configs.sequence", {"tokens": ("int32", [None, 24])},
        {"logits": ("float32", [None, 2])}, ["accuracy"],
        "model.get_layer('masked_mean').function is module.masked_mean"),
}
# Measured on these 20-step runs: the largest |output difference| of a
# quantized format 0.39 (regression tflite_int8, calibrated on 2 batches),
# the lowest agreement 0.93 (custom_dense keras_int4, 100 eval examples).
EXACT = ("keras", "saved_model", "tflite_float32")


def last_eval(workdir) -> dict:
  rows = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text()
          .splitlines()]
  return [r for r in rows if "eval/loss" in r][-1]


def load_in_fresh_process(workdir, importer: str, check: str) -> dict:
  """In a new Python: load model.keras (safe mode) before and after
  `importer` (code that sets `module`), check `check`, compare with the
  model restored from the checkpoint on 64 eval examples."""
  script = f"""
import json, sys
import keras, numpy as np
export = sys.argv[1] + "/export/"
try:
  keras.models.load_model(export + "model.keras")
  before = "loaded"
except Exception as e:
  before = type(e).__name__
{importer}
model = keras.models.load_model(export + "model.keras")
int8 = keras.models.load_model(export + "model_int8.keras")
from trainer import task as task_lib
from trainer.checkpoint import restore
run = restore.restore(sys.argv[1])
batch = next(iter(task_lib.examples(run.task.eval_data(), "eval_data")
                  .dataset.batch(64)))
x = batch[0]
reference = np.asarray(run.model(x))
print(json.dumps({{
    "before": before, "custom_object": bool({check}),
    "diff": float(np.abs(np.asarray(model(x)) - reference).max()),
    "int8_diff": float(np.abs(np.asarray(int8(x)) - reference).max())}}))
"""
  proc = subprocess.run(  # -c: the project root is on sys.path, as with -m
      [sys.executable, "-c", script, str(workdir)], cwd=ROOT,
      env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"), capture_output=True,
      text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def example_runs(tmp_path_factory) -> dict:
  """Every example config trained and exported, side by side: {name:
  (workdir, export process, report)}."""
  workdirs = {n: tmp_path_factory.mktemp(n) / "run" for n in EXAMPLES}
  with concurrent.futures.ThreadPoolExecutor(len(EXAMPLES)) as pool:
    futures = {n: pool.submit(train_and_export, f"configs/{n}.py",
                              workdirs[n]) for n in EXAMPLES}
    return {n: (workdirs[n], *f.result()) for n, f in futures.items()}


@pytest.fixture(scope="module", params=list(EXAMPLES))
def example(request, example_runs):
  """(name, workdir, export process, report) of one example config."""
  return (request.param, *example_runs[request.param])


@pytest.mark.slow
def test_example_exports_every_format(example):
  name, workdir, proc, report = example
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert report["task"].startswith(f"{EXAMPLES[name][0]}:")
  for fmt, row in report["formats"].items():
    assert "error" not in row and "skipped" not in row, (fmt, row)
    assert (workdir / "export" / row["file"]).exists()
    limit = 1e-5 if fmt in EXACT else 0.5
    assert row["max_abs_diff"] <= limit, (fmt, row)
    if name != "regression":
      assert row["agreement"] >= (1.0 if fmt in EXACT else 0.85), (fmt, row)
  assert sorted(report["formats"]) == sorted(export_formats.FORMATS)


@pytest.mark.slow
def test_report_and_table_have_the_tasks_metrics(example):
  name, workdir, proc, report = example
  metrics = EXAMPLES[name][3]
  assert list(report["float32_metrics"]) == metrics
  # The float32 reference is the trained model: its metrics are the run's
  # last evaluation (custom_dense trained under mixed_float16).
  tolerance = 1e-4 if report["trained_policy"] == "float32" else 0.05
  final = last_eval(workdir)
  for metric in metrics:
    assert report["float32_metrics"][metric] == pytest.approx(
        final[f"eval/{metric}"], abs=tolerance)
  for fmt, row in report["formats"].items():
    assert list(row["metrics"]) == metrics, fmt
    if fmt in EXACT:
      assert row["metrics"] == pytest.approx(report["float32_metrics"],
                                             abs=1e-6)
  assert ("agreement" in report["formats"]["keras"]) == (name != "regression")
  header = proc.stdout.splitlines()[0].split()
  assert header == ["format", "bytes", *metrics, "max|diff|", "agreement"]


@pytest.mark.slow
def test_saved_model_and_tflite_signatures_are_the_models(example):
  name, workdir, _, report = example
  _, inputs, outputs, _, _ = EXAMPLES[name]
  export = workdir / "export"
  serve = tf.saved_model.load(str(export / "saved_model")).signatures[
      "serving_default"]
  got_inputs = {n: (s.dtype.name, s.shape.as_list())
                for n, s in serve.structured_input_signature[1].items()}
  got_outputs = {n: (s.dtype.name, s.shape.as_list())
                 for n, s in serve.structured_outputs.items()}
  assert (got_inputs, got_outputs) == (inputs, outputs)
  assert report["signature"] == {
      "inputs": {n: {"dtype": d, "shape": s} for n, (d, s) in inputs.items()},
      "outputs": {n: {"dtype": d, "shape": s}
                  for n, (d, s) in outputs.items()}}
  for fmt in ("float32", "int8"):
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      interpreter = tf.lite.Interpreter(str(export / f"model_{fmt}.tflite"))
    runner = interpreter.get_signature_runner("serving_default")
    tflite_inputs = {n: (np.dtype(d["dtype"]).name, list(d["shape_signature"]))
                     for n, d in runner.get_input_details().items()}
    tflite_outputs = {n: np.dtype(d["dtype"]).name
                      for n, d in runner.get_output_details().items()}
    # Full integer: float inputs and outputs become int8, token ids stay.
    expected = {n: ("int8" if fmt == "int8" and d == "float32" else d,
                    [-1, *s[1:]]) for n, (d, s) in inputs.items()}
    assert tflite_inputs == expected, fmt
    assert tflite_outputs == {n: "int8" if fmt == "int8" else d
                              for n, (d, _) in outputs.items()}, fmt


@pytest.mark.slow
def test_keras_file_loads_in_a_fresh_process_after_importing_the_task(
    example):
  name, workdir, _, _ = example
  module, *_, check = EXAMPLES[name]
  result = load_in_fresh_process(
      workdir, f"import {module} as module", check)
  assert result["before"] != "loaded"  # its custom object needs the module
  assert result["custom_object"]
  assert result["diff"] <= 1e-6
  assert 0 < result["int8_diff"] < 0.5


@pytest.fixture(scope="module")
def task_file_run(tmp_path_factory):
  """configs/regression.py's task copied outside the repository, named by
  its path in a config file beside it; trained and exported."""
  folder = tmp_path_factory.mktemp("outside")
  assert not str(folder).startswith(ROOT)
  task_file = folder / "my_regression.py"
  shutil.copy(os.path.join(ROOT, "configs", "regression.py"), task_file)
  config = folder / "experiment.py"
  config.write_text(
      "from trainer.config import default_config\n\n\n"
      "def get_config():\n"
      "  c = default_config()\n"
      f"  c.task = {str(task_file) + ':Regression'!r}\n"
      "  c.user.num_train, c.user.num_eval, c.user.features = 512, 128, 8\n"
      "  c.user.huber_delta = 1.0\n"
      "  c.data.global_batch_size = c.data.eval_batch_size = 64\n"
      "  return c\n")
  workdir = folder / "run"
  proc, report = train_and_export(
      str(config), workdir, "--formats=keras,saved_model,keras_int8,"
      "tflite_int8")
  return task_file, workdir, proc, report


@pytest.mark.slow
def test_a_task_file_outside_the_repository_exports(task_file_run):
  task_file, workdir, proc, report = task_file_run
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert report["task"] == f"{task_file}:Regression"
  assert list(report["float32_metrics"]) == ["r2", "mae"]
  assert sorted(report["formats"]) == ["keras", "keras_int8", "saved_model",
                                       "tflite_int8"]
  assert not [r for r in report["formats"].values() if "bytes" not in r]
  assert report["signature"]["inputs"] == {
      "features": {"dtype": "float32", "shape": [None, 8]}}
  importer = (
      "from trainer import config as config_lib, task as task_lib\n"
      f"spec = {str(task_file) + ':Regression'!r}\n"
      f"saved = json.load(open({str(workdir / 'config.json')!r}))\n"
      "task_lib.load_task(spec, config_lib.with_defaults(saved))\n"
      "module = sys.modules['trainer_task_my_regression']")
  result = load_in_fresh_process(
      workdir, importer,
      "model.get_layer('hidden_0').activation is module.soft_square")
  assert result["before"] != "loaded" and result["custom_object"]
  assert result["diff"] <= 1e-6
