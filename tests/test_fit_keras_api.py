"""The Python API in Keras' words: the seed program's custom loop moved onto
`Trainer.fit(dataset, epochs=...)`, numpy inputs, History, evaluate and
predict, and one-line ValueErrors naming the argument."""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from configs.custom_dense import MyDense
from conftest import ROOT, run_module
from trainer.fit import inputs as inputs_lib
from trainer.fit.trainer import Trainer

EPOCHS, BATCH = 10, 32


def _data():
  rng = np.random.default_rng(0)
  return (rng.random((100, 10), dtype=np.float32),
          rng.integers(0, 10, size=100).astype(np.int32))


def _model():
  keras.utils.set_random_seed(7)
  return keras.Sequential([keras.Input((10,)), MyDense(64, activation="relu"),
                           keras.layers.Dense(10, dtype="float32")])


def _seed_loop():
  """The seed program's own loop: one device, float32, GradientTape."""
  x, y = _data()
  model, optimizer = _model(), keras.optimizers.Adam(1e-2)
  loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
  dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH)
  losses = []
  for _ in range(EPOCHS):
    total = 0.0
    for xb, yb in dataset:
      with tf.GradientTape() as tape:
        loss = loss_fn(yb, model(xb, training=True))
      grads = tape.gradient(loss, model.trainable_variables)
      optimizer.apply_gradients(zip(grads, model.trainable_variables))
      total += float(loss) * len(yb)
    losses.append(total / len(y))
  return model.get_weights(), losses


class EpochEnd(keras.callbacks.Callback):
  """The seed's epoch-end callback, recording what it would print."""

  def __init__(self):
    super().__init__()
    self.seen = []

  def on_epoch_end(self, epoch, logs=None):
    self.seen.append((epoch, logs["loss"], logs["accuracy"]))


def _trainer(strategy):
  with strategy.scope():
    model = _model()
  return Trainer(
      model=model, optimizer=keras.optimizers.Adam(1e-2), strategy=strategy,
      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True,
                                                      reduction="none"),
      metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
      steps_per_loop=3)


@pytest.fixture(scope="module")
def seed():
  return _seed_loop()


@pytest.mark.slow  # in-process, but over 5 s: CI runs it
@pytest.mark.parametrize("policy", ["float32", "mixed_float16"])
def test_seed_loop_as_fit_epochs_on_2_replicas_equals_the_seed(
    seed, mirrored, policy):
  """fit(dataset, epochs=10): 4 steps per epoch (the last of 4 examples,
  averaged over them); float32 equals the seed's loop to float32 rounding,
  mixed_float16 to float16's."""
  want_weights, want_losses = seed
  x, y = _data()
  keras.mixed_precision.set_dtype_policy(policy)
  try:
    trainer = _trainer(mirrored)
    callback = EpochEnd()
    history = trainer.fit(
        tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH),
        epochs=EPOCHS, callbacks=[callback])
  finally:
    keras.mixed_precision.set_dtype_policy("float32")
  assert isinstance(history, keras.callbacks.History)
  assert history.epoch == list(range(EPOCHS))
  assert len(history.history["loss"]) == EPOCHS
  assert [e for e, _, _ in callback.seen] == list(range(EPOCHS))
  assert int(trainer.global_step.numpy()) == EPOCHS * 4
  # mixed_float16: on a CPU with AVX512-FP16 (oneDNN's native float16
  # kernels) 5 of 640 weights of one hidden unit drift by up to 0.043 over
  # 40 Adam steps of 1e-2 (Adam moves a weight ~lr per step whatever the
  # sign of a near-zero gradient); 0.02 held on CPUs without it.
  tol = ({"rtol": 1e-5, "atol": 1e-5} if policy == "float32" else
         {"rtol": 0.05, "atol": 0.06})
  np.testing.assert_allclose(history.history["loss"], want_losses, **tol)
  for got, want in zip(trainer.model.get_weights(), want_weights):
    np.testing.assert_allclose(got, want, **tol)
  assert history.last_logs["loss"] == history.history["loss"][-1]


def test_numpy_inputs_give_the_same_weights_as_the_dataset(mirrored):
  x, y = _data()
  runs = []
  for form in ("dataset", "numpy"):
    trainer = _trainer(mirrored)
    if form == "dataset":
      trainer.fit(tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH),
                  epochs=3)
    else:
      trainer.fit(x, y, batch_size=BATCH, epochs=3, shuffle=False)
    runs.append(trainer.model.get_weights())
  for a, b in zip(*runs):
    np.testing.assert_array_equal(a, b)


def test_numpy_inputs_are_reshuffled_every_epoch_with_the_trainer_seed(
    mirrored):
  """Two epochs see the examples in two different orders; the same seed
  gives the same orders; shuffle=False keeps the given order."""
  x, y = _data()
  orders = {}
  for name, shuffle in (("a", True), ("b", True), ("plain", False)):
    trainer = _trainer(mirrored)
    data = inputs_lib.as_input(x, np.arange(100), batch_size=100,
                               replicas=2, shuffle=shuffle, seed=trainer.seed)
    orders[name] = [np.concatenate([b[1].numpy() for b in data])
                    for _ in range(2)]
  assert not np.array_equal(*orders["a"])  # epoch 2 is another order
  for epoch in range(2):
    np.testing.assert_array_equal(orders["a"][epoch], orders["b"][epoch])
    np.testing.assert_array_equal(orders["plain"][epoch], np.arange(100))
    assert sorted(orders["a"][epoch]) == list(range(100))


def test_epochs_count_from_each_call_and_initial_epoch(mirrored):
  """Keras' meaning: a second fit(epochs=2) trains 2 more epochs; with
  initial_epoch=1 it trains epochs 1 .. 2 only; steps_per_epoch below one
  pass goes on through the data (a new pass only when it runs out)."""
  x, y = _data()
  data = tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH)  # 4/pass
  trainer = _trainer(mirrored)
  assert trainer.fit(data, epochs=2).epoch == [0, 1]
  assert trainer.fit(data, epochs=2).epoch == [0, 1]
  assert int(trainer.global_step.numpy()) == 16
  history = trainer.fit(data, epochs=3, initial_epoch=1)
  assert history.epoch == [1, 2] and int(trainer.global_step.numpy()) == 24
  history = trainer.fit(data, epochs=3, steps_per_epoch=3)
  # 3 steps; 1 (the data runs out: the epoch ends early); a new pass, 3.
  assert int(trainer.global_step.numpy()) == 24 + 7
  assert len(history.history["loss"]) == 3


def test_stock_monitor_callbacks_find_the_trainers_metrics(mirrored):
  """EarlyStopping(monitor='val_accuracy') with mode 'auto' looks for the
  metric in a compiled model's metrics; the trainer tells it the way."""
  x, y = _data()
  stop = keras.callbacks.EarlyStopping(monitor="val_accuracy", patience=1)
  _trainer(mirrored).fit(x, y, batch_size=BATCH, epochs=3,
                         validation_data=(x, y), callbacks=[stop])
  assert stop.mode == "max"


def test_validation_split_and_validation_data(mirrored):
  x, y = _data()
  trainer = _trainer(mirrored)
  history = trainer.fit(x, y, batch_size=BATCH, epochs=2,
                        validation_split=0.2)
  assert history.last_logs["eval/num_examples"] == 20
  # The last 20 rows, as in Keras.
  assert history.history["val_loss"][-1] == pytest.approx(
      trainer.evaluate(x[80:], y[80:])["loss"], rel=1e-6)
  assert len(history.history["val_loss"]) == 2
  history = _trainer(mirrored).fit(x[:80], y[:80], batch_size=BATCH,
                                   epochs=2, validation_data=(x[80:], y[80:]))
  assert history.last_logs["eval/num_examples"] == 20


def test_predict_on_2_replicas_equals_the_model_row_by_row(mirrored):
  """Batches of 32 on 2 replicas: 100 = 3 x 32 + 4, and per-replica
  batches of 16 leave replica 1 without an example at the end."""
  x, y = _data()
  trainer = _trainer(mirrored)
  trainer.fit(x, y, batch_size=BATCH, epochs=1)
  want = trainer.model(x).numpy()
  got = trainer.predict(x, batch_size=BATCH)
  assert got.shape == (100, 10)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  from_dataset = trainer.predict(
      tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH))
  np.testing.assert_allclose(from_dataset, want, rtol=1e-5, atol=1e-6)
  logs = trainer.evaluate(x, y, batch_size=BATCH)
  assert logs["num_examples"] == 100
  want_accuracy = np.mean(want.argmax(-1) == y)
  assert logs["accuracy"] == pytest.approx(want_accuracy, abs=1e-7)


def test_predict_returns_a_nest_for_several_outputs(mirrored):
  with mirrored.scope():
    inputs = keras.Input((10,), name="features")
    hidden = keras.layers.Dense(8)(inputs)
    model = keras.Model({"features": inputs},
                        {"a": keras.layers.Dense(2)(hidden),
                         "b": keras.layers.Dense(3)(hidden)})
  trainer = Trainer(model=model, optimizer=keras.optimizers.SGD(0.1),
                    loss=lambda y, p: tf.zeros_like(y, tf.float32),
                    strategy=mirrored)
  x, _ = _data()
  got = trainer.predict({"features": x[:37]}, batch_size=8)
  want = model({"features": x[:37]})
  assert sorted(got) == ["a", "b"]
  for key in got:
    np.testing.assert_allclose(got[key], want[key].numpy(), rtol=1e-5,
                               atol=1e-6)


BAD = [  # (what replaces the good arguments, the message)
    (dict(epochs=2, steps=5), "pass `epochs` or `steps`, not both"),
    (dict(x="a dataset"), "`y` must be None when `x` is a"),
    (dict(y="99 labels"), "`x` has 100 examples but `y` has 99 examples"),
    (dict(batch_size=33), "`batch_size`=33 cannot be split evenly across 2 "
     "replicas"),
    (dict(validation_split=1.5), "`validation_split` must be in (0, 1)"),
]


@pytest.mark.parametrize("change,message", BAD, ids=[m for _, m in BAD])
def test_bad_arguments_are_one_line_value_errors(mirrored, change, message):
  x, y = _data()
  kwargs = {"x": x, "y": y, **change}
  if isinstance(kwargs["x"], str):
    kwargs["x"] = tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH)
  if isinstance(kwargs["y"], str):
    kwargs["y"] = y[:99]
  with pytest.raises(ValueError) as raised:
    _trainer(mirrored).fit(**kwargs)
  assert message in str(raised.value)
  assert "\n" not in str(raised.value)


@pytest.mark.slow
def test_predict_on_2_workers_gives_each_worker_the_whole_result(tmp_path):
  """Each worker of a 2-worker job returns all 100 rows in input order."""
  job = run_module("launch.local", "--num_workers=2", "--module=predict_job",
                   "--", f"--out={tmp_path}", timeout=240,
                   env={"PYTHONPATH": os.path.join(ROOT, "tests", "helpers")})
  assert job.returncode == 0, job.stderr[-3000:]
  for worker in (0, 1):
    got = np.load(tmp_path / f"predict_{worker}.npy")
    want = np.load(tmp_path / f"model_{worker}.npy")
    assert got.shape == (100, 10)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(np.load(tmp_path / "predict_0.npy"),
                                np.load(tmp_path / "predict_1.npy"))


def test_compile_habits_optimizer_and_metric_names():
  """`optimizer="adam"`, `metrics=["accuracy", "sparse_top_k_categorical_
  accuracy"]` as Keras' compile
  takes them (both were an AttributeError: 'str' has no attribute
  'from_config'): the same weights as the objects, "accuracy" the kind the
  loss implies (sparse labels: SparseCategoricalAccuracy), each logged
  under the name given; an unknown name or an ambiguous "accuracy" is one
  ValueError line."""
  x, y = _data()

  def fit(optimizer, metrics):
    model = _model()
    trainer = Trainer(model=model, optimizer=optimizer,
                      loss="sparse_categorical_crossentropy", metrics=metrics)
    history = trainer.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False)
    return model.get_weights(), history.history

  named_weights, named = fit(
      "adam", ["accuracy", "sparse_top_k_categorical_accuracy"])
  object_weights, objects = fit(
      keras.optimizers.Adam(),
      [keras.metrics.SparseCategoricalAccuracy(name="accuracy")])
  for a, b in zip(named_weights, object_weights):
    np.testing.assert_array_equal(a, b)
  assert named["accuracy"] == objects["accuracy"]
  assert 0 < named["sparse_top_k_categorical_accuracy"][0] <= 1
  with pytest.raises(ValueError, match="unknown metric 'acuracy'"):
    Trainer(model=_model(), optimizer="adam", loss="mse",
            metrics=["acuracy"])
  with pytest.raises(ValueError, match="say which accuracy"):
    Trainer(model=_model(), optimizer="adam", loss="mse",
            metrics=["accuracy"])
  with pytest.raises(ValueError, match="unknown optimizer 'adamm'"):
    Trainer(model=_model(), optimizer="adamm", loss="mse")
