"""Users' own experiments (trainer/task.py) through the launcher: the
examples in configs/ on 2 replicas, exact resume after SIGKILL, a task file
outside the repository, and every kind of broken task as one error line
with nothing written."""

import json
import logging
import os
import re
import signal
import textwrap

import numpy as np
import pytest

from tests.helpers.checkpoints import variables as _variables
from conftest import ROOT, run_module, run_modules
from trainer.callbacks import read_metrics
from trainer.config import default_config
from trainer.errors import ConfigError, DataError
from trainer.run import run

HELPERS = {"PYTHONPATH": os.path.join(ROOT, "tests", "helpers")}
EXAMPLES = {  # config -> (overrides, a train/ key its metrics log)
    "custom_dense": ([], "train/accuracy"),
    # regression's data path (arrays, an MLP) is custom_dense's: not repeated
    "sequence": (["--config.train.steps=30"], "train/accuracy"),
    # two models, two optimizers, alternating updates (test_step_custom.py)
    "gan": (["--config.train.steps=30"], "train/g_loss"),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", EXAMPLES)
def test_example_on_2_replicas_resumes_bit_identically_after_sigkill(
    name, tmp_path):
  overrides, metric = EXAMPLES[name]
  flags = [f"--config=configs/{name}.py", *overrides,
           "--config.distribution.strategy=mirrored",
           "--config.distribution.num_cpu_devices=2",
           "--config.train.deterministic=True",
           "--config.train.steps_per_loop=5",
           "--config.train.checkpoint_every=10",
           "--config.callbacks.progress_bar=False",
           "--config.callbacks.custom=recorder:KillAt"]
  straight, killed = tmp_path / "straight", tmp_path / "killed"
  # The straight run and the one killed at step 15, side by side.
  runs = run_modules({
      "straight": (("launch.train", *flags, f"--workdir={straight}"),
                   {"env": HELPERS}),
      "killed": (("launch.train", *flags, f"--workdir={killed}"),
                 {"env": {**HELPERS, "KILL_AT_STEP": "15"}})}, processes=2)
  done, proc = runs["straight"], runs["killed"]
  assert done.returncode == 0, done.stderr[-3000:]
  assert done.stdout.splitlines()[-1].startswith("done: ")
  assert "2 replica(s)" in done.stderr
  assert metric in read_metrics(straight)[-1] or any(
      metric in r for r in read_metrics(straight))
  assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
  again = run_module("launch.train", *flags, f"--workdir={killed}",
                     env=HELPERS)
  assert again.returncode == 0, again.stderr[-3000:]
  restored = re.search(r"restored \S+ckpt-\d+ \(step (\d+)\)", again.stderr)
  assert restored and 0 < int(restored.group(1)) < 15, again.stderr[-2000:]
  want, got = _variables(straight), _variables(killed)
  assert sorted(got) == sorted(want)
  for key, value in want.items():
    np.testing.assert_array_equal(got[key], value, err_msg=key)
  if name == "custom_dense":  # the task's own callback, once per epoch
    assert [l for l in done.stdout.splitlines()
            if l.startswith("epoch ")][-1].startswith("epoch 10: loss ")


@pytest.mark.slow
def test_sequence_example_trains_on_two_workers_like_two_replicas(tmp_path):
  """configs/sequence.py (dict input, Embedding, Lambda) as a 2-worker job
  on localhost: the same variables as 2 mirrored replicas in one process."""
  flags = ["--config=configs/sequence.py", "--config.train.steps=40",
           "--config.train.steps_per_loop=10",
           "--config.train.deterministic=True",
           "--config.callbacks.progress_bar=False"]
  runs = run_modules({  # side by side
      "job": (("launch.local", "--num_workers=2", "--", *flags,
               f"--workdir={tmp_path / 'workers'}"), {"timeout": 300}),
      "one": (("launch.train", *flags, f"--workdir={tmp_path / 'one'}",
               "--config.distribution.strategy=mirrored",
               "--config.distribution.num_cpu_devices=2"), {})}, processes=2)
  job, one = runs["job"], runs["one"]
  assert job.returncode == 0, job.stderr[-3000:]
  assert "[worker 0] done: 40 steps" in job.stdout
  assert one.returncode == 0, one.stderr[-3000:]
  want, got = _variables(tmp_path / "one"), _variables(tmp_path / "workers")
  assert sorted(got) == sorted(want)
  for key, value in want.items():
    np.testing.assert_allclose(got[key], value, rtol=1e-5, atol=1e-6,
                               err_msg=key)


def _write(folder, name, text) -> str:
  path = os.path.join(folder, name)
  with open(path, "w", encoding="utf-8") as f:
    f.write(textwrap.dedent(text))
  return path


TASK_FILE = """
    import keras
    import numpy as np


    class Task:
      def __init__(self, config):
        rng = np.random.default_rng(0)
        self.x = rng.random((64, 4), dtype=np.float32)
        self.y = rng.integers(0, 3, size=64).astype(np.int32)

      def build_model(self):
        return keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])

      def train_data(self):
        return self.x, self.y

      def eval_data(self):
        return self.x, self.y

      def build_losses(self, labels, logits):
        return keras.losses.sparse_categorical_crossentropy(
            labels, logits, from_logits=True)

      def build_metrics(self):
        return [keras.metrics.SparseCategoricalAccuracy(name="accuracy")]
"""

BROKEN = {  # name -> (what replaces what in TASK_FILE, error, message)
    "missing_method": (("def build_metrics", "def metrics"), ConfigError,
                       "has no method build_metrics"),
    "lengths_differ": (("return self.x, self.y\n\n  def eval",
                        "return self.x, self.y[:60]\n\n  def eval"),
                       DataError, "train_data() returned x with 64, y with 60"
                       " examples"),
    "not_arrays": (("return self.x, self.y\n\n  def eval",
                    "return [1, 2, 3]\n\n  def eval"), DataError,
                   "train_data() returned a scalar as x"),
    "loss_not_per_example": (
        ("return keras.losses.sparse_categorical_crossentropy(\n"
         "        labels, logits, from_logits=True)",
         "return keras.ops.mean(keras.losses.sparse_categorical_crossentropy"
         "(\n        labels, logits, from_logits=True))"),
        ConfigError, "returned shape () for 2 examples; it must return one "
        "loss per example"),
    "outputs_do_not_fit_labels": (
        ("keras.layers.Dense(3)", "keras.layers.Dense(3), "
         "keras.layers.Reshape((3, 1))"), ConfigError,
        "build_losses(labels (2,), model_outputs (2, 3, 1)) failed"),
    "model_does_not_take_x": (
        ("keras.Input((4,))", "keras.Input((5,))"), ConfigError,
        "the model from build_model() does not take x from train_data() "
        "(2 examples, shape (2, 4))"),
}


def _config(task: str):
  config = default_config()
  config.task = task
  config.data.global_batch_size = 16
  config.data.eval_batch_size = 16
  config.train.steps = 8
  config.train.steps_per_loop = 4
  config.callbacks.progress_bar = False
  config.callbacks.tensorboard = False
  return config


@pytest.mark.parametrize("case", BROKEN)
def test_a_broken_task_is_one_error_naming_the_method_and_writes_nothing(
    case, tmp_path):
  (old, new), error, message = BROKEN[case]
  text = textwrap.dedent(TASK_FILE)
  old = textwrap.dedent(old)
  assert old in text, old
  path = _write(tmp_path, f"broken_{case}.py", text.replace(old, new))
  with pytest.raises(error) as raised:
    run(_config(f"{path}:Task"), str(tmp_path / "run"))
  assert message in str(raised.value)
  assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("spec,message", [
    ("no_such_module:Task", "cannot import 'no_such_module'"),
    ("configs.regression:NoSuchTask", "configs.regression has no "
     "'NoSuchTask'"),
    ("configs/no_such_file.py:Task", "file 'configs/no_such_file.py' does not "
     "exist"),
    ("configs.regression", "must look like 'package.module:Name'"),
])
def test_a_task_that_cannot_be_found_is_a_config_error(spec, message,
                                                       tmp_path):
  with pytest.raises(ConfigError) as e:
    run(_config(spec), str(tmp_path / "run"))
  assert message in str(e.value)
  assert not (tmp_path / "run").exists()


def test_a_subclassed_model_trains_and_resumes_in_the_same_process(
    tmp_path, mirrored, caplog):
  """A model that makes its variables when first called (it failed: 'must
  only be passed a variable created in this tf.distribute.Strategy.scope()'),
  resumed in the process that trained it (its automatic name differs then:
  `net_1`, not `net`)."""
  del mirrored  # the 2 logical CPUs
  text = textwrap.dedent(TASK_FILE).replace(
      "return keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])",
      "return Net()").replace("class Task:", textwrap.dedent("""\
      class Net(keras.Model):
        def __init__(self):
          super().__init__()
          self.hidden = keras.layers.Dense(8, activation="relu")
          self.out = keras.layers.Dense(3)

        def call(self, x):
          return self.out(self.hidden(x))


      class Task:"""))
  path = _write(tmp_path, "subclassed.py", text)
  config = _config(f"{path}:Task")
  config.distribution.strategy = "mirrored"
  config.distribution.num_cpu_devices = 2
  assert run(config, str(tmp_path / "run")).steps == 8
  config.train.steps = 12
  caplog.set_level(logging.INFO, logger="absl")
  again = run(config, str(tmp_path / "run"))
  assert again.steps == 12 and np.isfinite(again.logs["eval/loss"])
  assert "ckpt-8 (step 8)" in caplog.text


def test_run_takes_a_task_object(tmp_path):
  """`trainer.run.run(config, workdir, task=...)` for notebooks."""
  namespace = {}
  exec(compile(textwrap.dedent(TASK_FILE), "task", "exec"), namespace)  # pylint: disable=exec-used
  result = run(_config("unused:Unused"), str(tmp_path),
               task=namespace["Task"](None))
  assert result.steps == 8 and np.isfinite(result.logs["eval/loss"])
  assert result.logs["eval/num_examples"] == 64


def test_monitor_direction_comes_from_the_tasks_metrics():
  """EarlyStopping's own `auto` failed on any metric but the loss (the
  model is never compiled, so Keras cannot see the metrics)."""
  import keras  # pylint: disable=import-outside-toplevel
  from configs.regression import RSquared  # pylint: disable=import-outside-toplevel
  from trainer.callbacks.best_model import resolve_mode  # pylint: disable=import-outside-toplevel
  metrics = [RSquared(), keras.metrics.MeanAbsoluteError(name="mae"),
             keras.metrics.SparseCategoricalAccuracy(name="accuracy")]
  assert resolve_mode("auto", "val_mae", metrics) == "min"
  assert resolve_mode("auto", "val_accuracy", metrics) == "max"
  assert resolve_mode("auto", "val_loss", metrics) == "min"
  assert resolve_mode("max", "val_r2", metrics) == "max"
  with pytest.raises(ConfigError, match="cannot tell whether 'val_r2' should "
                     "go up or down: set --config.callbacks.early_stopping"
                     ".mode=max or min"):
    resolve_mode("auto", "val_r2", metrics, "callbacks.early_stopping.mode")


def test_the_builtin_task_logs_the_same_keys_as_before(tmp_path):
  """Digits through the Task interface: metrics.jsonl keeps its keys."""
  config = _config(default_config().task)
  config.data.global_batch_size = 64
  config.train.steps, config.train.steps_per_loop = 20, 10
  run(config, str(tmp_path))
  keys = set().union(*read_metrics(tmp_path))
  assert keys == {
      "step", "epoch", "eval/accuracy", "eval/loss", "eval/num_examples",
      "train/accuracy", "train/examples", "train/examples_per_sec",
      "train/grad_norm", "train/learning_rate",
      "train/loss", "train/skipped_steps", "train/step_time", "train/steps",
      "train/input_wait"}


TWO_OUTPUTS = """
    import keras
    import numpy as np


    class Task:
      def __init__(self, config):
        rng = np.random.default_rng(0)
        self.x = rng.random((64, 4), dtype=np.float32)
        self.y = rng.integers(0, 3, size=64).astype(np.int32)

      def build_model(self):
        inputs = keras.Input((4,))
        hidden = keras.layers.Dense(8)(inputs)
        return keras.Model(inputs, [keras.layers.Dense(3)(hidden),
                                    keras.layers.Dense(1)(hidden)])

      def train_data(self):
        return self.x, (self.y, self.x[:, 0])

      def eval_data(self):
        return self.x, (self.y, self.x[:, 0])

      def compute_loss(self, model, batch, training):
        x, (label, target) = batch
        logits, value = model(x, training=training)  # float16 outputs
        ce = keras.losses.sparse_categorical_crossentropy(
            label, logits, from_logits=True)
        squared = (value[:, 0] - keras.ops.cast(target, value.dtype)) ** 2
        return ce + squared, logits

      def build_losses(self, labels, outputs):
        raise AssertionError("compute_loss replaces it")

      def build_metrics(self):
        return [LabelAccuracy(name="accuracy")]


    class LabelAccuracy(keras.metrics.SparseCategoricalAccuracy):
      def update_state(self, y_true, y_pred, sample_weight=None):
        super().update_state(y_true[0], y_pred, sample_weight)
"""


def test_compute_loss_with_float16_outputs_and_two_outputs(tmp_path):
  """A task's own forward pass under mixed_float16 on 2 replicas: a model
  with two outputs (a list), float16 per-example losses (cast by the
  trainer), tuple labels."""
  path = _write(tmp_path, "two_outputs.py", TWO_OUTPUTS)
  config = _config(f"{path}:Task")
  config.precision.policy = "mixed_float16"
  config.distribution.strategy = "mirrored"
  config.distribution.num_cpu_devices = 2
  result = run(config, str(tmp_path / "run"))
  assert result.steps == 8 and np.isfinite(result.logs["eval/loss"])
  assert result.logs["eval/num_examples"] == 64
  assert 0.0 <= result.logs["eval/accuracy"] <= 1.0


@pytest.mark.parametrize("change,error,message", [
    (("return keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])",
      "return keras.Sequential([keras.layers.Reshape((2, 3))])"),
     ConfigError, "the model from build_model() does not take x from "
     "train_data() (2 examples)"),
    (("return self.x, self.y\n\n  def eval",
      "import tensorflow as tf\n    return tf.data.Dataset.from_tensor_slices("
      "(self.x, self.y)).take(0)\n\n  def eval"),
     DataError, "train_data() returned a Dataset with no examples"),
])
def test_more_broken_tasks(change, error, message, tmp_path):
  """A subclass-style model (no variables yet) that does not take x, and
  an empty dataset, were tracebacks."""
  old, new = change
  text = textwrap.dedent(TASK_FILE)
  assert old in text
  path = _write(tmp_path, "broken.py", text.replace(old, new))
  with pytest.raises(error) as raised:
    run(_config(f"{path}:Task"), str(tmp_path / "run"))
  assert message in str(raised.value)
  assert not (tmp_path / "run").exists()


def test_run_with_a_task_object_records_a_task_that_loads_again(tmp_path):
  """config.json's `task` for a task object from a file is the file's
  path, so the launcher and the exporter can load it in another process."""
  path = _write(tmp_path, "object_task.py", TASK_FILE)
  from trainer.task import load_task  # pylint: disable=import-outside-toplevel
  task = load_task(f"{path}:Task", None)
  run(_config("unused:Unused"), str(tmp_path / "run"), task=task)
  saved = json.loads((tmp_path / "run" / "config.json").read_text())
  assert saved["task"] == f"{path}:Task"
  assert load_task(saved["task"], None).build_metrics()
