"""A task's own train_step written the way Keras users write theirs
(issue 35): fresh noise per call, updates applied in order, label-free
data, no evaluation, and the single-device habits it warns about."""

import logging

import keras
import numpy as np
import pytest
import tensorflow as tf

from trainer import config as config_lib
from trainer.errors import ConfigError
from trainer.fit.trainer import Trainer
from trainer.run import run

LR = 0.1


def _bce(label, logits):
  return tf.nn.sigmoid_cross_entropy_with_logits(
      labels=tf.fill(tf.shape(logits), label), logits=logits)


def _linear_gan(strategy):
  """G: x [2] -> [2] and D: [2] -> logit, no biases, fixed weights."""
  with strategy.scope():
    g = keras.Sequential([keras.Input((2,)), keras.layers.Dense(
        2, use_bias=False, kernel_initializer=keras.initializers.Constant(
            [[0.5, -0.2], [0.3, 0.8]]))], name="g")
    d = keras.Sequential([keras.Input((2,)), keras.layers.Dense(
        1, use_bias=False, kernel_initializer=keras.initializers.Constant(
            [[0.7], [-0.4]]))], name="d")
  return {"generator": g, "discriminator": d}


def _ordered_step(batch, step, now=True):
  """Keras' GAN order: D's update, then G's loss against the new D."""
  g, d = step.models["generator"], step.models["discriminator"]
  real = batch  # x alone: no labels
  d_loss = step.mean(_bce(1.0, d(real)[:, 0]) + _bce(0.0, d(g(real))[:, 0]))
  step.apply(d_loss, "discriminator", now=now)
  g_loss = step.mean(_bce(1.0, d(g(real))[:, 0]))
  step.apply(g_loss, "generator")
  return {"d_loss": d_loss, "g_loss": g_loss}


def _by_hand(x):
  """One step of the same GAN eagerly, as a Keras train_step does it."""
  wg = tf.Variable([[0.5, -0.2], [0.3, 0.8]])
  wd = tf.Variable([[0.7], [-0.4]])
  with tf.GradientTape() as tape:
    d_loss = tf.reduce_mean(_bce(1.0, (x @ wd)[:, 0]) +
                            _bce(0.0, (x @ wg @ wd)[:, 0]))
  wd.assign_sub(LR * tape.gradient(d_loss, wd))
  with tf.GradientTape() as tape:
    g_loss = tf.reduce_mean(_bce(1.0, (x @ wg @ wd)[:, 0]))
  wg.assign_sub(LR * tape.gradient(g_loss, wg))
  return wg.numpy(), wd.numpy(), float(g_loss)


@pytest.mark.parametrize("strategy_name", ["one_device", "mirrored"])
def test_an_update_applied_now_is_seen_by_the_next_loss(strategy_name,
                                                        request):
  strategy = request.getfixturevalue(strategy_name)
  x = np.random.default_rng(0).normal(size=(8, 2)).astype(np.float32)
  models = _linear_gan(strategy)
  trainer = Trainer(model=models, strategy=strategy, train_step=_ordered_step,
                    optimizer={n: keras.optimizers.SGD(LR) for n in models})
  history = trainer.fit(x, batch_size=8, epochs=1, shuffle=False)
  wg, wd, g_loss = _by_hand(x)
  np.testing.assert_allclose(models["discriminator"].get_weights()[0], wd,
                             rtol=1e-6)
  np.testing.assert_allclose(models["generator"].get_weights()[0], wg,
                             rtol=1e-6)
  assert history.last_logs["g_loss"] == pytest.approx(g_loss, rel=1e-6)


def test_a_deferred_update_differs_and_its_order_is_warned(one_device,
                                                           caplog):
  """Both applied after the step (the default): G's loss saw the old D,
  and the log says how to get Keras' order."""
  x = np.random.default_rng(0).normal(size=(8, 2)).astype(np.float32)
  models = _linear_gan(one_device)
  trainer = Trainer(model=models, strategy=one_device,
                    train_step=lambda b, s: _ordered_step(b, s, now=False),
                    optimizer={n: keras.optimizers.SGD(LR) for n in models})
  with caplog.at_level(logging.WARNING):
    trainer.fit(x, batch_size=8, epochs=1, shuffle=False)
  wg, _, _ = _by_hand(x)
  assert np.abs(models["generator"].get_weights()[0] - wg).max() > 1e-4
  warned = [r.getMessage() for r in caplog.records
            if "reads variables that the 'discriminator' update" in
            r.getMessage()]
  assert len(warned) == 1, warned
  assert "step.apply(..., now=True)" in warned[0]


def test_now_under_jit_compile_is_one_error(one_device):
  models = _linear_gan(one_device)
  x = np.zeros((8, 2), np.float32)
  trainer = Trainer(model=models, strategy=one_device, jit_compile=True,
                    train_step=_ordered_step,
                    optimizer={n: keras.optimizers.SGD(LR) for n in models})
  with pytest.raises(ConfigError,
                     match="train.jit_compile cannot compile") as info:
    trainer.fit(x, batch_size=8, epochs=1)
  assert str(info.value).startswith("train_step: step.apply(..., "
                                    "'discriminator', now=True) updates")
  assert "\n" not in str(info.value)  # not autograph's "in user code:"


def _noise_step(batch, step):
  """Logs two normal draws and a uniform one; D trains on them."""
  d = step.models["discriminator"]
  a, b = step.random_normal([2]), step.random_normal([2])
  u = step.random_uniform([1], minval=-0.05, maxval=0.05)
  loss = step.mean(_bce(1.0, d(batch + a)[:, 0] + u[:, 0]))
  step.apply(loss, "discriminator")
  return {"a": step.mean(a[:, 0]), "b": step.mean(b[:, 0]),
          "ab": step.mean(a[:, 0] * b[:, 0]), "u_max": step.mean(
              tf.cast(tf.abs(u[:, 0]) < 0.05, tf.float32))}


def test_each_random_call_draws_anew_the_same_on_two_replicas(one_device,
                                                               mirrored):
  """Two random_normal calls in one step differ; every draw is the same
  per example on 1 device and on 2 replicas (the logs and weights agree
  exactly), and a uniform draw stays in its range."""
  x = np.random.default_rng(0).normal(size=(64, 2)).astype(np.float32)
  got = []
  for strategy in (one_device, mirrored):
    models = _linear_gan(strategy)
    trainer = Trainer(model={"discriminator": models["discriminator"]},
                      strategy=strategy, train_step=_noise_step, seed=5,
                      optimizer={"discriminator": keras.optimizers.SGD(LR)})
    logs = trainer.fit(x, batch_size=16, epochs=1,
                       shuffle=False).last_logs
    got.append((logs, models["discriminator"].get_weights()[0]))
  (one, w_one), (two, w_two) = got
  assert one["a"] != one["b"]
  assert abs(one["ab"]) < 0.5  # independent draws, not one draw twice
  assert one["u_max"] == 1.0
  for key in ("a", "b", "ab"):
    assert two[key] == pytest.approx(one[key], abs=1e-6), key
  np.testing.assert_allclose(w_two, w_one, rtol=1e-6)


def test_a_hand_written_mean_is_warned_once_and_step_mean_of_all_values(
    mirrored, caplog):
  """tf.reduce_mean in a step is summed over the 2 replicas: warned once
  per value, naming it; step.mean(values, per_example=False) of [2 x rows]
  values is Keras' mean over all of them."""
  x = np.arange(16, dtype=np.float32).reshape(8, 2)

  def step_fn(batch, step):
    d = step.models["discriminator"]
    both = tf.concat([d(batch), d(batch * 2.0)], 0)  # [2 * rows, 1]
    loss = step.mean(both, per_example=False)
    step.apply(loss, "discriminator")
    return {"hand": tf.reduce_mean(both), "all": loss}

  models = _linear_gan(mirrored)
  trainer = Trainer(model={"discriminator": models["discriminator"]},
                    strategy=mirrored, train_step=step_fn,
                    optimizer={"discriminator": keras.optimizers.SGD(0.0)})
  with caplog.at_level(logging.WARNING):
    logs = trainer.fit(x, batch_size=8, epochs=1, shuffle=False).last_logs
  w = np.array([[0.7], [-0.4]], np.float32)
  want = np.concatenate([x @ w, x * 2 @ w]).mean()
  assert logs["all"] == pytest.approx(want, rel=1e-6)
  assert logs["hand"] == pytest.approx(2 * want, rel=1e-6)  # the habit
  warned = [r.getMessage() for r in caplog.records
            if "is reduced with tf.reduce_mean outside step.mean" in
            r.getMessage()]
  assert len(warned) == 1 and "the logged 'hand'" in warned[0], warned
  assert "2x the mean" in warned[0]


class LabelFreeGan:
  """A task with its own step, x alone and no eval_data()."""

  def __init__(self, config):
    self.config = config

  def build_model(self):
    return _linear_gan(tf.distribute.get_strategy())

  def build_optimizer(self):
    return {"generator": keras.optimizers.SGD(LR),
            "discriminator": keras.optimizers.SGD(LR)}

  def train_data(self):
    return np.random.default_rng(0).normal(size=(64, 2)).astype(np.float32)

  def train_step(self, batch, step):
    return _ordered_step(batch, step)


def _config(**train):
  config = config_lib.default_config()
  config.data.global_batch_size = 16
  config.train.update(steps=8, steps_per_loop=4, **train)
  config.callbacks.progress_bar = False
  return config


def test_a_label_free_task_without_evaluation_trains_on_two_replicas(
    tmp_path):
  config = _config()
  config.distribution.strategy = "mirrored"
  result = run(config, str(tmp_path), task=LabelFreeGan(config))
  assert result.steps == 8 and not result.evaluates
  assert np.isfinite(result.logs["g_loss"])
  assert not any(k.startswith("eval/") for k in result.logs)


class Float16Mixup(LabelFreeGan):
  """Concatenates the float16 output with float32 noise: an error only
  under mixed_float16."""

  def train_step(self, batch, step):
    d = step.models["discriminator"]
    both = tf.concat([d(batch), step.random_normal([1])], 0)
    step.apply(step.mean(both, per_example=False), "discriminator")


def test_an_error_in_train_step_under_mixed_float16_is_one_line_before_writing(
    tmp_path, policy):
  config = _config()
  config.precision.policy = "mixed_float16"
  workdir = tmp_path / "run"
  with pytest.raises(ConfigError) as info:
    run(config, str(workdir), task=Float16Mixup(config))
  message = str(info.value)
  assert message.startswith("train_step failed when traced on a batch of "
                            "(16, 2) under precision.policy=mixed_float16: ")
  assert "float16" in message and "\n" not in message
  assert not workdir.exists()


def test_the_first_model_without_an_optimizer_is_warned(one_device, caplog):
  models = _linear_gan(one_device)
  with caplog.at_level(logging.WARNING):
    Trainer(model={"teacher": models["generator"],
                   "student": models["discriminator"]},
            strategy=one_device, train_step=_ordered_step,
            optimizer={"student": keras.optimizers.SGD(LR)})
  assert any("the first model, 'teacher', is the main one" in r.getMessage()
             for r in caplog.records)


def test_a_loss_function_name_works_and_an_unknown_one_says_what_to_give(
    one_device):
  x = np.ones((8, 2), np.float32)
  with one_device.scope():
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
  trainer = Trainer(model=model, loss="mse", strategy=one_device,
                    optimizer=keras.optimizers.SGD(0.0))
  logs = trainer.fit(x, np.zeros((8, 1), np.float32), batch_size=8,
                     epochs=1).last_logs
  want = float(np.mean(model.predict(x, verbose=0) ** 2))
  assert logs["loss"] == pytest.approx(want, rel=1e-5)
  with pytest.raises(ValueError, match="unknown loss 'msq'; give a Keras "
                     "loss class name"):
    Trainer(model=model, loss="msq", strategy=one_device,
            optimizer=keras.optimizers.SGD(0.0))


def test_a_python_if_on_a_tensor_in_a_users_loss_and_step_still_traces(
    one_device):
  """The trainer's own code is not converted by autograph (it does not need
  it, and converting it cost 1.5 s of CPU per process); a user's loss and
  train_step still are, as under tf.function: a Python `if` on a tensor
  becomes a tf.cond."""

  def loss(y, y_pred):
    per_example = tf.reduce_sum(tf.square(y - y_pred), -1)
    if tf.reduce_sum(per_example) > 1e9:  # needs autograph
      per_example = per_example * 0.0
    return per_example

  x = np.ones((8, 2), np.float32)
  with one_device.scope():
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
  trainer = Trainer(model=model, loss=loss, strategy=one_device,
                    optimizer=keras.optimizers.SGD(0.0))
  logs = trainer.fit(x, np.zeros((8, 1), np.float32), batch_size=8,
                     epochs=1).last_logs
  assert logs["loss"] == pytest.approx(
      float(np.mean(model.predict(x, verbose=0) ** 2)), rel=1e-5)

  def step_fn(batch, step):
    loss_value = step.mean(tf.reduce_sum(step.models["d"](batch), -1))
    if step.step >= 1:  # needs autograph
      loss_value *= 0.0
    step.apply(loss_value, "d")
    return {"value": loss_value}

  models = _linear_gan(one_device)
  trainer = Trainer(model={"d": models["discriminator"]}, train_step=step_fn,
                    strategy=one_device, steps_per_loop=1,
                    optimizer={"d": keras.optimizers.SGD(0.0)})
  history = trainer.fit(x, batch_size=8, epochs=2)
  assert history.history["value"][0] != 0.0
  assert history.history["value"][1] == 0.0


def _classifier():
  keras.utils.set_random_seed(3)
  return keras.Sequential([keras.Input((6,)), keras.layers.Dense(8, "relu"),
                           keras.layers.Dense(3)])


def _metric_step(batch, step):
  """Keras' `self.compiled_metrics.update_state(y, y_pred)`, ported."""
  x, y = batch
  logits = step.models["model"](x, training=True)
  loss = step.mean(keras.losses.sparse_categorical_crossentropy(
      y, logits, from_logits=True))
  step.apply(loss, "model")
  step.update_metrics(y, logits)
  return {"step_loss": loss}


def _accuracy_history(strategy, train_step):
  rng = np.random.default_rng(5)
  x = rng.normal(size=(60, 6)).astype(np.float32)  # 60 = 3 x 16 + 12
  y = rng.integers(0, 3, 60).astype(np.int32)
  with strategy.scope():
    model = _classifier()
  trainer = Trainer(
      model=model, optimizer=keras.optimizers.SGD(LR), strategy=strategy,
      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True,
                                                      reduction="none"),
      train_step=train_step, steps_per_loop=2,
      metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")])
  history = trainer.fit(x, y, batch_size=16, epochs=2, shuffle=False)
  return history.history["accuracy"]


def test_train_step_updates_the_tasks_metrics_like_the_builtin_step(
    one_device, mirrored):
  """step.update_metrics(y, logits) in a task's own step gives the epoch
  accuracy the built-in step logs from the same model, data and updates
  (exactly: the same predictions), on one device and on 2 replicas, a
  partial last batch included (it was only what train_step returned)."""
  builtin = _accuracy_history(one_device, None)
  assert _accuracy_history(one_device, _metric_step) == builtin
  assert _accuracy_history(mirrored, _metric_step) == builtin


def test_update_metrics_without_build_metrics_is_one_error(one_device):
  with one_device.scope():
    model = _classifier()
  trainer = Trainer(model=model, optimizer=keras.optimizers.SGD(LR),
                    strategy=one_device, train_step=_metric_step)
  x = np.zeros((16, 6), np.float32)
  with pytest.raises(ConfigError, match="step.update_metrics: the task has "
                     r"no build_metrics\(\)"):
    trainer.fit(x, np.zeros(16, np.int32), batch_size=16, epochs=1)
