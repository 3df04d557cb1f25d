"""A task that reads its training data from TFRecord shards, as a user's
would, and counts the records its parse map decodes in this process (written
to `user.count_dir/decoded-<start time ns>-<pid>` at exit: sorted by name,
in the order the processes started). Settings: user.files (a glob),
user.as_files (return trainer.data.Files instead of a tf.data pipeline),
user.print_decoded (no Python in the map, so it runs on tf.data service
workers: each decoded record prints `decoded <id>` to its process's stderr
instead of being counted)."""

import atexit
import os
import sys
import time

import keras
import numpy as np
import tensorflow as tf

from trainer.data import Files

FEATURES = 16
_decoded = [0]


def write_shards(folder: str, num_files: int, per_file: int) -> str:
  """num_files TFRecord files of per_file records {x: 16 floats, y: int64,
  id: int64 (0, 1, ... over all files)}; returns their glob."""
  rng = np.random.default_rng(0)
  for f in range(num_files):
    with tf.io.TFRecordWriter(os.path.join(folder, f"train-{f}.tfrecord")) as w:
      for r in range(per_file):
        x = rng.normal(size=FEATURES).astype(np.float32)
        example = tf.train.Example(features=tf.train.Features(feature={
            "x": tf.train.Feature(float_list=tf.train.FloatList(value=x)),
            "y": tf.train.Feature(int64_list=tf.train.Int64List(
                value=[int(x.sum() > 0)])),
            "id": tf.train.Feature(int64_list=tf.train.Int64List(
                value=[f * per_file + r]))}))
        w.write(example.SerializeToString())
  return os.path.join(folder, "train-*.tfrecord")


def _count(y):
  _decoded[0] += 1
  return y


class TFRecordTask:
  print_decoded = False

  def __init__(self, config):
    self.files = config.user.files
    self.as_files = bool(config.user.get("as_files", False))
    self.print_decoded = bool(config.user.get("print_decoded", False))
    count_dir = config.user.count_dir
    name = f"decoded-{time.time_ns()}-{os.getpid()}"
    atexit.register(lambda: open(os.path.join(count_dir, name), "w").write(
        str(_decoded[0])))

  def build_model(self):
    return keras.Sequential([keras.Input((FEATURES,)),
                             keras.layers.Dense(8, activation="relu"),
                             keras.layers.Dense(2, dtype="float32")])

  def _parse(self, record):
    parsed = tf.io.parse_single_example(record, {
        "x": tf.io.FixedLenFeature([FEATURES], tf.float32),
        "y": tf.io.FixedLenFeature([], tf.int64),
        "id": tf.io.FixedLenFeature([], tf.int64)})
    if self.print_decoded:
      tf.print("decoded", parsed["id"], output_stream=sys.stderr)
      return parsed["x"], tf.cast(parsed["y"], tf.int32)
    y = tf.py_function(_count, [parsed["y"]], tf.int64)
    y.set_shape([])
    return parsed["x"], tf.cast(y, tf.int32)

  def train_data(self):
    if self.as_files:
      return Files(self.files, self._parse)
    files = tf.data.Dataset.list_files(self.files, shuffle=False)
    return files.interleave(tf.data.TFRecordDataset, cycle_length=2).map(
        self._parse)

  def eval_data(self):
    x = np.random.default_rng(1).normal(size=(64, FEATURES)).astype("float32")
    return x, (x.sum(1) > 0).astype("int32")

  def build_losses(self, labels, logits):
    return keras.losses.sparse_categorical_crossentropy(labels, logits,
                                                        from_logits=True)

  def build_metrics(self):
    return [keras.metrics.SparseCategoricalAccuracy(name="accuracy")]
