"""Callbacks in the Trainer: the Keras protocol, global logs, stock callbacks."""

import csv
import io
import contextlib

import keras
import numpy as np
import pytest
import tensorflow as tf

from trainer import Trainer
from trainer.errors import TrainingDiverged

GLOBAL_BATCH = 8


def _data(n=64, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, 5)).astype("float32")
  y = rng.integers(0, 3, size=(n,)).astype("int32")
  return x, y


def _trainer(strategy, lr=0.1, steps_per_loop=1, optimizer=None):
  with strategy.scope():
    model = keras.Sequential([keras.Input((5,)),
                              keras.layers.Dense(3, kernel_initializer="ones",
                                                 bias_initializer="zeros")])
  return Trainer(
      model=model, optimizer=optimizer or keras.optimizers.SGD(lr),
      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True,
                                                      reduction="none"),
      metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
      strategy=strategy, steps_per_loop=steps_per_loop)


def _datasets(n=64):
  x, y = _data(n)
  train = tf.data.Dataset.from_tensor_slices((x, y)).repeat().batch(
      GLOBAL_BATCH)
  test = tf.data.Dataset.from_tensor_slices(_data(20, seed=1)).batch(6)
  return x, y, train, test


class HookRecorder(keras.callbacks.Callback):
  """A user's subclass that records every hook it sees."""

  def __init__(self):
    super().__init__()
    self.calls = []

  def on_train_begin(self, logs=None):
    self.calls.append(("train_begin",))

  def on_epoch_begin(self, epoch, logs=None):
    self.calls.append(("epoch_begin", epoch))

  def on_train_batch_begin(self, batch, logs=None):
    self.calls.append(("batch_begin", batch))

  def on_train_batch_end(self, batch, logs=None):
    self.calls.append(("batch_end", batch))

  def on_test_begin(self, logs=None):
    self.calls.append(("test_begin",))

  def on_test_end(self, logs=None):
    self.calls.append(("test_end",))

  def on_epoch_end(self, epoch, logs=None):
    self.calls.append(("epoch_end", epoch, sorted(logs)))

  def on_train_end(self, logs=None):
    self.calls.append(("train_end",))


def test_user_callback_sees_every_hook_in_order(mirrored):
  *_, train, test = _datasets()
  recorder = HookRecorder()
  _trainer(mirrored, steps_per_loop=2).fit(
      train, steps=6, steps_per_epoch=3, validation_data=test, callbacks=[recorder]).last_logs
  epoch_keys = ["accuracy", "learning_rate", "loss", "val_accuracy",
                "val_loss"]
  one_epoch = lambda e: [("epoch_begin", e), ("batch_begin", 0),
                         ("batch_end", 1), ("batch_begin", 2),
                         ("batch_end", 2), ("test_begin",), ("test_end",),
                         ("epoch_end", e, epoch_keys)]
  assert recorder.calls == ([("train_begin",)] + one_epoch(0) + one_epoch(1)
                            + [("train_end",)])


def test_the_issue_example_callback_prints_loss_and_accuracy(mirrored):
  class CustomCallback(keras.callbacks.Callback):

    def on_epoch_end(self, epoch, logs=None):
      logs = logs or {}
      print(f"End of epoch {epoch}, loss: {logs.get('loss')}, "
            f"accuracy: {logs.get('accuracy')}")

  *_, train, _ = _datasets()
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    _trainer(mirrored).fit(train, steps=4, steps_per_epoch=2,
                           callbacks=[CustomCallback()])
  lines = out.getvalue().strip().splitlines()
  assert [l.split(",")[0] for l in lines] == ["End of epoch 0",
                                              "End of epoch 1"]
  assert "None" not in out.getvalue()


def _numpy_loss_and_accuracy(weights, x, y):
  kernel, bias = weights
  logits = x @ kernel + bias
  logits = logits - logits.max(axis=1, keepdims=True)
  log_probs = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
  loss = -log_probs[np.arange(len(y)), y].mean()
  return loss, (logits.argmax(axis=1) == y).mean()


class WeightsAndLogs(keras.callbacks.Callback):

  def __init__(self):
    super().__init__()
    self.weights, self.logs = [], []

  def on_train_batch_begin(self, batch, logs=None):
    self.weights.append([w.copy() for w in self.model.get_weights()])

  def on_train_batch_end(self, batch, logs=None):
    self.logs.append(dict(logs))


def test_logs_loss_equals_numpy_loss_over_the_global_batch(mirrored):
  x, y, train, _ = _datasets()
  seen = WeightsAndLogs()
  _trainer(mirrored, lr=0.5).fit(train, steps=4, steps_per_epoch=1,
                                 callbacks=[seen]).last_logs
  assert len(seen.logs) == 4
  for i, (weights, logs) in enumerate(zip(seen.weights, seen.logs)):
    batch = slice(i * GLOBAL_BATCH, (i + 1) * GLOBAL_BATCH)
    loss, accuracy = _numpy_loss_and_accuracy(weights, x[batch], y[batch])
    assert logs["loss"] == pytest.approx(loss, rel=1e-5)
    assert logs["accuracy"] == pytest.approx(accuracy)
    assert logs["examples"] == GLOBAL_BATCH
  assert seen.weights[0][0].tolist() != seen.weights[3][0].tolist()


def test_batch_logs_average_over_the_epoch_so_far(mirrored):
  x, y, train, _ = _datasets()
  seen = WeightsAndLogs()
  _trainer(mirrored, lr=0.5).fit(train, steps=3, steps_per_epoch=3,
                                 callbacks=[seen]).last_logs
  losses = [_numpy_loss_and_accuracy(w, x[i * 8:(i + 1) * 8],
                                     y[i * 8:(i + 1) * 8])[0]
            for i, w in enumerate(seen.weights)]
  running = [np.mean(losses[:k + 1]) for k in range(3)]
  assert [l["loss"] for l in seen.logs] == pytest.approx(running, rel=1e-5)


def test_early_stopping_stops_a_mirrored_run_at_the_expected_step(mirrored):
  *_, train, test = _datasets()
  stopper = keras.callbacks.EarlyStopping(monitor="val_loss", min_delta=100,
                                          patience=1)
  trainer = _trainer(mirrored)
  trainer.fit(train, steps=50, steps_per_epoch=5, validation_data=test,
              callbacks=[stopper])
  # Epoch 0 sets the best; epoch 1 cannot improve by 100: stop after it.
  assert stopper.stopped_epoch == 1
  assert int(trainer.global_step.numpy()) == 10


def test_early_stopping_restores_the_best_weights(mirrored):
  *_, train, test = _datasets()
  best = {}

  def remember(epoch, logs):
    best.setdefault("loss", (np.inf, None))
    if logs["val_loss"] < best["loss"][0]:
      best["loss"] = (logs["val_loss"], trainer.model.get_weights())

  trainer = _trainer(mirrored, lr=3.0)  # large steps: val_loss goes up
  stopper = keras.callbacks.EarlyStopping(monitor="val_loss", patience=2,
                                          restore_best_weights=True)
  trainer.fit(train, steps=40, steps_per_epoch=2, validation_data=test,
              callbacks=[keras.callbacks.LambdaCallback(
                  on_epoch_end=remember), stopper])
  for got, want in zip(trainer.model.get_weights(), best["loss"][1]):
    np.testing.assert_array_equal(got, want)
  assert trainer.evaluate(test)["loss"] == pytest.approx(best["loss"][0])


def test_reduce_lr_on_plateau_changes_the_rate_the_step_uses(mirrored):
  *_, train, test = _datasets()
  trainer = _trainer(mirrored, lr=0.1)
  epochs = []
  trainer.fit(train, steps=6, steps_per_epoch=2, validation_data=test, callbacks=[
      keras.callbacks.ReduceLROnPlateau(monitor="val_loss", factor=0.5,
                                        patience=0, min_delta=100),
      keras.callbacks.LambdaCallback(
          on_epoch_end=lambda e, logs: epochs.append(logs["learning_rate"]))])
  # Epoch logs hold the rate the epoch trained with. After epoch 0 every
  # epoch is a plateau: the rate halves at the end of epochs 1 and 2.
  assert epochs == pytest.approx([0.1, 0.1, 0.05])
  assert trainer.learning_rate() == pytest.approx(0.025)


def test_learning_rate_scheduler_sets_the_rate_each_epoch(mirrored):
  *_, train, _ = _datasets()
  seen = []
  trainer = _trainer(mirrored)
  trainer.fit(train, steps=6, steps_per_epoch=2, callbacks=[
      keras.callbacks.LearningRateScheduler(lambda epoch: 0.1 / (epoch + 1)),
      keras.callbacks.LambdaCallback(
          on_train_batch_end=lambda b, logs: seen.append(
              logs["learning_rate"]))])
  assert seen == pytest.approx([0.1, 0.1, 0.05, 0.05, 0.1 / 3, 0.1 / 3])


def _nan_at_step_3():
  x, y = _data()
  x[2 * GLOBAL_BATCH + 5] = np.nan  # one example of step 3, on replica 1
  return tf.data.Dataset.from_tensor_slices((x, y)).batch(GLOBAL_BATCH)


def test_terminate_on_nan_stops_after_the_first_bad_loop(mirrored, policy):
  policy("mixed_float16")  # the loss scale skips the step; the loss is NaN
  trainer = _trainer(mirrored)
  logs = trainer.fit(_nan_at_step_3(), steps=8, steps_per_epoch=4,
                     callbacks=[keras.callbacks.TerminateOnNaN()]).last_logs
  assert np.isnan(logs["loss"]) and logs["skipped_steps"] == 1
  assert int(trainer.global_step.numpy()) == 3


def test_nan_loss_in_float32_raises_before_any_callback_sees_it(mirrored):
  seen = WeightsAndLogs()
  with pytest.raises(TrainingDiverged, match="after global step 3") as e:
    _trainer(mirrored).fit(_nan_at_step_3(), steps=8, steps_per_epoch=4,
                           callbacks=[seen])
  assert e.value.step == 3 and np.isnan(e.value.loss)
  assert len(seen.logs) == 2  # steps 1 and 2 only


def test_csv_logger_writes_one_row_per_epoch(mirrored, tmp_path):
  *_, train, test = _datasets()
  path = tmp_path / "log.csv"
  _trainer(mirrored).fit(train, steps=6, steps_per_epoch=2, validation_data=test,
                         callbacks=[keras.callbacks.CSVLogger(str(path))])
  with open(path, encoding="utf-8") as f:
    rows = list(csv.DictReader(f))
  assert [r["epoch"] for r in rows] == ["0", "1", "2"]
  assert set(rows[0]) == {"epoch", "accuracy", "learning_rate", "loss",
                          "val_accuracy", "val_loss"}


def test_stop_training_ends_the_run_after_the_current_loop(mirrored):
  *_, train, _ = _datasets()
  trainer = _trainer(mirrored, steps_per_loop=3)

  def stop(batch, logs):
    trainer.model.stop_training = True

  trainer.fit(train, steps=30, steps_per_epoch=10, callbacks=[
      keras.callbacks.LambdaCallback(on_train_batch_end=stop)])
  assert int(trainer.global_step.numpy()) == 3


def test_finite_data_ending_at_an_epoch_boundary_gets_no_empty_epoch(
    mirrored):
  x, y = _data(32)  # 4 global batches, then the data runs out
  train = tf.data.Dataset.from_tensor_slices((x, y)).batch(GLOBAL_BATCH)
  epochs = []
  trainer = _trainer(mirrored, steps_per_loop=2)
  trainer.fit(train, steps=10, steps_per_epoch=2, callbacks=[
      keras.callbacks.LambdaCallback(
          on_epoch_end=lambda e, logs: epochs.append((e, logs["loss"])))])
  assert int(trainer.global_step.numpy()) == 4
  assert [e for e, _ in epochs] == [0, 1] and all(l > 0 for _, l in epochs)
