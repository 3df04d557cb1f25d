"""keras-io's "DCGAN overriding Model.train_step", ported: the digits, no labels.

The Keras example updates the discriminator, then trains the generator
against the UPDATED discriminator, in one `train_step`. Here the same step,
line for line, with the trainer's primitives (docs/keras_train_step.md):

  Keras train_step                         this task's train_step
  keras.random.normal(seed=seed_generator) step.random_normal([latent_dim])
  labels += 0.05 * tf.random.uniform(...)  step.random_uniform([1]) per row
  self.loss_fn(labels, predictions)        step.mean(bce, per_example=False)
  d_optimizer.apply_gradients(...)         step.apply(d_loss, "discriminator",
                                                      now=True)
  g_optimizer.apply_gradients(...)         step.apply(g_loss, "generator")

train_data() gives images alone (a GAN has no labels) and there is no
eval_data(): no evaluation; TensorBoard gets a 4x4 grid of samples
(`tensorboard/samples`) at every epoch end. 8x8 digits instead of 64x64
faces, so the networks are smaller (two strided convolutions each way).

  python -m launch.train --config=configs/dcgan.py --workdir=runs/dcgan
"""

import keras
import tensorflow as tf

from configs.gan import SampleGrid
from trainer.config import default_config
from trainer.data import load_digits


def get_config():
  c = default_config()
  c.task = "configs.dcgan:DcGan"
  c.data.name = "digits"  # images alone, from trainer.data.load_digits
  c.data.global_batch_size = 64
  c.user.latent_dim = 16
  c.user.learning_rate = 2e-4  # keras-io: 1e-4 for 64x64 faces
  c.train.steps = 1200
  c.train.steps_per_loop = 50
  c.train.steps_per_epoch = 200
  c.train.checkpoint_every = 400
  return c


class DcGan:
  """The keras-io DCGAN on the 8x8 digits in [0, 1]: its fakes are
  labelled 1 and the real images 0, with 0.05 label noise."""

  def __init__(self, config):
    self.latent_dim = int(config.user.latent_dim)
    self.learning_rate = float(config.user.learning_rate)

  def build_model(self):
    generator = keras.Sequential([
        keras.Input((self.latent_dim,), name="noise"),
        keras.layers.Dense(4 * 4 * 64),
        keras.layers.Reshape((4, 4, 64)),
        keras.layers.Conv2DTranspose(64, 4, strides=2, padding="same"),
        keras.layers.LeakyReLU(0.2),
        keras.layers.Conv2D(1, 3, padding="same", activation="sigmoid",
                            dtype="float32")], name="generator")
    discriminator = keras.Sequential([
        keras.Input((8, 8, 1), name="image"),
        keras.layers.Conv2D(32, 3, strides=2, padding="same"),
        keras.layers.LeakyReLU(0.2),
        keras.layers.Conv2D(64, 3, strides=2, padding="same"),
        keras.layers.LeakyReLU(0.2),
        keras.layers.Flatten(),
        keras.layers.Dropout(0.2),
        keras.layers.Dense(1, activation="sigmoid", dtype="float32")],
                                     name="discriminator")
    return {"generator": generator, "discriminator": discriminator}

  def build_optimizer(self):
    return {"generator": keras.optimizers.Adam(self.learning_rate),
            "discriminator": keras.optimizers.Adam(self.learning_rate)}

  def train_data(self):
    """Images alone, [1797, 8, 8, 1] float32 in [0, 1]."""
    x, _ = load_digits()
    return (x.reshape(-1, 8, 8, 1) / 16.0).astype("float32")

  def train_step(self, real, step):
    generator = step.models["generator"]
    discriminator = step.models["discriminator"]
    rows = tf.shape(real)[0]
    fake = generator(step.random_normal([self.latent_dim]))
    combined = tf.concat([fake, real], 0)
    labels = tf.concat([tf.ones([rows, 1]), tf.zeros([rows, 1])], 0)
    labels += 0.05 * tf.concat([step.random_uniform([1]),
                                step.random_uniform([1])], 0)
    d_loss = step.mean(keras.losses.binary_crossentropy(
        labels, discriminator(combined)), per_example=False)
    step.apply(d_loss, "discriminator", now=True)
    misleading = tf.zeros([rows, 1])  # "all real"
    g_loss = step.mean(keras.losses.binary_crossentropy(
        misleading, discriminator(generator(
            step.random_normal([self.latent_dim])))))
    step.apply(g_loss, "generator")
    return {"d_loss": d_loss, "g_loss": g_loss}

  def callbacks(self):
    return [SampleGrid(self.latent_dim)]
