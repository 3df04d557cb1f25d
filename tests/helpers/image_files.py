"""Datasets on disk made inside a test: an image folder of PNGs, TFRecord
shards of encoded images, a real TFDS dataset; a short run on one; the
built-in image task with a counter on its decode
(`user.count_dir/decoded-<pid>` at exit)."""

import atexit
import dataclasses
import os

import numpy as np
import tensorflow as tf

from trainer.tasks.image_classification import ImageClassification

_decoded = [0]


def _images(n: int, size: int, seed: int) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3),
                                              dtype=np.uint8)


def write_image_folder(root: str, *, per_class: int, classes=("cat", "dog"),
                       size: int = 10, splits=("train", "test")) -> str:
  """root/<split>/<class>/<i>.png; returns root."""
  for s, split in enumerate(splits):
    for c, name in enumerate(classes):
      folder = os.path.join(root, split, name)
      os.makedirs(folder, exist_ok=True)
      for i, image in enumerate(_images(per_class, size, 100 * s + c)):
        tf.io.write_file(os.path.join(folder, f"{i:04d}.png"),
                         tf.io.encode_png(image))
  return root


def write_image_records(folder: str, *, num_files: int, per_file: int,
                        size: int = 10, prefix: str = "train",
                        image_key: str = "image/encoded",
                        label_key: str = "image/class/label") -> str:
  """TFRecord shards of tf.train.Example {PNG bytes, int64 label in 0..1};
  returns their glob."""
  os.makedirs(folder, exist_ok=True)
  for f in range(num_files):
    path = os.path.join(folder, f"{prefix}-{f:03d}.tfrecord")
    with tf.io.TFRecordWriter(path) as writer:
      for i, image in enumerate(_images(per_file, size, f)):
        feature = {
            image_key: tf.train.Feature(bytes_list=tf.train.BytesList(
                value=[tf.io.encode_png(image).numpy()])),
            label_key: tf.train.Feature(int64_list=tf.train.Int64List(
                value=[(f + i) % 2]))}
        writer.write(tf.train.Example(features=tf.train.Features(
            feature=feature)).SerializeToString())
  return os.path.join(folder, f"{prefix}-*.tfrecord")


def write_tfds(data_dir: str, *, num_train: int, num_test: int,
               name: str = "disk_images", size: int = 8) -> str:
  """A real TFDS dataset `name` in `data_dir` (TFRecord files, 2 classes),
  made by tfds.dataset_builders.store_as_tfds_dataset; returns its name."""
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  features = tfds.features.FeaturesDict({
      "image": tfds.features.Image(shape=(size, size, 3)),
      "label": tfds.features.ClassLabel(num_classes=2)})
  split = lambda n, seed: tf.data.Dataset.from_tensor_slices(
      {"image": _images(n, size, seed), "label": np.arange(n) % 2})
  tfds.dataset_builders.store_as_tfds_dataset(
      name=name, version="1.0.0", features=features, data_dir=data_dir,
      split_datasets={"train": split(num_train, 0),
                      "test": split(num_test, 1)})
  return name


def on_disk_run(workdir, *, steps: int = 12, deterministic: bool = False,
                eval_every: int = 0, **data):
  """A short in-process run of the built-in task on an on-disk source:
  6x6 images, batches of 4, host loops of 4 steps, `steps` steps."""
  from configs import digits  # pylint: disable=import-outside-toplevel
  from trainer.run import run  # pylint: disable=import-outside-toplevel
  config = digits.get_config()
  config.data.update(dict(image_size=6, global_batch_size=4,
                          eval_batch_size=4, shuffle_buffer=8, **data))
  config.train.steps, config.train.steps_per_loop = steps, 4
  config.train.deterministic, config.train.eval_every = (deterministic,
                                                         eval_every)
  config.callbacks.progress_bar = config.callbacks.tensorboard = False
  return run(config, str(workdir))


def _count(label):
  _decoded[0] += 1
  return label


class CountingImages(ImageClassification):
  """The built-in task; counts the training records its source decodes."""

  def __init__(self, config):
    super().__init__(config)
    count_dir = config.user.count_dir
    atexit.register(lambda: open(os.path.join(
        count_dir, f"decoded-{os.getpid()}"), "w").write(str(_decoded[0])))

  def train_data(self):
    files = self.source.train
    decode = files.decode

    def counted(record):
      image, label = decode(record)
      label = tf.py_function(_count, [label], tf.int32)
      label.set_shape([])
      return image, label

    return dataclasses.replace(files, decode=counted)
