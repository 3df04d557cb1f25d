"""A task's own train_step (trainer/step/context.py): several models and
optimizers, exact across replicas; the GAN and distillation examples."""

import importlib

import keras
import numpy as np
import pytest
import tensorflow as tf

from tests.helpers.checkpoints import variables
from conftest import run_modules
from trainer.callbacks import read_metrics
from trainer.errors import ConfigError
from trainer.fit.trainer import Trainer
from trainer.run import run

INF = float("inf")


def _gan_models(seed=1):
  keras.utils.set_random_seed(seed)
  generator = keras.Sequential([
      keras.Input((4,)), keras.layers.Dense(8, activation="relu"),
      keras.layers.Dense(6, dtype="float32")], name="g")
  discriminator = keras.Sequential([
      keras.Input((6,)), keras.layers.Dense(8, activation="relu"),
      keras.layers.Dense(1, dtype="float32")], name="d")
  return {"generator": generator, "discriminator": discriminator}


def _bce(label, logits):
  return tf.nn.sigmoid_cross_entropy_with_logits(
      labels=tf.fill(tf.shape(logits), label), logits=logits)


def gan_step(batch, step, *, alternate=True, overflow_at=-1):
  """A GAN step; `overflow_at`: replica 1 alone gets an inf discriminator
  loss at that global step."""
  g, d = step.models["generator"], step.models["discriminator"]
  real, _ = batch
  fake = g(step.random_normal([4]), training=True)
  real_logits, fake_logits = d(real, training=True)[:, 0], d(fake)[:, 0]
  d_loss = step.mean(_bce(1.0, real_logits) + _bce(0.0, fake_logits))
  g_loss = step.mean(_bce(1.0, fake_logits))
  replica = tf.distribute.get_replica_context().replica_id_in_sync_group
  boom = tf.logical_and(tf.equal(replica, 1), tf.equal(step.step, overflow_at))
  d_turn = step.step % 2 == 0 if alternate else True
  step.apply(d_loss * tf.where(boom, INF, 1.0), "discriminator", when=d_turn)
  step.apply(g_loss, step.optimizers["generator"],
             when=~d_turn if alternate else True)
  return {"d_loss": d_loss, "g_loss": g_loss}


def _trainer(strategy, step=gan_step, seed=1, **kwargs):
  with strategy.scope():
    models = _gan_models(seed)
  optimizers = {"generator": keras.optimizers.Adam(1e-2),
                "discriminator": keras.optimizers.Adam(1e-2)}
  return Trainer(model=models, optimizer=optimizers, train_step=step,
                 strategy=strategy, seed=3, **kwargs)


def _weights(trainer):
  return [v.numpy() for m in trainer.models.values() for v in m.weights]


def test_two_replicas_equal_one_device_with_partial_and_empty_batches(
    mirrored, one_device):
  """33 examples in batches of 8: the last has 1, so replica 1 gets none.
  Per-example noise, the global mean, alternating updates: the same
  weights and logs on 2 replicas as on 1 device."""
  x = np.random.default_rng(0).normal(size=(33, 6)).astype(np.float32)
  y = np.zeros(33, np.int32)
  results = []
  for strategy in (one_device, mirrored):
    trainer = _trainer(strategy, steps_per_loop=3)
    history = trainer.fit(x, y, batch_size=8, epochs=3, shuffle=False)
    results.append((_weights(trainer), history.last_logs))
  (want, want_logs), (got, got_logs) = results
  for a, b in zip(want, got):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
  for key in ("loss", "d_loss", "g_loss", "grad_norm/discriminator",
              "grad_norm/generator"):
    np.testing.assert_allclose(got_logs[key], want_logs[key], rtol=1e-5,
                               err_msg=key)
  assert got_logs["examples"] == 1 + 8  # the last loop: steps 13 and 14
  assert got_logs["skipped_steps"] == 0


def test_an_overflow_on_replica_1_skips_only_that_optimizer_everywhere(
    mirrored, policy):
  policy("mixed_float16")
  trainer = _trainer(mirrored, step=lambda b, s: gan_step(
      b, s, alternate=False, overflow_at=1))
  scale = {n: float(v.numpy()) for n, v in trainer.step.loss_scales.items()}
  data = tf.data.Dataset.from_tensor_slices(
      (np.random.default_rng(0).normal(size=(32, 6)).astype(np.float32),
       np.zeros(32, np.int32))).batch(8, drop_remainder=True)
  iterator = iter(trainer.distribute(data))
  first = trainer.train_steps(iterator, 1)
  assert first["skipped_steps"] == 0
  per_replica = lambda name: [[c.numpy() for c in v.value.values]
                              for v in trainer.models[name].trainable_variables]
  before = {n: per_replica(n) for n in trainer.models}
  logs = trainer.train_steps(iterator, 1)
  after = {n: per_replica(n) for n in trainer.models}
  assert logs["skipped_steps"] == 1
  assert logs["skipped_steps/discriminator"] == 1
  assert logs["skipped_steps/generator"] == 0
  assert logs["loss_scale/discriminator"] == scale["discriminator"] / 2
  assert logs["loss_scale/generator"] == scale["generator"]
  for var_before, var_after in zip(before["discriminator"],
                                   after["discriminator"]):
    for b, a in zip(var_before, var_after):  # each replica's copy
      np.testing.assert_array_equal(a, b)
  for var_before, var_after in zip(before["generator"], after["generator"]):
    assert not np.array_equal(var_after[0], var_before[0])
    np.testing.assert_array_equal(var_after[0], var_after[1])
  assert np.isfinite(logs["d_loss"]) and np.isfinite(logs["g_loss"])


def test_grad_norm_of_an_optimizer_left_out_of_the_last_step_is_its_last(
    mirrored):
  """Alternating updates: the discriminator trains at steps 0 and 2, not at
  the loop's last step 3. Its grad_norm is that of step 2 (what a loop of
  steps 0-2 logs), not 0.0; a loop without a discriminator update leaves
  the key out."""
  data = tf.data.Dataset.from_tensor_slices(
      (np.random.default_rng(0).normal(size=(32, 6)).astype(np.float32),
       np.zeros(32, np.int32))).batch(8, drop_remainder=True)
  one_loop = _trainer(mirrored)
  logs = one_loop.train_steps(iter(one_loop.distribute(data)), 4)
  split = _trainer(mirrored)
  iterator = iter(split.distribute(data))
  first, last = split.train_steps(iterator, 3), split.train_steps(iterator, 1)
  assert first["grad_norm/discriminator"] > 0
  assert logs["grad_norm/discriminator"] == first["grad_norm/discriminator"]
  assert logs["grad_norm/generator"] == last["grad_norm/generator"] > 0
  assert "grad_norm/discriminator" not in last  # step 3 made none


@pytest.mark.parametrize("mistake, message", [
    (lambda b, s: s.apply(1.0, "critic"),
     "no optimizer of that name; the task's optimizers are ['discriminator', "
     "'generator']"),
    (lambda b, s: s.apply(1.0, keras.optimizers.SGD()),
     "is not one of the task's optimizers"),
    (lambda b, s: [s.apply(s.mean(b[0][:, 0]), "generator") for _ in "ab"],
     "optimizer 'generator' is applied twice in one step"),
    (lambda b, s: s.apply(b[0][:, 0], "generator"),
     "got a loss of shape (8,); pass a scalar"),
    (lambda b, s: s.apply(s.mean(tf.concat([b[0][:, 0], b[0][:, 1]], 0)),
                          "generator"),
     "step.mean() got 16 values for a batch of 8 examples"),
    (lambda b, s: {"examples": s.mean(b[0][:, 0])},
     "train_step returned 'examples', a name the trainer logs itself"),
    (lambda b, s: s.mean(b[0]), "step.mean() takes one value per example"),
    (lambda b, s: {"x": b[0][:, 0]}, "train_step returned 'x' of shape"),
    (lambda b, s: s.apply(s.mean(b[0][:, 0]), "generator", variables=[
        s.models["discriminator"].trainable_variables[0]]),
     "is not a trainable variable of model 'generator'"),
])
def test_a_misused_step_context_is_one_error_naming_the_fix(
    one_device, mistake, message):
  trainer = _trainer(one_device, step=mistake)
  data = tf.data.Dataset.from_tensor_slices(
      (np.zeros((8, 6), np.float32), np.zeros(8, np.int32))).batch(
          8, drop_remainder=True)
  with pytest.raises(ConfigError) as e:
    trainer.fit(data, epochs=1)
  assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("form, precision", [
    ("loss", "float32"), ("grads", "mixed_float16"),
    pytest.param("jit", "float32", marks=pytest.mark.slow)])  # 8 s: XLA
def test_a_one_model_train_step_equals_the_builtin_step(
    mirrored, policy, form, precision):
  """`step.apply(loss)`, given gradients of `step.scale_loss(loss)` under a
  loss scale, and XLA: the same updates as the built-in step (2 replicas,
  clipping, a partial last batch)."""
  policy(precision)
  x = np.random.default_rng(0).normal(size=(44, 6)).astype(np.float32)
  y = np.random.default_rng(1).integers(0, 3, 44).astype(np.int32)
  loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True,
                                                       reduction="none")

  def own_step(batch, step):
    images, labels = batch
    model = step.models["model"]
    with tf.GradientTape() as tape:
      loss = step.mean(loss_fn(labels, model(images, training=True)))
      scaled = step.scale_loss(loss, "model")
    if form == "grads":  # no loss given: log it under the name `loss`
      step.apply(tape.gradient(scaled, model.trainable_variables), "model")
      return {"loss": loss}
    step.apply(loss, step.optimizers["model"])
    return {}

  weights, logs = [], []
  for train_step in (None, own_step):
    with mirrored.scope():
      keras.utils.set_random_seed(2)
      model = keras.Sequential([
          keras.Input((6,)), keras.layers.Dense(8, activation="relu"),
          keras.layers.Dense(3, dtype="float32")])
    trainer = Trainer(model=model, optimizer=keras.optimizers.Adam(0.05),
                      loss=loss_fn, train_step=train_step, strategy=mirrored,
                      steps_per_loop=2, global_clipnorm=0.5,
                      jit_compile=form == "jit" and train_step is not None)
    logs.append(trainer.fit(x, y, batch_size=8, epochs=2,
                            shuffle=False).last_logs)
    weights.append(model.get_weights())
  for want, got in zip(*weights):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  for key in ("loss", "grad_norm", "skipped_steps"):
    np.testing.assert_allclose(logs[1][key], logs[0][key], rtol=1e-5,
                               err_msg=key)


def test_several_models_without_a_train_step_or_with_a_stray_optimizer(
    one_device):
  with one_device.scope():
    models = _gan_models()
  with pytest.raises(ValueError, match="several models need your own"):
    Trainer(model=models, optimizer=keras.optimizers.SGD(), loss="mse",
            strategy=one_device)
  with pytest.raises(ConfigError, match="an optimizer for 'critic'"):
    Trainer(model=models, optimizer={"critic": keras.optimizers.SGD()},
            train_step=gan_step, strategy=one_device)


def _example_config(name: str, strategy: str):
  config = importlib.import_module(f"configs.{name}").get_config()
  config.train.steps = 24
  config.train.steps_per_loop = 8
  config.train.steps_per_epoch = 12
  config.train.checkpoint_every = 0
  config.data.eval_batch_size = 128  # 300 eval examples: a partial batch
  config.callbacks.progress_bar = False
  config.distribution.strategy = strategy
  config.distribution.num_cpu_devices = 2 if strategy == "mirrored" else 1
  if name == "distillation":
    config.user.teacher_epochs = 2
    config.pruning.target_sparsity = 0.5  # of the student, the main model
    config.pruning.frequency = 4
  return config


@pytest.mark.slow  # in-process, but over 5 s: CI runs it
@pytest.mark.parametrize("name", ["gan", "distillation", "dcgan"])
def test_example_on_two_replicas_equals_one_device(name, tmp_path, policy):
  """The examples through trainer.run: every model and optimizer in the
  checkpoint, the same on 2 replicas as on 1 device (float32)."""
  del policy  # resets the global policy a mixed_float16 run sets
  results = {s: run(_example_config(name, s), str(tmp_path / s))
             for s in ("one_device", "mirrored")}
  want, got = (variables(tmp_path / s) for s in ("one_device", "mirrored"))
  assert sorted(got) == sorted(want)
  for key, value in want.items():
    np.testing.assert_allclose(got[key], value, rtol=1e-5, atol=1e-6,
                               err_msg=key)
  logs = results["mirrored"].logs
  if name == "gan":
    assert any(k.startswith("models/discriminator/") for k in want)
    assert any(k.startswith("optimizers/discriminator/") for k in want)
    assert {"d_loss", "g_loss", "eval/d_accuracy"} <= set(logs)
    samples = tmp_path / "mirrored" / "tensorboard" / "samples"
    assert samples.is_dir() and any(samples.iterdir())
    # optimizer.* is not the GAN's: a changed learning rate there does not
    # overwrite its own optimizers' on resume.
    # Resumed under mixed_float16: each optimizer starts its own scale.
    config = _example_config(name, "mirrored")
    config.train.steps, config.optimizer.learning_rate = 32, 0.5
    config.precision.policy = "mixed_float16"
    resumed = run(config, str(tmp_path / "mirrored"))
    assert resumed.steps == 32
    assert resumed.logs["learning_rate"] == pytest.approx(2e-3)
    assert resumed.logs["loss_scale/generator"] == 32768
    assert resumed.logs["loss_scale/discriminator"] == 32768
  elif name == "dcgan":  # Keras' order (now=True), no labels, no eval
    assert {"d_loss", "g_loss", "grad_norm/discriminator"} <= set(logs)
    assert not any(k.startswith("eval/") for k in logs)
    return
  else:
    assert any(k.startswith("models/teacher/") for k in want)
    assert not any(k.startswith("optimizers/") for k in want)  # frozen
    assert logs["sparsity"] == pytest.approx(0.5, abs=0.02)
    assert {"soft_loss", "label_loss", "eval/accuracy"} <= set(logs)
    # the student's train accuracy, from step.update_metrics (keras-io's
    # compiled_metrics), the same on 2 replicas as on 1 device
    assert logs["accuracy"] == pytest.approx(
        results["one_device"].logs["accuracy"], abs=0.01)
    evals = [r for r in read_metrics(tmp_path / "mirrored")
             if "eval/teacher_accuracy" in r]
    assert evals and evals[-1]["eval/teacher_accuracy"] > 0.5
  np.testing.assert_allclose(logs["eval/loss"],
                             results["one_device"].logs["eval/loss"],
                             rtol=1e-5)


@pytest.fixture(scope="module")
def two_worker_runs(tmp_path_factory) -> dict:
  """The examples as 2-worker jobs on localhost, side by side: {name:
  (CompletedProcess, workdir)}; dcgan: label-free data, updates in
  Keras' order, no evaluation."""
  jobs, workdirs = {}, {}
  for name in ("dcgan", "distillation"):
    workdirs[name] = tmp_path_factory.mktemp(name)
    flags = [f"--config=configs/{name}.py", "--config.train.steps=40",
             "--config.train.steps_per_loop=10",
             "--config.train.steps_per_epoch=20",
             "--config.user.teacher_epochs=2" if name == "distillation"
             else "--config.user.latent_dim=8",
             "--config.callbacks.progress_bar=False"]
    jobs[name] = (("launch.local", "--num_workers=2", "--", *flags,
                   f"--workdir={workdirs[name]}"), {"timeout": 300})
  runs = run_modules(jobs, processes=2)
  return {n: (runs[n], workdirs[n]) for n in jobs}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["dcgan", "distillation"])
def test_example_trains_on_two_workers(name, two_worker_runs):
  job, workdir = two_worker_runs[name]
  assert job.returncode == 0, job.stderr[-3000:]
  assert "[worker 0] done: 40 steps" in job.stdout
  assert "2 replica(s)" in job.stderr
  last = [r for r in read_metrics(workdir) if "train/loss" in r][-1]
  keys = (("train/d_loss", "train/g_loss", "train/grad_norm/generator")
          if name == "dcgan" else ("train/soft_loss", "train/label_loss"))
  assert set(keys) <= set(last)
  assert all(np.isfinite(v) for v in last.values())
  saved = variables(workdir)
  model = "discriminator" if name == "dcgan" else "teacher"
  assert any(k.startswith(f"models/{model}/") for k in saved)
