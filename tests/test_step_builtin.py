"""The train step across replicas: numbers that must match exactly."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tests.helpers import examples
from trainer import data as data_lib
from trainer.fit.trainer import Trainer

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True,
                                                  reduction="none")


def _model(strategy, seed=0, features=6):
  with strategy.scope():
    keras.utils.set_random_seed(seed)
    return keras.Sequential([
        keras.Input((features,)),
        keras.layers.Dense(16, activation="tanh"),
        keras.layers.Dense(3, dtype="float32")])


def _finite_input(x, y, global_batch):
  return data_lib.input_fn(tf.data.Dataset.from_tensor_slices((x, y)),
                           global_batch_size=global_batch, training=False)


def _train(strategy, x, y, *, global_batch, steps, optimizer, clipnorm=0.0,
           steps_per_loop=2):
  model = _model(strategy)
  trainer = Trainer(model=model, optimizer=optimizer, loss=LOSS,
                    strategy=strategy, steps_per_loop=steps_per_loop,
                    global_clipnorm=clipnorm)
  logs = trainer.fit(_finite_input(x, y, global_batch), steps=steps).last_logs
  return trainer, logs


@pytest.mark.parametrize("num_examples", [40, 44])  # last batch 8 and 12 of 16
def test_mirrored_equals_one_device_including_partial_last_batch(
    mirrored, one_device, num_examples):
  x, y = examples.features(num_examples)
  runs = [_train(s, x, y, global_batch=16, steps=10,
                 optimizer=keras.optimizers.Adam(0.05))
          for s in (one_device, mirrored)]
  (single, single_logs), (multi, multi_logs) = runs
  assert int(single.global_step.numpy()) == 3  # 16 + 16 + partial
  assert int(multi.global_step.numpy()) == 3
  for a, b in zip(single.model.get_weights(), multi.model.get_weights()):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  # the untouched initial weights are far from the trained ones
  initial = _model(one_device).get_weights()
  assert max(np.abs(a - b).max() for a, b in
             zip(initial, multi.model.get_weights())) > 1e-2
  assert single_logs["loss"] == pytest.approx(multi_logs["loss"], rel=1e-6)


def test_partial_batch_is_averaged_over_its_real_size(mirrored):
  """One SGD step on 12 examples (8 + 4 over 2 replicas) equals the mean
  gradient of those 12 examples, not the sum divided by the nominal 16."""
  x, y = examples.features(12)
  trainer, _ = _train(mirrored, x, y, global_batch=16, steps=1,
                      optimizer=keras.optimizers.SGD(1.0))
  model = _model(tf.distribute.get_strategy())
  with tf.GradientTape() as tape:
    loss = tf.reduce_mean(LOSS(y, model(x)))
  grads = tape.gradient(loss, model.trainable_variables)
  for w0, g, w1 in zip(model.get_weights(), grads, trainer.model.get_weights()):
    np.testing.assert_allclose(w0 - w1, g.numpy(), rtol=1e-5, atol=1e-7)


def test_global_clipnorm_clips_the_reduced_gradient(mirrored):
  x, y = examples.features(16)
  clip = 0.05
  trainer, logs = _train(mirrored, x, y, global_batch=16, steps=1,
                         optimizer=keras.optimizers.SGD(1.0), clipnorm=clip)
  model = _model(tf.distribute.get_strategy())
  with tf.GradientTape() as tape:
    loss = tf.reduce_mean(LOSS(y, model(x)))
  grads = tape.gradient(loss, model.trainable_variables)
  norm = tf.linalg.global_norm(grads).numpy()
  assert norm > 4 * clip  # clipping really happens
  assert logs["grad_norm"] == pytest.approx(norm, rel=1e-5)
  updates = [w0 - w1 for w0, w1 in zip(model.get_weights(),
                                       trainer.model.get_weights())]
  applied = np.sqrt(sum(np.sum(u * u) for u in updates))
  assert applied == pytest.approx(clip, rel=1e-5)
  for u, g in zip(updates, grads):
    np.testing.assert_allclose(u, g.numpy() * clip / norm, rtol=1e-4,
                               atol=1e-8)


def test_overflow_on_one_replica_skips_the_step_everywhere(mirrored, policy):
  policy("mixed_float16")
  x, y = examples.features(8)
  x_bad = x.copy()
  x_bad[6:] = 1e30  # replica 1's half of the first global batch -> inf in f16
  x_all = np.concatenate([x_bad, x])  # step 1: poisoned, step 2: finite
  y_all = np.concatenate([y, y])
  model = _model(mirrored)
  trainer = Trainer(model=model, optimizer=keras.optimizers.SGD(0.1),
                    loss=LOSS, strategy=mirrored)
  assert model.layers[0].compute_dtype == "float16"
  assert model.layers[0].kernel.dtype == "float32"
  iterator = iter(trainer.distribute(_finite_input(x_all, y_all, 8)))
  before = model.get_weights()
  scale = float(trainer.optimizer.dynamic_scale.numpy())

  logs = trainer.train_steps(iterator, 1)
  assert logs["skipped_steps"] == 1
  for a, b in zip(before, model.get_weights()):
    np.testing.assert_array_equal(a, b)  # no replica applied the step
  assert float(trainer.optimizer.dynamic_scale.numpy()) == scale / 2
  assert int(trainer.global_step.numpy()) == 1
  assert int(trainer.optimizer.iterations.numpy()) == 0

  logs = trainer.train_steps(iterator, 1)
  assert logs["skipped_steps"] == 0
  assert np.isfinite(logs["loss"])
  after = model.get_weights()
  assert all(np.all(np.isfinite(w)) for w in after)
  assert max(np.abs(a - b).max() for a, b in zip(before, after)) > 0
  assert float(trainer.optimizer.dynamic_scale.numpy()) == scale / 2
  assert int(trainer.global_step.numpy()) == 2
  assert int(trainer.optimizer.iterations.numpy()) == 1
  # each replica holds the same (finite) weights
  for var in model.trainable_variables:
    values = mirrored.experimental_local_results(var.value)
    np.testing.assert_array_equal(values[0].numpy(), values[1].numpy())


@pytest.mark.parametrize("num_examples", [64, 56])  # last batch full / 24
def test_gradient_accumulation_equals_the_large_batch_on_two_replicas(
    mirrored, num_examples):
  """4 micro-batches of 4 per replica give the update of one 32 batch,
  including a partial last batch; metrics see every example once."""
  x, y = examples.features(num_examples)
  runs = []
  for accum in (1, 4):
    model = _model(mirrored)
    # SGD: an update proportional to the gradient (Adam would hide a
    # wrongly scaled one).
    trainer = Trainer(model=model, optimizer=keras.optimizers.SGD(0.5),
                      loss=LOSS, strategy=mirrored, steps_per_loop=2,
                      grad_accum_steps=accum,
                      metrics=[keras.metrics.SparseCategoricalAccuracy()])
    logs = trainer.fit(_finite_input(x, y, 32), steps=10).last_logs
    runs.append((model.get_weights(), logs))
  (large, large_logs), (accumulated, accumulated_logs) = runs
  for a, b in zip(large, accumulated):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  assert max(np.abs(a - b).max() for a, b in
             zip(_model(mirrored).get_weights(), accumulated)) > 1e-2
  for key in ("loss", "sparse_categorical_accuracy", "examples"):
    assert accumulated_logs[key] == pytest.approx(large_logs[key], rel=1e-6)


def test_gradient_accumulation_must_divide_the_replica_batch(tmp_path):
  from configs import digits  # pylint: disable=import-outside-toplevel
  from trainer.errors import ConfigError  # pylint: disable=import-outside-toplevel
  from trainer.run import run  # pylint: disable=import-outside-toplevel
  config = digits.get_config()
  config.train.grad_accum_steps = 5
  with pytest.raises(ConfigError, match="64 cannot be shared evenly by 5 "
                     "replicas x train.grad_accum_steps"):
    run(config, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("policy_name", [
    "float32", pytest.param("mixed_float16", marks=pytest.mark.slow)])
def test_xla_step_matches_the_plain_step_on_two_replicas(
    mirrored, policy, policy_name):
  """jit_compile with 2 replicas, gradient accumulation and each policy the
  trainer supports trains like the plain step (XLA fuses differently, so
  equal to float rounding, not bits)."""
  policy(policy_name)
  x, y = examples.features(64)
  weights = []
  for jit in (False, True):
    model = _model(mirrored)
    trainer = Trainer(model=model, optimizer=keras.optimizers.SGD(0.5),
                      loss=LOSS, strategy=mirrored, steps_per_loop=2,
                      grad_accum_steps=2, jit_compile=jit)
    trainer.fit(_finite_input(x, y, 32), steps=2)
    weights.append(model.get_weights())
  tolerance = 1e-5 if policy_name == "float32" else 2e-3
  for a, b in zip(*weights):
    np.testing.assert_allclose(a, b, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("make_optimizer", [
    lambda: keras.optimizers.Adam(0.05),
    lambda: keras.optimizers.SGD(0.5),
    lambda: keras.optimizers.SGD(0.5, momentum=0.9)],
    ids=["adam", "sgd", "momentum"])
def test_fused_update_equals_keras_update_on_two_replicas(
    mirrored, make_optimizer):
  x, y = examples.features(64)
  weights = []
  for fused in (True, False):
    trainer = Trainer(model=_model(mirrored), optimizer=make_optimizer(),
                      loss=LOSS, strategy=mirrored, steps_per_loop=2)
    assert trainer.step.update.fused
    if not fused:  # back to Keras' own optimizer.apply
      trainer.step.update._fused = None  # pylint: disable=protected-access
      assert not trainer.step.update.fused
    trainer.fit(_finite_input(x, y, 16), steps=4)
    weights.append(trainer.model.get_weights() +
                   [v.numpy() for v in trainer.optimizer.variables])
  # Float rounding only: Adam normalizes by sqrt(v), which amplifies the
  # last bit when v is small; 1e-5 is 5e-5 of the 4 steps' travel (4 x lr).
  for a, b in zip(*weights):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_other_optimizers_keep_the_keras_update(mirrored):
  for optimizer in (keras.optimizers.AdamW(0.01),
                    keras.optimizers.Adam(0.01, amsgrad=True),
                    keras.optimizers.SGD(0.1, momentum=0.9, nesterov=True),
                    keras.optimizers.RMSprop(0.01)):
    trainer = Trainer(model=_model(mirrored), optimizer=optimizer, loss=LOSS,
                      strategy=mirrored)
    assert not trainer.step.update.fused, optimizer.name


def test_trainer_without_a_strategy_uses_the_default_one():
  x, y = examples.features(40)
  trainer = Trainer(model=_model(tf.distribute.get_strategy()),
                    optimizer=keras.optimizers.SGD(0.1), loss=LOSS)
  logs = trainer.fit(_finite_input(x, y, 16), steps=3,
                     validation_data=_finite_input(x, y, 16)).last_logs
  assert int(trainer.global_step.numpy()) == 3
  assert logs["eval/num_examples"] == 40


@pytest.mark.parametrize("strategy", ["one_device", "mirrored"])
def test_fit_on_an_iterator_continues_where_the_last_fit_stopped(
    strategy, request):
  """Two fits of 3 + 2 steps on one iterator read batches 0-4, the same
  updates as one fit of 5 steps; the iterator is then at batch 5."""
  strategy = request.getfixturevalue(strategy)
  x, y = examples.features(16 * 8)
  make = lambda: Trainer(model=_model(strategy),
                         optimizer=keras.optimizers.SGD(0.1), loss=LOSS,
                         strategy=strategy, steps_per_loop=2)
  data = _finite_input(x, y, 16)
  straight = make()
  straight.fit(data, steps=5)
  chunked = make()
  iterator = iter(chunked.distribute(data))
  chunked.fit(iterator, steps=3)
  chunked.fit(iterator, steps=5)
  for a, b in zip(straight.model.weights, chunked.model.weights):
    np.testing.assert_array_equal(a.numpy(), b.numpy())
  labels = strategy.experimental_local_results(next(iterator)[1])
  np.testing.assert_array_equal(np.concatenate(labels), y[80:96])


def _bn_model(strategy, synchronized=False):
  with strategy.scope():
    keras.utils.set_random_seed(0)
    return keras.Sequential([
        keras.Input((6,)), keras.layers.Dense(8),
        keras.layers.BatchNormalization(synchronized=synchronized),
        keras.layers.Dense(3, dtype="float32")])


@pytest.mark.parametrize("num_examples", [21, 18])  # last batch 5 and 2 < k
def test_accumulation_on_a_partial_batch_never_runs_an_empty_micro_batch(
    one_device, num_examples):
  x, y = examples.features(num_examples)
  trainer = Trainer(model=_bn_model(one_device),
                    optimizer=keras.optimizers.SGD(0.1), loss=LOSS,
                    strategy=one_device, grad_accum_steps=4)
  logs = trainer.fit(_finite_input(x, y, 16), steps=5).last_logs
  assert logs["examples"] == num_examples - 16 and np.isfinite(
      logs["grad_norm"])
  for weight in trainer.model.get_weights():  # BN statistics included
    assert np.all(np.isfinite(weight))


@pytest.mark.parametrize("option", [{"grad_accum_steps": 2},
                                    {"jit_compile": True}])
def test_synchronized_bn_in_a_nested_graph_is_refused_clearly(mirrored,
                                                              option):
  from trainer.errors import ConfigError  # pylint: disable=import-outside-toplevel
  with pytest.raises(ConfigError, match="synchronized batch norm cannot run"):
    Trainer(model=_bn_model(mirrored, synchronized=True),
            optimizer=keras.optimizers.SGD(0.1), loss=LOSS,
            strategy=mirrored, **option)
