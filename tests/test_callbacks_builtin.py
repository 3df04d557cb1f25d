"""The config's built-in callbacks through `trainer.run`: TensorBoard, the
profiler, best-model export, the progress bar, learning-rate schedules."""

import glob
import os

import keras
import ml_collections
import numpy as np
import pytest
import tensorflow as tf

from configs import digits
from trainer import data as data_lib
from trainer.optimize import optimizers
from trainer.callbacks import read_metrics
from trainer.run import run


def _config(**overrides) -> ml_collections.ConfigDict:
  config = digits.get_config()
  config.callbacks.progress_bar = False
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


def _scalars(logdir: str) -> dict[str, list[tuple[int, float]]]:
  """tag -> [(step, value)] read back with TensorFlow's summary reader."""
  out = {}
  for path in sorted(glob.glob(os.path.join(logdir, "events.out.tfevents.*"))):
    for event in tf.compat.v1.train.summary_iterator(path):
      for value in event.summary.value:
        out.setdefault(value.tag, []).append(
            (event.step, float(tf.make_ndarray(value.tensor))))
  return out


@pytest.mark.slow  # in-process, but over 5 s: CI runs it
def test_tensorboard_holds_every_scalar_at_its_step(tmp_path, policy):
  config = _config(**{
      "train.steps": 60, "train.steps_per_epoch": 30,
      "train.steps_per_loop": 15, "precision.policy": "mixed_float16",
      "distribution.strategy": "mirrored", "distribution.num_cpu_devices": 2,
      "callbacks.profile_steps": (15, 30)})
  run(config, str(tmp_path))
  records = read_metrics(str(tmp_path))
  train = _scalars(tmp_path / "tensorboard" / "train")
  evals = _scalars(tmp_path / "tensorboard" / "eval")
  assert set(train) == {"loss", "accuracy", "learning_rate", "loss_scale",
                        "grad_norm", "examples_per_sec", "step_time",
                        "skipped_steps", "input_wait"}
  assert set(evals) == {"loss", "accuracy"}
  for tag, points in train.items():
    assert [s for s, _ in points] == [15, 30, 45, 60], tag
    want = [r[f"train/{tag}"] for r in records if f"train/{tag}" in r]
    assert [v for _, v in points] == pytest.approx(want, rel=1e-6), tag
  assert [s for s, _ in evals["accuracy"]] == [30, 60]
  want = [r["eval/accuracy"] for r in records if "eval/accuracy" in r]
  assert [v for _, v in evals["accuracy"]] == pytest.approx(want, rel=1e-6)
  assert train["loss_scale"][0][1] >= 1
  assert glob.glob(str(tmp_path / "tensorboard" / "plugins" / "profile" / "*"
                       / "*.xplane.pb"))


def test_best_model_keeps_the_top_k_and_each_file_reproduces_its_metric(
    tmp_path):
  config = _config(**{"train.steps": 300, "train.steps_per_epoch": 50,
                      "callbacks.best_model.monitor": "val_accuracy",
                      "callbacks.best_model.keep": 2})
  run(config, str(tmp_path))
  config.train.steps = 400  # resume: keeps ranking against earlier models
  run(config, str(tmp_path))
  import json  # pylint: disable=import-outside-toplevel
  with open(tmp_path / "best" / "index.json", encoding="utf-8") as f:
    kept = json.load(f)
  all_values = sorted((r["eval/accuracy"] for r in read_metrics(tmp_path)
                       if "eval/accuracy" in r), reverse=True)
  assert len(all_values) == 8
  assert [e["value"] for e in kept] == pytest.approx(all_values[:2])
  assert sorted(os.listdir(tmp_path / "best")) == sorted(
      ["index.json"] + [os.path.basename(e["path"]) for e in kept])
  source = data_lib.load_source(config.data, config.seed)
  x, y = map(np.stack, zip(*source.eval.as_numpy_iterator()))
  for entry in kept:
    model = keras.models.load_model(entry["path"])
    accuracy = float(np.mean(model.predict(x, verbose=0).argmax(-1) == y))
    assert accuracy == pytest.approx(entry["value"], abs=1e-6)


def test_progress_bar_reports_steps_and_metrics_when_not_a_tty(tmp_path,
                                                               capsys):
  config = _config(**{"train.steps": 100, "callbacks.progress_bar": True,
                      "callbacks.tensorboard": False})
  run(config, str(tmp_path))
  out = capsys.readouterr().out
  assert "100/100" in out
  for name in ("loss:", "accuracy:", "examples_per_sec:", "val_accuracy:"):
    assert name in out


def test_step_decay_schedule_drops_at_each_boundary():
  config = _config(**{"optimizer.schedule": "step",
                      "optimizer.learning_rate": 0.1,
                      "optimizer.decay_steps": (20, 40),
                      "optimizer.decay_factor": 0.1})
  schedule = optimizers.learning_rate_schedule(config.optimizer, 100)
  got = [float(schedule(s)) for s in (0, 20, 21, 40, 41, 99)]
  assert got == pytest.approx([0.1, 0.1, 0.01, 0.01, 0.001, 0.001])
