"""Export of any task (issue 14, launch.export): the example experiments and a
task file outside the repository train a few steps through `launch.train`
and export through `launch.export`; the `.keras` loads in a fresh process
once the task's module is imported; the SavedModel and TFLite signatures are
the model's own inputs and outputs; each format is evaluated with the task's
metrics; a format that cannot apply is skipped with its reason.
"""

import concurrent.futures
import json
import os
import shutil
import subprocess
import sys
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import ROOT, run_module
from trainer import layers
from trainer.checkpoint import model_state as model_state_lib
from trainer.export import formats as export_formats
from trainer.checkpoint import restore as restore_lib
from trainer.export import signature as signature_lib

pytestmark = pytest.mark.filterwarnings(
    "ignore:.*tf.lite.Interpreter is deprecated:UserWarning")

TRAIN_FLAGS = ("--config.train.steps=20", "--config.train.steps_per_loop=10",
               "--config.train.checkpoint_every=0",
               "--config.callbacks.progress_bar=False",
               "--config.callbacks.tensorboard=False")
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


def train_and_export(config: str, workdir, *export_flags):
  """Trains `config` for 20 steps and exports it; returns the export's
  CompletedProcess and report.json (None if it wrote none)."""
  proc = run_module("launch.train", f"--config={config}",
                    f"--workdir={workdir}", *TRAIN_FLAGS, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  proc = run_module("launch.export", f"--workdir={workdir}",
                    "--representative_batches=2", *export_flags, timeout=600)
  report = workdir / "export" / "report.json"
  return proc, json.loads(report.read_text()) if report.exists() else None


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


ERF_TASK = '''
import keras

from configs import custom_dense


def get_config():
  c = custom_dense.get_config()
  c.task = "{path}:ErfTask"
  c.distribution.strategy = "one_device"
  c.precision.policy = "float32"
  return c


@keras.saving.register_keras_serializable(package="erf_task")
class ErfLayer(keras.layers.Layer):
  """erf(x) @ kernel: a layer Keras cannot quantize, an op TFLite lacks."""

  def build(self, input_shape):
    self.kernel = self.add_weight(shape=(input_shape[-1], 10), name="kernel")

  def call(self, x):
    return keras.ops.matmul(keras.ops.erf(x), self.kernel)


class ErfTask(custom_dense.CustomDenseTask):
  """custom_dense's data, loss and metric; a model of ErfLayer only."""

  def build_model(self):
    return keras.Sequential([keras.Input((self.user.features,),
                                         name="features"),
                             ErfLayer(name="erf")])
'''


@pytest.mark.slow
def test_formats_that_cannot_apply_are_skipped_with_the_reason(tmp_path):
  path = tmp_path / "erf_task.py"
  path.write_text(ERF_TASK.replace("{path}", str(path)))
  workdir = tmp_path / "run"
  proc, report = train_and_export(str(path), workdir)
  assert proc.returncode == 0, proc.stderr[-3000:]  # skips are not failures
  rows = report["formats"]
  assert "bytes" in rows["keras"] and "bytes" in rows["saved_model"]
  for fmt in ("keras_int8", "keras_float8", "keras_int4"):
    assert rows[fmt] == {"file": export_formats.FILES[fmt], "skipped": (
        f"model.quantize('{fmt[6:]}') found no layer to quantize (Keras "
        "quantizes Dense, EinsumDense and Embedding; other layers stay "
        "float)")}
  for fmt in ("tflite_float32", "tflite_float16", "tflite_dynamic_range",
              "tflite_int8"):
    assert rows[fmt]["skipped"].startswith(
        "TFLite has no built-in op for Erf"), rows
  assert sorted(os.listdir(workdir / "export")) == [
      "model.keras", "report.json", "saved_model"]
  table = proc.stdout.splitlines()
  assert sum(" skipped: " in line for line in table) == 7
  assert "failed" not in proc.stdout
  # The converter's own diagnostics ("error: failed while converting") do
  # not reach stderr: its error lines are for bad input only.
  assert not [line for line in proc.stderr.splitlines()
              if line.startswith("error:")], proc.stderr[-3000:]


def test_saved_model_and_tflite_compute_a_two_input_two_output_model(
    tmp_path):
  a = keras.Input((3,), name="values")
  b = keras.Input((4,), dtype="int32", name="ids")
  pooled = keras.ops.mean(keras.layers.Embedding(8, 3)(b), axis=1)
  hidden = keras.layers.Dense(4, name="hidden")(a + pooled)
  model = keras.Model({"values": a, "ids": b}, [
      keras.layers.Dense(2, name="logits")(hidden),
      keras.layers.Dense(1, name="score")(hidden)])
  rng = np.random.default_rng(0)
  x = {"values": rng.normal(size=(5, 3)).astype(np.float32),
       "ids": rng.integers(0, 8, size=(5, 4)).astype(np.int32)}
  reference = [np.asarray(t) for t in model(x)]
  sig = signature_lib.of_model(model, x, reference)
  assert list(sig.outputs) == ["logits", "score"]
  path = str(tmp_path / "saved_model")
  signature_lib.write_saved_model(model, sig, path)
  tflite = tmp_path / "model.tflite"
  tflite.write_bytes(export_formats.tflite_model(path, "float32"))
  for fmt, file, tolerance in (("saved_model", path, 1e-6),
                               ("tflite_float32", str(tflite), 1e-5)):
    got = export_formats.predictor(fmt, file, sig)(x)
    for out, ref in zip(got, reference):
      np.testing.assert_allclose(out, ref, atol=tolerance, err_msg=fmt)


def test_a_subclassed_model_is_quantized_if_it_saves_and_loads():

  class Unregistered(keras.Model):

    def __init__(self, **kwargs):
      super().__init__(**kwargs)
      self.dense = keras.layers.Dense(2, name="dense")

    def call(self, x):
      return self.dense(x)

  registered = keras.saving.register_keras_serializable(
      package="test_export_tasks")(type("Registered", (Unregistered,), {}))
  x = np.random.default_rng(0).normal(size=(4, 3)).astype(np.float32)
  model = registered()
  model(x)  # built, as a restored model is
  quantized, names = export_formats.quantize_keras(model, "int8")
  assert names == ["dense"]
  np.testing.assert_allclose(quantized(x), model(x), atol=0.05)
  with pytest.raises(export_formats.Skipped, match="neither be cloned nor "
                     "saved and loaded .*Could not locate class"):
    unregistered = Unregistered()
    unregistered(x)
    export_formats.quantize_keras(unregistered, "int8")


@pytest.mark.parametrize("message,reason", [
    ("...\nTF Select ops: Cumprod\nDetails: ...",
     "TFLite has no built-in op for Cumprod (it would need TF Select ops, "
     "the Flex delegate, at run time)"),
    ("...\nCustom ops: Erf, Erfinv\nDetails: ...",
     "TFLite has no op for Erf, Erfinv"),
    ("Quantization not yet supported for op: 'SIN'",
     "TFLite cannot quantize the op SIN to int8"),
    ("Given shapes, [8,4] and [0,4], are not broadcastable.", None),
])
def test_converter_errors_that_mean_skip(message, reason):
  assert export_formats.unsupported_ops(message) == reason



def test_restore_finds_a_sequential_model_saved_under_another_name(
    tmp_path):
  """An unnamed Sequential is `sequential` in a fresh process and
  `sequential_N` after others. Checkpoints key the model's variables by
  position, so it restores into the model under another name."""
  def build(name):
    return keras.Sequential([keras.Input((3,)), keras.layers.Dense(
        2, name="head")], name=name)

  trained = build("sequential")
  trained.get_layer("head").bias.assign([1.0, 2.0])
  new = tf.train.Checkpoint(model=model_state_lib.model_state(
      trained)).save(str(tmp_path / "new"))
  again = build("sequential_7")
  state = model_state_lib.model_state(again, new)
  assert sorted(state) == ["v0", "v1"]
  status = tf.train.Checkpoint(model=state).restore(new).expect_partial()
  status.assert_existing_objects_matched()
  np.testing.assert_array_equal(again.get_layer("head").bias, [1.0, 2.0])


SUBCLASSED_TASK = """
import keras

from configs import custom_dense


@keras.saving.register_keras_serializable(package="subclassed_task")
class TwoLayers(keras.Model):

  def __init__(self, **kwargs):
    super().__init__(**kwargs)
    self.hidden = keras.layers.Dense(8, activation="relu", name="hidden")
    self.head = keras.layers.Dense(10, name="head")

  def call(self, x):
    return self.head(self.hidden(x))


class SubclassedTask(custom_dense.CustomDenseTask):

  def build_model(self):
    return TwoLayers(name="two_layers")
"""


def test_a_subclassed_model_is_built_before_its_checkpoint_is_restored(
    tmp_path):
  """Its variables exist once it is called: restore() calls it on eval
  examples first, else it would restore nothing and export random weights."""
  from configs import custom_dense  # pylint: disable=import-outside-toplevel
  from trainer import task as task_lib  # pylint: disable=import-outside-toplevel
  task_file = tmp_path / "subclassed_task.py"
  task_file.write_text(SUBCLASSED_TASK)
  config = custom_dense.get_config()
  config.task = f"{task_file}:SubclassedTask"
  task = task_lib.load_task(config.task, config)
  trained = task.build_model()
  x = task.eval_data()[0]
  trained(x)
  run = tmp_path / "run"
  (run / "checkpoints").mkdir(parents=True)
  (run / "config.json").write_text(json.dumps(config.to_dict()))
  tf.train.Checkpoint(model=model_state_lib.model_state(trained)).save(
      str(run / "checkpoints" / "ckpt"))
  restored = restore_lib.restore(str(run))
  np.testing.assert_array_equal(restored.model(x), trained(x))
  sig = signature_lib.of_model(restored.model, x, np.asarray(trained(x)))
  assert list(sig.inputs) == ["inputs"] and list(sig.outputs) == ["output_0"]


def test_a_layer_keras_cannot_load_back_is_named_with_the_fix():
  """A plain custom layer (not registered): the .keras formats are one
  error naming the layer, its class and the fix (it was Keras'
  'Sequential could not be deserialized properly'); registered classes,
  Keras' own and the trainer's layers pass."""

  class Plain(keras.layers.Layer):
    def call(self, x):
      return x * 2.0

  model = keras.Sequential([keras.Input((3,)), Plain(name="doubled"),
                            keras.layers.Dense(2)])
  with pytest.raises(ValueError) as raised:
    export_formats.check_saveable(model)
  assert str(raised.value) == (
      "'doubled' (test_export_tasks.test_a_layer_keras_cannot_load_back_is_"
      "named_with_the_fix.<locals>.Plain) cannot be loaded back from a .keras"
      " file: decorate the class with @keras.saving.register_keras_"
      "serializable(package=...) and give it get_config() returning its "
      "constructor arguments")
  registered = keras.saving.register_keras_serializable(
      package="test_export_tasks")(type("Registered", (Plain,), {}))
  export_formats.check_saveable(keras.Sequential([
      keras.Input((3,)), registered(), layers.DenseLayer(2)]))
