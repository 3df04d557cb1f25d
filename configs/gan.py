"""A custom training strategy: a small GAN on the 8x8 digits.

Two models (generator, discriminator), two optimizers, alternating updates
(the discriminator on even steps, the generator on odd ones), written as the
task's own `train_step` (trainer/step/context.py). Train logs: `d_loss`,
`g_loss`, each optimizer's `loss_scale/...` and `skipped_steps/...`;
TensorBoard gets a 4x4 grid of samples (`tensorboard/samples`) at every
epoch end. Evaluation: the discriminator's loss and accuracy on held-out
digits against the generator's fakes. The exported model is the generator
(noise [batch, 16] -> images [batch, 8, 8, 1]).

  python -m launch.train --config=configs/gan.py --workdir=runs/gan
"""

import keras
import numpy as np
import tensorflow as tf

from trainer.callbacks import TrainerCallback
from trainer.config import default_config
from trainer.tasks.image_classification import ImageClassification


def get_config():
  c = default_config()
  c.task = "configs.gan:Gan"
  c.data.name = "digits"
  c.data.global_batch_size = 64
  c.data.eval_batch_size = 100
  c.user.latent_dim = 16
  c.user.learning_rate = 2e-3
  c.train.steps = 1200
  c.train.steps_per_loop = 50
  c.train.steps_per_epoch = 200
  c.train.checkpoint_every = 400
  return c


def bce(label: float, logits):
  """Per-example binary cross-entropy of `logits` [batch] against `label`."""
  return tf.nn.sigmoid_cross_entropy_with_logits(
      labels=tf.fill(tf.shape(logits), label), logits=logits)


class DiscriminatorAccuracy(keras.metrics.Mean):
  """Fraction of real images scored real and fakes scored fake, from the
  discriminator's logits [batch, 2] (real, fake) that compute_loss returns."""

  def __init__(self, name="d_accuracy", **kwargs):
    super().__init__(name=name, **kwargs)

  def update_state(self, y_true, y_pred, sample_weight=None):
    del y_true, sample_weight  # the digit label does not matter here
    right = tf.concat([y_pred[:, 0] > 0, y_pred[:, 1] < 0], 0)
    return super().update_state(tf.cast(right, tf.float32))


class SampleGrid(TrainerCallback):
  """Writes a 4x4 grid of the generator's samples (fixed noise) to
  WORKDIR/tensorboard/samples at every epoch end."""

  chief_only = True

  def __init__(self, latent_dim: int):
    super().__init__()
    self.noise = np.random.default_rng(0).normal(
        size=(16, latent_dim)).astype(np.float32)
    self._writer = None

  def on_epoch_end(self, epoch, logs=None):
    if self.trainer.workdir is None:
      return
    if self._writer is None:
      self._writer = tf.summary.create_file_writer(
          f"{self.trainer.workdir}/tensorboard/samples")
    images = tf.cast(self.trainer.models["generator"](self.noise), tf.float32)
    rows = tf.concat(tf.split(images, 4), 2)  # 4 x [4, 8, 32, 1]
    grid = tf.concat(tf.unstack(rows), 0)[None]  # [1, 32, 32, 1]
    with self._writer.as_default(step=self.global_step):
      tf.summary.image("generated digits", grid)
    self._writer.flush()


class Gan(ImageClassification):
  """Digits in [0, 1], 8x8; the labels are not used for training."""

  def __init__(self, config):
    super().__init__(config)
    self.latent_dim = int(config.user.latent_dim)
    self.learning_rate = float(config.user.learning_rate)
    # Evaluation's fakes: each held-out image gets its own fixed noise (a
    # fixed projection of it), whatever the number of replicas.
    self.eval_projection = tf.constant(np.random.default_rng(1).normal(
        size=(64, self.latent_dim)).astype(np.float32) / 2.0)

  def build_model(self):
    generator = keras.Sequential([
        keras.Input((self.latent_dim,), name="noise"),
        keras.layers.Dense(128, activation="relu"),
        keras.layers.Dense(64, activation="sigmoid", dtype="float32"),
        keras.layers.Reshape((8, 8, 1))], name="generator")
    discriminator = keras.Sequential([
        keras.Input((8, 8, 1), name="image"),
        keras.layers.Flatten(),
        keras.layers.Dense(128),
        keras.layers.LeakyReLU(0.2),
        keras.layers.Dense(1, dtype="float32")], name="discriminator")
    return {"generator": generator, "discriminator": discriminator}

  def build_optimizer(self):
    adam = lambda: keras.optimizers.Adam(self.learning_rate, beta_1=0.5)
    return {"generator": adam(), "discriminator": adam()}

  def train_step(self, batch, step):
    generator = step.models["generator"]
    discriminator = step.models["discriminator"]
    real, _ = batch
    fake = generator(step.random_normal([self.latent_dim]), training=True)
    real_logits = discriminator(real, training=True)[:, 0]
    fake_logits = discriminator(fake, training=True)[:, 0]
    d_loss = step.mean(bce(1.0, real_logits) + bce(0.0, fake_logits))
    g_loss = step.mean(bce(1.0, fake_logits))
    d_turn = step.step % 2 == 0
    step.apply(d_loss, "discriminator", when=d_turn)
    step.apply(g_loss, "generator", when=~d_turn)
    return {"d_loss": d_loss, "g_loss": g_loss}

  def compute_loss(self, models, batch, training):
    """Evaluation: the discriminator's per-example loss on a held-out image
    and a fake, and its logits [batch, 2] (real, fake)."""
    real, _ = batch
    noise = tf.reshape(real, [-1, 64]) @ self.eval_projection
    fake = models["generator"](noise, training=training)
    logits = tf.concat([models["discriminator"](real, training=training),
                        models["discriminator"](fake, training=training)], 1)
    return bce(1.0, logits[:, 0]) + bce(0.0, logits[:, 1]), logits

  def build_metrics(self):
    return [DiscriminatorAccuracy()]

  def callbacks(self):
    return [SampleGrid(self.latent_dim)]
