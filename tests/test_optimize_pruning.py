"""Magnitude pruning: the schedule, exact sparsity on every replica, resume,
the saved model, and accuracy on digits next to the dense model."""

import json

import keras
import numpy as np
import pytest
import tensorflow as tf

from tests.helpers.checkpoints import variables
from configs import digits
from trainer import data as data_lib
from trainer.errors import ConfigError
from trainer.fit.trainer import Trainer
from trainer.optimize.pruning import PruningSchedule
from trainer.run import run

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True,
                                                  reduction="none")


def test_schedule_decays_polynomially_from_initial_to_target():
  schedule = PruningSchedule(target_sparsity=0.8, begin_step=10, end_step=50,
                             frequency=15, initial_sparsity=0.2)
  sparsity = lambda s: float(schedule.sparsity(tf.constant(s, tf.int64)))
  assert sparsity(0) == pytest.approx(0.2) and sparsity(10) == pytest.approx(
      0.2)
  assert sparsity(30) == pytest.approx(0.8 - 0.6 * 0.5**3)
  assert sparsity(50) == pytest.approx(0.8) and sparsity(90) == pytest.approx(
      0.8)
  updates = [s for s in range(100)
             if bool(schedule.is_update_step(tf.constant(s, tf.int64)))]
  assert updates == [10, 25, 40, 50]


@pytest.mark.parametrize("bad,message", [
    ({"target_sparsity": 1.0}, "target_sparsity must be in"),
    ({"end_step": 5}, "begin_step < end_step"),
    ({"frequency": 0}, "frequency must be >= 1"),
    ({"exclude": "("}, "not a valid regular expression")])
def test_bad_schedules_are_config_errors(bad, message):
  args = {"target_sparsity": 0.5, "begin_step": 10, "end_step": 20, **bad}
  with pytest.raises(ConfigError, match=message):
    PruningSchedule(**args)


def _pruned_trainer(strategy, schedule):
  with strategy.scope():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((6,)), keras.layers.Dense(32, activation="relu"),
        keras.layers.Dense(16, activation="relu"),
        keras.layers.Dense(3, name="logits")])
  return Trainer(model=model, optimizer=keras.optimizers.Adam(0.01),
                 loss=LOSS, strategy=strategy, steps_per_loop=5,
                 pruning=schedule)


def test_exact_sparsity_and_same_masks_on_two_replicas(mirrored, one_device):
  rng = np.random.RandomState(0)
  x = rng.normal(size=(512, 6)).astype(np.float32)
  y = rng.randint(0, 3, size=512).astype(np.int32)
  data = data_lib.input_fn(tf.data.Dataset.from_tensor_slices((x, y)),
                           global_batch_size=32, training=True, seed=0)
  schedule = PruningSchedule(target_sparsity=0.75, begin_step=5, end_step=20,
                             frequency=5, exclude="^logits$")
  weights = []
  for strategy in (one_device, mirrored):
    trainer = _pruned_trainer(strategy, schedule)
    logs = trainer.fit(data, steps=30).last_logs
    kernels = {k.path: k.numpy() for k in trainer.pruner.kernels}
    assert len(kernels) == 2  # the two hidden kernels; logits excluded
    for path, kernel in kernels.items():
      assert np.sum(kernel == 0) == round(0.75 * kernel.size), path
      mask = strategy.experimental_local_results(trainer.pruner.masks[path])
      for replica_mask in mask:  # the same mask on every replica
        np.testing.assert_array_equal(replica_mask.numpy(), kernel != 0)
    assert logs["sparsity"] == pytest.approx(0.75, abs=1e-3)
    logits = trainer.model.get_layer("logits").kernel.numpy()
    assert np.all(logits != 0)  # excluded
    weights.append(trainer.model.get_weights())
  for a, b in zip(*weights):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def _config(steps, **pruning):
  config = digits.get_config()
  config.train.steps = steps
  config.train.deterministic = True
  config.train.checkpoint_every = 100
  config.callbacks.progress_bar = False
  config.callbacks.tensorboard = False
  for key, value in pruning.items():
    config.pruning[key] = value
  return config


@pytest.mark.slow  # in-process, but over 5 s: CI runs it
def test_pruned_digits_resume_is_exact_and_accuracy_stays_near_dense(
    tmp_path):
  pruning = dict(target_sparsity=0.8, begin_step=100, end_step=400,
                 frequency=50)
  straight = run(_config(600, **pruning), str(tmp_path / "straight"))
  run(_config(250, **pruning), str(tmp_path / "resumed"))  # mid-schedule
  resumed = run(_config(600, **pruning), str(tmp_path / "resumed"))
  dense = run(_config(600), str(tmp_path / "dense"))
  want, got = variables(tmp_path / "straight"), variables(
      tmp_path / "resumed")
  assert sorted(got) == sorted(want)
  assert sum("pruning_masks" in name for name in want) == 2  # dense_0, dense_1
  for name, value in want.items():
    np.testing.assert_array_equal(got[name], value, err_msg=name)
  assert resumed.logs["sparsity"] == pytest.approx(0.8, abs=1e-3)
  # The stated bound: 80% sparse hidden layers lose at most 3 points.
  assert straight.logs["eval/accuracy"] >= dense.logs["eval/accuracy"] - 0.03
  assert dense.logs["eval/accuracy"] > 0.95


def test_saved_model_keeps_the_zeros_without_masks(tmp_path, one_device):
  rng = np.random.RandomState(0)
  x = rng.normal(size=(256, 6)).astype(np.float32)
  y = rng.randint(0, 3, size=256).astype(np.int32)
  data = tf.data.Dataset.from_tensor_slices((x, y)).repeat().batch(32)
  trainer = _pruned_trainer(one_device, PruningSchedule(
      target_sparsity=0.5, begin_step=0, end_step=10, frequency=5))
  trainer.fit(data, steps=15)
  path = str(tmp_path / "pruned.keras")
  trainer.model.save(path)
  loaded = keras.models.load_model(path)
  assert not any("mask" in v.path for v in loaded.variables)
  for layer in loaded.layers[:2]:  # the hidden layers; logits excluded
    kernel = layer.kernel.numpy()
    assert np.sum(kernel == 0) == round(0.5 * kernel.size), layer.name
  np.testing.assert_array_equal(loaded.predict(x, verbose=0),
                                trainer.model.predict(x, verbose=0))


def test_export_of_a_pruned_run_keeps_the_exact_sparsity(tmp_path):
  from trainer.export import exporter as export_lib  # pylint: disable=import-outside-toplevel
  config = _config(200, target_sparsity=0.8, begin_step=20, end_step=100,
                   frequency=20)
  result = run(config, str(tmp_path))
  saved = json.loads((tmp_path / "config.json").read_text())
  del saved["model"]["sync_batch_norm"]  # as written by an older version
  (tmp_path / "config.json").write_text(json.dumps(saved))
  report = export_lib.export(str(tmp_path),
                             formats=("keras", "tflite_float32"))
  loaded = keras.models.load_model(str(tmp_path / "export" / "model.keras"))
  assert not any("mask" in v.path for v in loaded.variables)  # stripped
  for name in ("dense_0", "dense_1"):
    kernel = loaded.get_layer(name).kernel.numpy()
    assert np.sum(kernel == 0) == round(0.8 * kernel.size), name
  for name in ("keras", "tflite_float32"):
    assert report["formats"][name]["metrics"]["accuracy"] == pytest.approx(
        result.logs["eval/accuracy"], abs=1e-6)


def test_masks_restore_by_position(tmp_path, one_device):
  """Masks are saved by position: a model whose automatic layer names
  differ in the resuming process (`dense_3`, not `dense`) gets them back."""
  from trainer.checkpoint.checkpointer import Checkpointer  # pylint: disable=import-outside-toplevel

  def trainer():
    with one_device.scope():
      model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8),
                                keras.layers.Dense(3)])
    return Trainer(model=model, optimizer=keras.optimizers.SGD(), loss=LOSS,
                   strategy=one_device, pruning=PruningSchedule(
                       target_sparsity=0.5, begin_step=0, end_step=4,
                       exclude=""))

  def state(t, **kwargs):
    return Checkpointer(str(tmp_path / kwargs.pop("name")), model=t.model,
                        optimizer=t.optimizer, global_step=t.global_step,
                        **kwargs)

  saved = trainer()
  for i, mask in enumerate(saved.pruner.masks.values()):
    mask.assign(np.random.default_rng(i).integers(0, 2, mask.shape))
  want = [m.numpy() for m in saved.pruner.masks.values()]
  state(saved, name="by_position", pruning_masks=saved.pruner.masks).save()
  again = trainer()
  assert list(again.pruner.masks) != list(saved.pruner.masks)  # new names
  for mask in again.pruner.masks.values():
    mask.assign(tf.ones_like(mask))
  state(again, name="by_position",
        pruning_masks=again.pruner.masks).restore_latest()
  for got, value in zip(again.pruner.masks.values(), want):
    np.testing.assert_array_equal(got.numpy(), value)
