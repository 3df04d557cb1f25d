"""`input_wait`: the share of each host loop the train step spent waiting
for its input, and the warning when the input cannot keep up."""

import logging
import time

import keras
import numpy as np
import pytest
import tensorflow as tf
from tensorflow.python.framework import config as tf_config

from trainer.fit.trainer import Trainer

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True,
                                                  reduction="none")


class _Loops(keras.callbacks.Callback):
  def __init__(self):
    super().__init__()
    self.logs = []

  def on_train_batch_end(self, batch, logs=None):
    self.logs.append(dict(logs))


def _slow(x):
  time.sleep(0.02)  # a decode that takes 20 ms a batch
  return x


def _fit(dataset, strategy, caplog):
  with strategy.scope():
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
  trainer = Trainer(model=model, optimizer=keras.optimizers.SGD(0.1),
                    loss=LOSS, strategy=strategy, steps_per_loop=4)
  loops = _Loops()
  with caplog.at_level(logging.WARNING):
    trainer.fit(dataset, steps=24, callbacks=[loops])
  warnings = [r.getMessage() for r in caplog.records
              if r.getMessage().startswith("input-bound")]
  return [l.get("input_wait") for l in loops.logs], warnings


def _examples():
  x = np.random.default_rng(0).normal(size=(64, 4)).astype("float32")
  return tf.data.Dataset.from_tensor_slices((x, (x[:, 0] > 0).astype(
      "int32"))).batch(8, drop_remainder=True).repeat()


@pytest.mark.parametrize("strategy", ["one_device", "mirrored"])
def test_a_slow_input_is_measured_and_warned_about_once(strategy, caplog,
                                                        mirrored):
  strategy = (tf.distribute.OneDeviceStrategy("/cpu:0")
              if strategy == "one_device" else mirrored)
  slow = _examples().map(lambda x, y: (tf.numpy_function(
      _slow, [x], tf.float32, stateful=True), y)).map(
          lambda x, y: (tf.ensure_shape(x, [8, 4]), y))
  waits, warnings = _fit(slow, strategy, caplog)
  assert len(waits) == 6 and min(waits[2:]) > 0.5, waits
  assert len(warnings) == 1, warnings
  assert "steps 16-20" in warnings[0]  # the third loop in a row


def test_an_input_in_memory_is_not_warned_about(caplog):
  waits, warnings = _fit(_examples().cache(),
                         tf.distribute.OneDeviceStrategy("/cpu:0"), caplog)
  assert sorted(waits)[3] < 0.5, waits  # a loop of 1 ms can be the machine
  assert not warnings


def test_deterministic_runs_train_without_measuring_it(caplog):
  """tf.timestamp fails under op determinism: the key is left out."""
  tf.config.experimental.enable_op_determinism()
  try:
    waits, warnings = _fit(_examples(), tf.distribute.OneDeviceStrategy(
        "/cpu:0"), caplog)
  finally:
    tf_config.disable_op_determinism()  # no public API
  assert waits == [None] * 6 and not warnings


def test_a_deterministic_run_does_not_make_the_next_one_deterministic():
  """trainer.run turns op determinism on for its own run only."""
  from trainer.config import default_config  # pylint: disable=import-outside-toplevel
  from trainer.run import run  # pylint: disable=import-outside-toplevel
  config = default_config()
  config.train.steps, config.train.steps_per_loop = 6, 2
  config.callbacks.progress_bar = False
  config.train.deterministic = True
  assert "input_wait" not in run(config, None).logs
  assert not tf_config.is_op_determinism_enabled()
  config.train.deterministic = False
  assert "input_wait" in run(config, None).logs
