"""Keras habits in a user's task, and what the user reads when they go
wrong: a batched or padded Dataset from train_data()/eval_data(), an error
inside a layer, a long cause, an own train_step XLA cannot make
deterministic. The task is tests/test_tasks.py's TASK_FILE, changed."""

import logging
import textwrap

import numpy as np
import pytest

from test_tasks import TASK_FILE, _config, _write
from tests.helpers.checkpoints import variables as _variables
from trainer.callbacks import read_metrics
from trainer.errors import ConfigError, DataError, first_line
from trainer.run import run


def _task_with(tmp_path, name: str, changes: dict) -> str:
  """TASK_FILE with `changes` (old -> new) made, written as `name`."""
  text = textwrap.dedent(TASK_FILE)
  for old, new in changes.items():
    assert old in text, old
    text = text.replace(old, new)
  return _write(tmp_path, name, text)


def _dataset_task(tmp_path, name: str, suffix: str) -> str:
  """TASK_FILE whose train_data() returns a Dataset of its arrays with
  `suffix` applied (e.g. ".batch(32)")."""
  return _task_with(tmp_path, name, {
      "return self.x, self.y\n\n  def eval":
          "return tf.data.Dataset.from_tensor_slices((self.x, self.y))"
          f"{suffix}\n\n  def eval",
      "import keras\n": "import keras\nimport tensorflow as tf\n"})


CONV_MODEL = """keras.Sequential([
            keras.Input((4,)), keras.layers.Reshape((2, 2, 1)),
            keras.layers.Conv2D(2, 1), keras.layers.MaxPooling2D(),
            keras.layers.Flatten(), keras.layers.Dense(3)])"""


def test_own_train_step_that_xla_refuses_deterministically_is_one_error(
    tmp_path):
  """MaxPool's gradient under op determinism (DESIGN.md fact 18) in a task's
  own jit-compiled train_step, on 2 replicas: one error before anything is
  written, as for the built-in step (it was a traceback from inside the
  first host loop)."""
  path = _task_with(tmp_path, "own_step.py", {
      "keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])":
          CONV_MODEL,
      "  def build_metrics(self):": """\
  def train_step(self, batch, step):
    x, y = batch
    loss = step.mean(self.build_losses(y, step.models["model"](x)))
    step.apply(loss, "model")

  def build_metrics(self):"""})
  config = _config(f"{path}:Task")
  config.train.jit_compile = True
  config.train.deterministic = True
  config.distribution.strategy = "mirrored"
  config.distribution.num_cpu_devices = 2
  with pytest.raises(ConfigError) as raised:
    run(config, str(tmp_path / "run"))
  assert str(raised.value) == (
      "XLA cannot compile this model's train step with "
      "train.deterministic=True (GPU MaxPool gradient ops do not yet have a "
      "deterministic XLA implementation); turn off train.jit_compile or "
      "train.deterministic")
  assert not (tmp_path / "run").exists()
  config.train.deterministic = False  # the same step compiles without it
  assert run(config, str(tmp_path / "run")).steps == 8


def test_an_error_inside_a_layer_keeps_its_cause_in_the_one_line(tmp_path):
  """Keras reports a layer's error as "Exception encountered when calling
  Activation.call()." with the cause on a later line: the one-line error
  keeps the cause and the layer (it kept only Keras' first line)."""
  path = _task_with(tmp_path, "float32_constant.py", {
      "keras.layers.Dense(3)])": """\
keras.layers.Activation(
            lambda t: t - tf.constant(0.5, tf.float32)),
            keras.layers.Dense(3)])""",
      "import keras\n": "import keras\nimport tensorflow as tf\n"})
  config = _config(f"{path}:Task")
  config.precision.policy = "mixed_float16"
  with pytest.raises(ConfigError) as raised:
    run(config, str(tmp_path / "run"))
  assert str(raised.value) == (
      "the model from build_model() does not take x from train_data() (2 "
      "examples, shape (2, 4)): InvalidArgumentError in Activation.call(): "
      "cannot compute Sub as input #1(zero-based) was expected to be a half "
      "tensor but is a float tensor [Op:Sub]")


def test_a_long_cause_is_cut_to_one_readable_line():
  error = ValueError("Exception encountered when calling Sequential.call()."
                     "\n\n\x1b[1mInvalid input shape for input "
                     + "[0.5 0.25]\n " * 400 + "\x1b[0m\n\nArguments "
                     "received by Sequential.call():\n  • inputs=...")
  line = first_line(error)
  assert line.startswith("ValueError in Sequential.call(): Invalid input "
                         "shape for input [0.5 0.25]")
  assert len(line) <= 300 and "\n" not in line and "\x1b" not in line
  assert first_line(KeyError("plain")) == "KeyError: 'plain'"


@pytest.mark.parametrize("batching", ["batch(32)", "batch(7)",
                                      "batch(5, num_parallel_calls=2)"])
def test_a_batched_train_dataset_is_unbatched_and_trains_the_same(
    batching, tmp_path, caplog):
  """The Keras habit `Dataset...batch(32)` from train_data(): unbatched
  (logged once) and batched by data.global_batch_size, so the run equals
  the one on the unbatched dataset; it was an error from the model check."""
  results = []
  for name, suffix in (("examples", ""), ("batched", f".{batching}")):
    path = _dataset_task(tmp_path, f"{name}.py", suffix)
    with caplog.at_level(logging.WARNING):
      run(_config(f"{path}:Task"), str(tmp_path / name))
    results.append(_variables(tmp_path / name))
  assert "train_data() returned a batched Dataset (batch())" in caplog.text
  assert results[0].keys() == results[1].keys()
  for key, want in results[0].items():
    np.testing.assert_array_equal(results[1][key], want, err_msg=key)


@pytest.mark.parametrize("batching,how", [
    ("padded_batch(8)", "padded_batch"),
    ("ragged_batch(8)", "ragged_batch"),
    ("padded_batch(8).map(lambda x, y: (x, y))", "padded_batch")])
def test_a_padded_or_ragged_train_dataset_is_one_error(batching, how,
                                                       tmp_path):
  path = _dataset_task(tmp_path, "padded.py", f".{batching}")
  with pytest.raises(DataError) as raised:
    run(_config(f"{path}:Task"), str(tmp_path / "run"))
  assert str(raised.value).startswith(
      f"train_data() returned a Dataset made by {how}(); return unbatched "
      "examples")
  assert not (tmp_path / "run").exists()


def test_a_batched_eval_dataset_evaluates_like_its_examples(tmp_path):
  """eval_data() as `Dataset...batch(10)` (64 examples, the last batch
  partial): the same eval values as the arrays; it passed the checks and
  failed at the first evaluation with a traceback."""
  path = _task_with(tmp_path, "batched_eval.py", {
      "return self.x, self.y\n\n  def build_losses":
          "return tf.data.Dataset.from_tensor_slices((self.x, self.y))"
          ".batch(10)\n\n  def build_losses",
      "import keras\n": "import keras\nimport tensorflow as tf\n"})
  evals = []
  for name, task in (("arrays", TASK_FILE), ("batched", None)):
    spec = (f"{_write(tmp_path, 'arrays.py', TASK_FILE)}:Task"
            if task else f"{path}:Task")
    run(_config(spec), str(tmp_path / name))
    evals.append([r for r in read_metrics(tmp_path / name)
                  if "eval/loss" in r][-1])
  assert evals[1]["eval/num_examples"] == 64
  assert evals[1]["eval/loss"] == pytest.approx(evals[0]["eval/loss"],
                                                rel=1e-6)
