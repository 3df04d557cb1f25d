"""A custom training strategy: knowledge distillation on the 8x8 digits.

A frozen teacher (a wide MLP) and a small student trained on the teacher's
softened outputs plus the labels, written as the task's own `train_step`
(trainer/step/context.py). The teacher is loaded from a finished run's
workdir (`user.teacher_workdir`, e.g. one of configs/digits.py) or, without
one, trained in this process when the run starts (a resumed run restores
it from its checkpoint) with the framework's Python API (`Trainer.fit`)
under the same strategy. Evaluation reports the student's
`accuracy` and the teacher's (`teacher_accuracy`); the exported model is the
student.

  python -m launch.train --config=configs/distillation.py --workdir=runs/kd
"""

import keras
import tensorflow as tf
from absl import logging

from trainer.callbacks import TrainerCallback
from trainer.config import default_config
from trainer.errors import ConfigError, UserError
from trainer.fit.trainer import Trainer
from trainer.checkpoint.restore import restore
from trainer.tasks.image_classification import ImageClassification


def get_config():
  c = default_config()
  c.task = "configs.distillation:Distillation"
  c.data.name = "digits"
  c.data.global_batch_size = 64
  c.data.eval_batch_size = 100
  c.user.teacher_workdir = ""  # a finished run's workdir; "" = train one
  c.user.teacher_epochs = 20  # passes over the data when training it here
  c.user.student_width = 16
  c.user.temperature = 2.0
  c.user.soft_weight = 0.5  # of the soft-target loss; the rest: labels
  c.optimizer.name = "adam"
  c.optimizer.learning_rate = 3e-3
  c.train.steps = 600
  c.train.steps_per_loop = 50
  c.train.steps_per_epoch = 200
  c.train.checkpoint_every = 200
  return c


class PrepareTeacher(TrainerCallback):
  """Trains the teacher before the first step of a fresh run (a resumed run
  has it from its checkpoint, a loaded one from its workdir), measures its
  eval accuracy once, and adds it to every evaluation's logs."""

  def __init__(self, task):
    super().__init__()
    self.task = task

  def on_train_begin(self, logs=None):
    task, strategy = self.task, self.trainer.strategy
    teacher = self.trainer.models["teacher"]
    if self.global_step == 0 and not task.user.teacher_workdir:
      teacher.trainable = True
      images, labels = task.train_data()
      Trainer(model=teacher, optimizer=keras.optimizers.Adam(3e-3),
              loss=task.build_losses, strategy=strategy, steps_per_loop=100,
              seed=task.config.seed).fit(
                  images, labels, epochs=int(task.user.teacher_epochs),
                  batch_size=task.config.data.global_batch_size)
      teacher.trainable = False
    if task.teacher_accuracy is None:
      task.teacher_accuracy = Trainer(
          model=teacher, optimizer=keras.optimizers.SGD(),
          loss=task.build_losses, metrics=task.build_metrics,
          strategy=strategy).evaluate(task.eval_data().batch(
              task.config.data.eval_batch_size))["accuracy"]
      logging.info("teacher eval accuracy %.4f", task.teacher_accuracy)

  def on_test_end(self, logs=None):
    if logs is not None and self.task.teacher_accuracy is not None:
      logs["teacher_accuracy"] = self.task.teacher_accuracy


class Distillation(ImageClassification):
  """Student <- frozen teacher on the digits."""

  def __init__(self, config):
    super().__init__(config)
    self.user = config.user
    self.teacher_accuracy = None  # measured when training begins

  def _teacher(self) -> keras.Model:
    """The frozen teacher: loaded from `user.teacher_workdir`, or the
    digits MLP that PrepareTeacher trains when the run starts."""
    if not self.user.teacher_workdir:
      teacher = super().build_model()
    else:
      try:
        finished = restore(self.user.teacher_workdir)
      except UserError as e:
        raise ConfigError(f"user.teacher_workdir: {e}") from None
      teacher = finished.task.build_model()
      teacher.set_weights(finished.model.get_weights())
      logging.info("teacher loaded from %s", finished.checkpoint)
    teacher.trainable = False
    return teacher

  def build_model(self):
    """{"student": the small MLP (exported), "teacher": frozen}."""
    info = self.source.info
    student = keras.Sequential([
        keras.Input(info.input_shape, name="image"),
        keras.layers.Flatten(),
        keras.layers.Dense(self.user.student_width, activation="relu"),
        keras.layers.Dense(info.num_classes, dtype="float32")],
                               name="student")
    return {"student": student, "teacher": self._teacher()}

  def train_step(self, batch, step):
    images, labels = batch
    student, teacher = step.models["student"], step.models["teacher"]
    t = float(self.user.temperature)
    soft_targets = tf.nn.softmax(
        tf.cast(teacher(images, training=False), tf.float32) / t)
    logits = tf.cast(student(images, training=True), tf.float32)
    soft = t * t * keras.losses.kl_divergence(
        soft_targets, tf.nn.softmax(logits / t))
    hard = self.build_losses(labels, logits)
    w = float(self.user.soft_weight)
    loss = step.mean(w * soft + (1 - w) * hard, model=student)
    step.apply(loss, "student")
    step.update_metrics(labels, logits)  # keras-io: compiled_metrics
    return {"soft_loss": step.mean(soft), "label_loss": step.mean(hard)}

  def compute_loss(self, models, batch, training):
    """Evaluation: the student's cross-entropy and logits."""
    images, labels = batch
    logits = models["student"](images, training=training)
    return self.build_losses(labels, logits), logits

  def callbacks(self):
    return [PrepareTeacher(self)]
