"""The built-in task: image classification by `model.name` on `data.name`.

digits (offline default), synthetic, image_folder, tfrecord or a TFDS image
dataset (trainer/data/sources.py);
the models of trainer.tasks.models; sparse cross-entropy from logits; accuracy.
It is one Task like a user's (trainer/task.py): `task` defaults to it.
"""

import functools

import keras
import ml_collections
from absl import logging

from trainer import data as data_lib
from trainer.tasks import models


class ImageClassification:
  """Classifies images [H, W, C] in [0, 1] into `num_classes` (int labels).

  Args:
    config: the run's config; reads `data.*`, `model.*` and `seed`.
  """

  def __init__(self, config: ml_collections.ConfigDict):
    self.config = config

  @functools.cached_property
  def source(self) -> data_lib.Source:
    """The dataset named by `data.name`, loaded once. An image folder's
    classes are its class folders: their count becomes `data.num_classes`
    (logged when it differs) and their names `data.class_names`, so
    config.json (and the export's report) say what output i means."""
    source = data_lib.load_source(self.config.data, self.config.seed)
    data = self.config.data
    if data.name == "image_folder" and (
        source.info.num_classes != data.num_classes):
      logging.warning("data.num_classes=%d from the %d class folders of %s "
                      "(the config said %d)", source.info.num_classes,
                      source.info.num_classes, data.data_dir,
                      data.num_classes)
      data.num_classes = source.info.num_classes
    if data.name == "image_folder":
      data.class_names = tuple(source.info.class_names)
    return source

  def build_model(self) -> keras.Model:
    """[batch, H, W, C] float32 -> logits [batch, num_classes] float32."""
    return models.build_model(self.config.model, self.source.info)

  def train_data(self):
    """(images [N, H, W, C], labels [N]) in memory when they are, so the
    training stream is addressed by step; else the TFDS dataset."""
    return self.source.train_arrays or self.source.train

  def eval_data(self):
    return self.source.eval

  def build_losses(self, labels, logits):
    """Sparse cross-entropy from logits, one per example: [batch]."""
    return keras.losses.sparse_categorical_crossentropy(labels, logits,
                                                        from_logits=True)

  def build_metrics(self) -> list:
    return [keras.metrics.SparseCategoricalAccuracy(name="accuracy")]
