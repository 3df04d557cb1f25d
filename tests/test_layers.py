"""trainer.layers: mixed precision, replicas, save/load, activation names."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tests.helpers import examples
from trainer import data as data_lib
from trainer import layers
from trainer.tasks import models
from trainer.config import default_config
from trainer.data import DataInfo
from trainer.fit.trainer import Trainer

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True,
                                                  reduction="none")


def _every_layer_model(features=6, seed=0):
  """Input [batch, features] float32 -> logits [batch, 3] float32, using
  every custom layer: DenseLayer (custom activation by name), ParametricSwish,
  synchronized BatchNormalization and a Lambda of a registered function."""
  keras.utils.set_random_seed(seed)
  inputs = keras.Input((features,))
  x = layers.DenseLayer(16, activation="squared_relu", name="dense_0")(inputs)
  x = layers.batch_normalization(synchronized=True, name="bn")(x)
  x = layers.ParametricSwish(beta_initializer=keras.initializers.RandomUniform(
      0.5, 1.5), name="swish")(x)
  x = layers.lambda_layer(layers.l2_normalize, name="l2")(x)
  outputs = layers.DenseLayer(3, dtype="float32", name="logits")(x)
  return keras.Model(inputs, outputs)


# --- DenseLayer --------------------------------------------------------------


def test_dense_layer_is_bitwise_keras_dense_with_the_same_variable_paths():
  x, _ = examples.features(5)
  keras.utils.set_random_seed(3)
  ours = layers.DenseLayer(4, activation="relu", name="d")
  y_ours = ours(x)
  keras.utils.set_random_seed(3)
  ref = keras.layers.Dense(4, activation="relu", name="d")
  y_ref = ref(x)
  assert [v.path for v in ours.weights] == [v.path for v in ref.weights] == [
      "d/kernel", "d/bias"]
  for a, b in zip(ours.get_weights(), ref.get_weights()):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(y_ours, y_ref)


def test_digits_mlp_equals_the_keras_dense_mlp():
  cfg = default_config().model
  info = DataInfo(input_shape=(8, 8, 1), num_classes=10, num_train=None,
                  num_eval=None)
  keras.utils.set_random_seed(0)
  ours = models.mlp(cfg, info)
  keras.utils.set_random_seed(0)
  inputs = keras.Input(info.input_shape)
  h = keras.layers.Flatten()(inputs)
  for i in range(cfg.depth):
    h = keras.layers.Dense(cfg.width, activation="relu", name=f"dense_{i}")(h)
  ref = keras.Model(inputs, keras.layers.Dense(10, dtype="float32",
                                               name="logits")(h))
  assert isinstance(ours.get_layer("dense_0"), layers.DenseLayer)
  assert [v.path for v in ours.variables] == [v.path for v in ref.variables]
  for a, b in zip(ours.get_weights(), ref.get_weights()):
    np.testing.assert_array_equal(a, b)
  x = np.random.RandomState(0).uniform(size=(7, 8, 8, 1)).astype(np.float32)
  np.testing.assert_array_equal(ours(x), ref(x))


def test_dense_layer_options_and_early_errors():
  x, _ = examples.features(4)
  layer = layers.DenseLayer(3, use_bias=False,
                            kernel_regularizer=keras.regularizers.L2(0.5))
  layer(x)
  assert [v.name for v in layer.weights] == ["kernel"]
  kernel = layer.kernel.numpy()
  np.testing.assert_allclose(float(layer.losses[0]),
                             0.5 * np.sum(kernel**2), rtol=1e-6)
  clone = layers.DenseLayer.from_config(layer.get_config())
  assert clone.use_bias is False
  assert isinstance(clone.kernel_regularizer, keras.regularizers.L2)
  with pytest.raises(ValueError, match="positive int, got 0"):
    layers.DenseLayer(0)


# --- activations -------------------------------------------------------------


def test_activation_names_keras_refuses_and_trainer_resolves():
  # Keras 3.15: a registered function is not found by its string.
  with pytest.raises(ValueError, match="Could not interpret activation"):
    keras.activations.get("trainer>squared_relu")
  x = np.array([[-2.0, -0.5, 0.0, 1.5, 3.0]], np.float32)
  np.testing.assert_array_equal(layers.squared_relu(x),
                                [[0.0, 0.0, 0.0, 2.25, 9.0]])
  for name in ("squared_relu", "trainer>squared_relu", layers.squared_relu):
    layer = layers.DenseLayer(2, activation=name)
    assert layer.activation is layers.squared_relu
    config = layer.get_config()
    assert config["activation"]["config"] == "trainer>squared_relu"
    assert layers.DenseLayer.from_config(config).activation is (
        layers.squared_relu)
  stock = keras.layers.Dense(2, activation=layers.squared_relu)  # function
  assert keras.layers.Dense.from_config(stock.get_config()).activation is (
      layers.squared_relu)
  assert layers.DenseLayer(2, activation="gelu").activation is (
      keras.activations.gelu)
  assert layers.DenseLayer(2).get_config()["activation"] == "linear"
  with pytest.raises(ValueError, match="unknown activation 'nope'"):
    layers.DenseLayer(2, activation="nope")
  with pytest.raises(ValueError, match="unknown activation"):
    layers.get_activation("trainer>ParametricSwish")  # a class, not a function


def test_parametric_swish_values_and_config():
  x = np.array([[-1.0, 0.5], [2.0, -3.0]], np.float32)
  layer = layers.ParametricSwish()
  layer.build(x.shape)
  layer.beta.assign([2.0, 0.5])
  expected = x / (1.0 + np.exp(-np.array([2.0, 0.5], np.float32) * x))
  np.testing.assert_allclose(layer(x), expected, rtol=1e-6)
  scalar = layers.ParametricSwish(per_channel=False)
  scalar(x)
  assert scalar.beta.shape == ()
  clone = layers.ParametricSwish.from_config(scalar.get_config())
  assert clone.per_channel is False


# --- mixed precision ---------------------------------------------------------


def test_mixed_float16_float16_outputs_float32_variables_and_gradients(policy):
  policy("mixed_float16")
  x, y = examples.features(8)
  keras.utils.set_random_seed(0)
  dense = layers.DenseLayer(16, activation="squared_relu")
  swish = layers.ParametricSwish(
      beta_initializer=keras.initializers.RandomUniform(0.5, 1.5))
  head = layers.DenseLayer(3, dtype="float32")
  with tf.GradientTape() as tape:
    h = dense(x)
    s = swish(h)
    logits = head(s)
    loss = tf.reduce_mean(LOSS(y, logits))
  assert (h.dtype, s.dtype, logits.dtype) == (tf.float16, tf.float16,
                                              tf.float32)
  assert dense.compute_dtype == "float16"
  variables = [dense.kernel, dense.bias, swish.beta, head.kernel, head.bias]
  assert all(v.dtype == "float32" for v in variables)
  # Exactly the float16 computation from float16 copies of the variables.
  kernel16, bias16 = (tf.cast(v.numpy(), tf.float16) for v in variables[:2])
  pre = tf.matmul(tf.cast(x, tf.float16), kernel16) + bias16
  np.testing.assert_array_equal(h, tf.square(tf.nn.relu(pre)))
  beta16 = tf.cast(swish.beta.numpy(), tf.float16)
  np.testing.assert_array_equal(s, h * tf.sigmoid(beta16 * h))
  grads = tape.gradient(loss, variables)
  for var, grad in zip(variables, grads):
    assert grad is not None, var.path
    assert grad.dtype == tf.float32, var.path
    assert np.all(np.isfinite(grad)), var.path
    assert np.abs(grad.numpy()).max() > 0, var.path


# --- across replicas ---------------------------------------------------------


def _train(strategy, x, y, steps):
  with strategy.scope():
    model = _every_layer_model()
  trainer = Trainer(model=model, optimizer=keras.optimizers.Adam(0.05),
                    loss=LOSS, strategy=strategy, steps_per_loop=2)
  dataset = data_lib.input_fn(tf.data.Dataset.from_tensor_slices((x, y)),
                              global_batch_size=16, training=False)
  trainer.fit(dataset, steps=steps)
  assert int(trainer.global_step.numpy()) == steps
  return model


def test_mirrored_equals_one_device_with_every_custom_layer(mirrored,
                                                            one_device):
  x, y = examples.features(64)
  x[:, :3] += 3.0 * np.arange(64)[:, None] / 64  # replicas' halves differ
  single = _train(one_device, x, y, steps=4)
  multi = _train(mirrored, x, y, steps=4)
  initial = _every_layer_model().get_weights()
  names = [v.path for v in single.variables]
  assert "swish/beta" in names and "bn/moving_variance" in names
  for name, a, b, w0 in zip(names, single.get_weights(), multi.get_weights(),
                            initial):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6, err_msg=name)
    if "seed_generator" not in name:
      assert np.abs(a - w0).max() > 1e-3, f"{name} did not train"


def _bn_after_one_step(strategy, synchronized, halves):
  """One training-mode call on [8, 2]: replica r gets halves[r] ([4, 2]).
  Returns (outputs per replica, moving_mean and moving_variance per replica)."""
  with strategy.scope():
    bn = layers.batch_normalization(synchronized=synchronized, momentum=0.9)
    bn.build((None, 2))
  batch = strategy.experimental_distribute_values_from_function(
      lambda ctx: tf.constant(halves[ctx.replica_id_in_sync_group]))
  outputs = strategy.run(tf.function(lambda t: bn(t, training=True)),
                         args=(batch,))
  local = strategy.experimental_local_results
  return ([o.numpy() for o in local(outputs)],
          [v.numpy() for v in local(bn.moving_mean.value)],
          [v.numpy() for v in local(bn.moving_variance.value)])


def test_synchronized_batch_norm_uses_global_batch_statistics(mirrored):
  halves = [np.array([[0, 1], [2, 3], [1, 1], [3, 7]], np.float32),
            np.array([[10, 20], [14, 30], [12, 26], [16, 40]], np.float32)]
  whole = np.concatenate(halves)
  momentum, eps = 0.9, 1e-3  # Keras defaults: moving_mean 0, moving_var 1
  mean, var = whole.mean(0), whole.var(0)  # biased variance, as Keras
  outputs, means, variances = _bn_after_one_step(mirrored, True, halves)
  for r in range(2):
    np.testing.assert_allclose(means[r], (1 - momentum) * mean, rtol=1e-6)
    np.testing.assert_allclose(variances[r],
                               momentum + (1 - momentum) * var, rtol=1e-6)
  np.testing.assert_allclose(np.concatenate(outputs),
                             (whole - mean) / np.sqrt(var + eps), rtol=1e-5,
                             atol=1e-6)

  # Unsynchronized: each replica updates its own copy from its own half.
  _, means, variances = _bn_after_one_step(mirrored, False, halves)
  for r in range(2):
    np.testing.assert_allclose(means[r], (1 - momentum) * halves[r].mean(0),
                               rtol=1e-6)
    np.testing.assert_allclose(
        variances[r], momentum + (1 - momentum) * halves[r].var(0), rtol=1e-6)
    assert np.abs(variances[r] - (momentum + (1 - momentum) * var)).min() > 1
  assert np.abs(means[0] - means[1]).min() > 0.5  # the replicas diverged


def _model_cfg(name, sync):
  cfg = default_config().model
  cfg.name, cfg.width, cfg.depth, cfg.sync_batch_norm = name, 4, 1, sync
  return cfg


def test_resnet_batch_norm_follows_the_sync_switch():
  info = DataInfo(input_shape=(8, 8, 3), num_classes=10, num_train=None,
                  num_eval=None)
  built = {sync: models.build_model(_model_cfg("resnet", sync), info)
           for sync in (False, True)}
  for sync, model in built.items():
    bns = [l for l in model.layers
           if isinstance(l, keras.layers.BatchNormalization)]
    assert len(bns) == 9  # stem + 2 + 3 + 3 (stages 1, 2 project)
    assert all(l.synchronized is sync for l in bns)
  shapes = {sync: [(v.name, v.shape) for v in model.variables]
            for sync, model in built.items()}
  assert shapes[False] == shapes[True]
  assert default_config().model.sync_batch_norm is False


def test_resnet50_batch_norm_follows_the_sync_switch():
  info = DataInfo(input_shape=(32, 32, 3), num_classes=10, num_train=None,
                  num_eval=None)
  model = models.build_model(_model_cfg("resnet50", True), info)
  bns = [l for l in model.layers
         if isinstance(l, keras.layers.BatchNormalization)]
  assert len(bns) == 53 and all(l.synchronized for l in bns)
  assert model.get_layer("conv1_bn").synchronized
  assert model.output.dtype == "float32"


# --- save and load -----------------------------------------------------------


def test_keras_file_round_trip_in_safe_mode(tmp_path):
  x, _ = examples.features(10)
  model = _every_layer_model()
  model(x, training=True)  # non-default batch-norm statistics
  before = model.predict(x, verbose=0)
  path = str(tmp_path / "every_layer.keras")
  model.save(path)
  loaded = keras.models.load_model(path)  # safe_mode=True is the default
  np.testing.assert_array_equal(loaded.predict(x, verbose=0), before)
  for a, b in zip(model.get_weights(), loaded.get_weights()):
    np.testing.assert_array_equal(a, b)
  assert loaded.get_layer("dense_0").activation is layers.squared_relu
  assert isinstance(loaded.get_layer("swish"), layers.ParametricSwish)
  assert loaded.get_layer("bn").synchronized
  assert loaded.get_layer("l2").function is layers.l2_normalize


def _plain_double(x):
  return x * 2.0


def _saved_lambda_model(tmp_path, fn):
  model = keras.Sequential([keras.Input((3,)), keras.layers.Lambda(fn)])
  path = str(tmp_path / "lambda.keras")
  model.save(path)
  return path


def test_lambda_what_loads_in_safe_mode(tmp_path):
  x = np.array([[3.0, 4.0, 0.0]], np.float32)
  expected = [[0.6, 0.8, 0.0]]
  path = _saved_lambda_model(tmp_path, layers.l2_normalize)
  np.testing.assert_allclose(keras.models.load_model(path)(x), expected,
                             rtol=1e-6)

  path = _saved_lambda_model(tmp_path, lambda t: t * 2.0)
  with pytest.raises(ValueError, match="`function` is a Python lambda"):
    keras.models.load_model(path)
  unsafe = keras.models.load_model(path, safe_mode=False)
  np.testing.assert_array_equal(unsafe(x), [[6.0, 8.0, 0.0]])

  path = _saved_lambda_model(tmp_path, _plain_double)  # named, unregistered
  for safe_mode in (True, False):
    with pytest.raises(TypeError, match="Could not locate function"):
      keras.models.load_model(path, safe_mode=safe_mode)
  loaded = keras.models.load_model(
      path, custom_objects={"_plain_double": _plain_double})
  np.testing.assert_array_equal(loaded(x), [[6.0, 8.0, 0.0]])

  for fn in (lambda t: t, _plain_double):
    with pytest.raises(ValueError, match="register_keras_serializable"):
      layers.lambda_layer(fn)


def test_l2_normalize_under_mixed_float16(policy):
  policy("mixed_float16")
  layer = layers.lambda_layer(layers.l2_normalize)
  x = np.array([[300.0, 400.0], [0.0, 0.0]], np.float32)  # 300**2 > f16 max
  y = layer(x)
  assert y.dtype == tf.float16
  np.testing.assert_array_equal(y, np.array([[0.6, 0.8], [0, 0]], np.float16))
