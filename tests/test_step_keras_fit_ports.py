"""keras-io's two train_step examples, ported (configs/dcgan.py,
configs/distillation.py), against Keras `fit` running the original from the
same weights on the same batches: the numbers a user moving over compares."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from trainer.fit.trainer import Trainer


def _twin_models(task, strategy) -> tuple[dict, dict]:
  """The task's models built twice, the second with the first's weights:
  (for the trainer, under `strategy`; for Keras `fit`)."""
  keras.utils.set_random_seed(0)
  with strategy.scope():
    ours = task.build_model()
  theirs = task.build_model()
  for name, model in theirs.items():
    model.set_weights(ours[name].get_weights())
  return ours, theirs


class _KerasDcGan(keras.Model):
  """keras-io's DCGAN `train_step` override, with its noise drawn as
  `step.random_*` draws it (stateless, keyed by seed, step and call), so
  that Keras `fit` and the port see the same numbers."""

  def __init__(self, models, latent_dim, seed):
    super().__init__()
    self.generator = models["generator"]
    self.discriminator = models["discriminator"]
    self.latent_dim, self.noise_seed = latent_dim, seed

  def compile(self, d_optimizer, g_optimizer):  # pylint: disable=arguments-differ
    super().compile()
    self.d_optimizer, self.g_optimizer = d_optimizer, g_optimizer

  def _draw(self, sample, rows, shape, call):
    seed = tf.stack([tf.constant(self.noise_seed, tf.int64), self.step])
    if call:
      seed = tf.random.fold_in(seed, call)
    return sample(tf.concat([[rows + 1], shape], 0), seed=seed)[:rows]

  def train_step(self, real):
    self.step = tf.cast(keras.ops.convert_to_tensor(
        self.d_optimizer.iterations), tf.int64)  # before this step's updates
    rows = tf.shape(real)[0]
    noise = self._draw(tf.random.stateless_normal, rows, [self.latent_dim], 0)
    combined = tf.concat([self.generator(noise), real], 0)
    labels = tf.concat([tf.ones([rows, 1]), tf.zeros([rows, 1])], 0)
    labels += 0.05 * tf.concat([
        self._draw(tf.random.stateless_uniform, rows, [1], 1),
        self._draw(tf.random.stateless_uniform, rows, [1], 2)], 0)
    with tf.GradientTape() as tape:
      d_loss = keras.losses.BinaryCrossentropy()(
          labels, self.discriminator(combined))
    weights = self.discriminator.trainable_weights
    self.d_optimizer.apply_gradients(zip(tape.gradient(d_loss, weights),
                                         weights))
    noise = self._draw(tf.random.stateless_normal, rows, [self.latent_dim], 3)
    with tf.GradientTape() as tape:
      g_loss = keras.losses.BinaryCrossentropy()(
          tf.zeros([rows, 1]), self.discriminator(self.generator(noise)))
    weights = self.generator.trainable_weights
    self.g_optimizer.apply_gradients(zip(tape.gradient(g_loss, weights),
                                         weights))
    return {"d_loss": d_loss, "g_loss": g_loss}


@pytest.mark.slow  # in-process, but over 5 s: CI runs it
def test_the_dcgan_port_equals_keras_fit_with_its_train_step_override(
    one_device):
  """configs/dcgan.py's step and keras-io's, from the same weights on the
  same batches and noise. The first step gives the same losses and
  weights to float32 rounding (1e-6). Over 5 more, Adam's 1/sqrt(v) scales
  up rounding: a gradient element near zero (a sum that cancels) that
  rounds differently moves its weight by a fraction of the learning rate
  (2e-4; measured up to 2e-5 after 3 steps), so the weights are held to
  half of it."""
  from configs import dcgan  # pylint: disable=import-outside-toplevel
  config = dcgan.get_config()
  task = dcgan.DcGan(config)
  real = task.train_data()[:6 * 64]
  ours, theirs = _twin_models(task, one_device)
  keras_gan = _KerasDcGan(theirs, task.latent_dim, seed=7)
  keras_gan.compile(d_optimizer=keras.optimizers.Adam(task.learning_rate),
                    g_optimizer=keras.optimizers.Adam(task.learning_rate))
  trainer = Trainer(model=ours, optimizer=task.build_optimizer(),
                    train_step=task.train_step, strategy=one_device, seed=7,
                    steps_per_loop=5)

  def compare(atol):
    for name, model in ours.items():
      for got, want in zip(model.get_weights(), theirs[name].get_weights()):
        np.testing.assert_allclose(got, want, rtol=0, atol=atol,
                                   err_msg=name)

  for batches, atol in (((0, 1), 1e-6), ((1, 6), task.learning_rate / 2)):
    part = real[batches[0] * 64:batches[1] * 64]
    want = keras_gan.fit(tf.data.Dataset.from_tensor_slices(part).batch(64),
                         epochs=1, verbose=0, shuffle=False).history
    got = trainer.fit(part, batch_size=64, epochs=1, shuffle=False).last_logs
    if batches[1] == 1:  # one step: its losses, as Keras returns them
      assert got["d_loss"] == pytest.approx(want["d_loss"][-1], abs=1e-6)
      assert got["g_loss"] == pytest.approx(want["g_loss"][-1], abs=1e-6)
    compare(atol)
  assert int(trainer.global_step.numpy()) == 6


class KerasDistiller(keras.Model):
  """keras-io's "Knowledge Distillation" (Keras 3 version): `compute_loss`
  overridden, accuracy through `compile(metrics=...)`."""

  def __init__(self, student, teacher):
    super().__init__()
    self.student, self.teacher = student, teacher

  def compile(self, optimizer, metrics, student_loss_fn,  # pylint: disable=arguments-differ
              distillation_loss_fn, alpha, temperature):
    super().compile(optimizer=optimizer, metrics=metrics)
    self.student_loss_fn = student_loss_fn
    self.distillation_loss_fn = distillation_loss_fn
    self.alpha, self.temperature = alpha, temperature

  def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None,  # pylint: disable=arguments-differ
                   allow_empty=False):
    teacher_pred = self.teacher(x, training=False)
    student_loss = self.student_loss_fn(y, y_pred)
    distillation_loss = self.distillation_loss_fn(
        keras.ops.softmax(teacher_pred / self.temperature, axis=1),
        keras.ops.softmax(y_pred / self.temperature, axis=1),
    ) * (self.temperature ** 2)
    return self.alpha * student_loss + (1 - self.alpha) * distillation_loss

  def call(self, x):
    return self.student(x)


@pytest.mark.slow  # in-process, but over 5 s: CI runs it
def test_the_distillation_port_equals_keras_fit_with_its_override(
    one_device):
  """configs/distillation.py's step (soft_weight w = keras-io's 1 - alpha)
  and keras-io's Distiller, from the same student and teacher weights on
  the same batches: one step gives the same loss, accuracy and weights to
  float32 rounding (1e-6); after 6 more, Adam's rounding amplification (see
  the DCGAN test) holds the weights to half the learning rate and the
  epoch's accuracy (from step.update_metrics, keras-io's compiled metrics)
  to one example in 384."""
  from configs import distillation  # pylint: disable=import-outside-toplevel
  config = distillation.get_config()
  task = distillation.Distillation(config)
  images, labels = task.train_data()
  ours, theirs = _twin_models(task, one_device)
  rate = config.optimizer.learning_rate
  distiller = KerasDistiller(theirs["student"], theirs["teacher"])
  distiller.compile(
      optimizer=keras.optimizers.Adam(rate),
      metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
      student_loss_fn=keras.losses.SparseCategoricalCrossentropy(
          from_logits=True),
      distillation_loss_fn=keras.losses.KLDivergence(),
      alpha=1 - config.user.soft_weight, temperature=config.user.temperature)
  trainer = Trainer(model=ours, optimizer={"student": keras.optimizers.Adam(
      rate)}, train_step=task.train_step, metrics=task.build_metrics,
                    strategy=one_device, steps_per_loop=5)

  for batches, atol in (((0, 1), 1e-6), ((1, 7), rate / 2)):
    part = slice(batches[0] * 64, batches[1] * 64)
    want = distiller.fit(tf.data.Dataset.from_tensor_slices(
        (images[part], labels[part])).batch(64), epochs=1, verbose=0,
                         shuffle=False).history
    got = trainer.fit(images[part], labels[part], batch_size=64, epochs=1,
                      shuffle=False).last_logs
    if batches[1] == 1:
      assert got["loss"] == pytest.approx(want["loss"][-1], abs=1e-6)
    assert got["accuracy"] == pytest.approx(want["accuracy"][-1],
                                            abs=1 / 384 + 1e-6)
    for got_w, want_w in zip(ours["student"].get_weights(),
                             theirs["student"].get_weights()):
      np.testing.assert_allclose(got_w, want_w, rtol=0, atol=atol)
  assert int(trainer.global_step.numpy()) == 7
