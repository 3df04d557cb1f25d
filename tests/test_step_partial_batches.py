"""Partial batches on several replicas, for every built-in model: a replica
may receive fewer examples than the others, or none (DESIGN.md fact 17);
evaluation stays exact and training on finite data equals one device."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tests.helpers import examples
from trainer import data as data_lib
from trainer.tasks import models
from trainer.config import default_config
from trainer.fit.trainer import Trainer

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True,
                                                  reduction="none")


def _trainer(strategy, name, seed=0, learning_rate=0.1):
  cfg = default_config().model
  cfg.name, cfg.width, cfg.depth = name, 8, 1
  info = data_lib.DataInfo((8, 8, 1), 10, None, None)
  with strategy.scope():
    keras.utils.set_random_seed(seed)
    model = models.build_model(cfg, info)
  return Trainer(model=model, optimizer=keras.optimizers.SGD(learning_rate),
                 loss=LOSS, strategy=strategy, steps_per_loop=10,
                 metrics=[keras.metrics.SparseCategoricalAccuracy("accuracy")])


@pytest.mark.parametrize("name", ["mlp", "cnn", "resnet"])
def test_eval_with_an_empty_replica_counts_every_example_once(mirrored, name):
  """300 examples in per-replica batches of 64 on 2 replicas: the last
  batch (44) goes to replica 0 and replica 1 gets nothing. It crashed for
  conv and batch-norm models ('input depth must be evenly divisible by
  filter depth: 1 vs 32')."""
  x, y = examples.images(300)
  trainer = _trainer(mirrored, name)
  fn = data_lib.input_fn(tf.data.Dataset.from_tensor_slices((x, y)),
                         global_batch_size=128, training=False)
  logs = trainer.evaluate(fn)
  logits = trainer.model.predict(x, batch_size=300, verbose=0)
  assert logs["num_examples"] == 300
  assert logs["accuracy"] == pytest.approx(
      np.mean(np.argmax(logits, -1) == y), abs=1e-7)
  assert logs["loss"] == pytest.approx(float(np.mean(LOSS(y, logits))),
                                       rel=1e-5)


@pytest.mark.parametrize("name", ["cnn", "resnet"])
def test_finite_training_with_an_empty_replica_equals_one_device(
    mirrored, one_device, name):
  """65 examples in global batches of 32: the last step has one example,
  so replica 1 gets none. The loss averages over all 65 examples; for the
  CNN the weights equal those of one device (a ResNet's unsynchronized
  batch norm normalizes each replica's half on its own, so its numbers
  differ from one device by design: there it must run and count right)."""
  x, y = examples.images(65)
  data = tf.data.Dataset.from_tensor_slices((x, y)).batch(32)
  results = {}
  for label, strategy in (("one", one_device), ("two", mirrored)):
    trainer = _trainer(strategy, name)
    logs = trainer.fit(data, steps=100).last_logs
    assert trainer.global_step.numpy() == 3  # 32 + 32 + 1: data ran out
    results[label] = (logs, trainer.model.get_weights(),
                      [v.name for v in trainer.model.weights])
  (one_logs, one_w, names), (two_logs, two_w, _) = results["one"], results[
      "two"]
  assert one_logs["examples"] == two_logs["examples"] == 65  # one loop
  assert np.isfinite(two_logs["loss"])
  if name == "resnet":
    return
  assert two_logs["loss"] == pytest.approx(one_logs["loss"], rel=1e-5)
  for name_, a, b in zip(names, one_w, two_w):
    np.testing.assert_allclose(b, a, rtol=2e-4, atol=2e-5, err_msg=name_)


@pytest.mark.slow  # in-process, but over 5 s: CI runs it
def test_replicas_keep_one_set_of_batch_norm_statistics(mirrored, one_device):
  """Unsynchronized batch norm: each replica updates its own copy of the
  moving statistics (DESIGN.md fact 19); the step averages them, weighted
  by each replica's examples, so every replica holds the same values. The
  moving mean is linear in the batch: with the weights held still
  (learning rate 0), the first batch norm's equals one device's, also after
  a step whose one example leaves replica 1 empty (it must not count).
  (Deeper layers see inputs normalized per replica, so theirs differ.)"""
  x, y = examples.images(65)
  data = tf.data.Dataset.from_tensor_slices((x, y)).batch(32)  # 32, 32, 1
  moving = {}
  for label, strategy in (("one", one_device), ("two", mirrored)):
    trainer = _trainer(strategy, "resnet", learning_rate=0.0)
    trainer.fit(data, steps=3)
    assert int(trainer.global_step.numpy()) == 3
    moving[label] = {v.path: v for v in trainer.model.non_trainable_variables
                     if "moving" in v.path}
  assert "batch_normalization/moving_mean" in moving["two"]
  for path, v in moving["two"].items():
    copies = [t.numpy() for t in mirrored.experimental_local_results(v.value)]
    np.testing.assert_array_equal(copies[0], copies[1], err_msg=path)
    if path == "batch_normalization/moving_mean":
      np.testing.assert_allclose(copies[0], moving["one"][path].numpy(),
                                 rtol=1e-4, atol=1e-5, err_msg=path)
