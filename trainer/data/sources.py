"""The built-in image datasets, by `data.name`.

  digits        the 8x8 handwritten digits (trainer/data/digits.csv.gz, as
                scikit-learn ships them: offline; 1797 images, a fixed
                split of 1497 train / 300 eval);
  synthetic     random images and labels of `data.synthetic_shape`, in memory;
  image_folder  `<data.data_dir>/<split>/<label>/*.jpg|jpeg|png|bmp|gif`, the
                layout of `tfds.folder_dataset.ImageFolder`;
  tfrecord      `data.train_files` / `data.eval_files` globs of tf.train.Example
                records: encoded image bytes in `data.image_key`, an int64
                label in `data.label_key`;
  <tfds>        any TFDS image-classification dataset already in
                `data.data_dir` (never downloads: no network is assumed).

Every source gives unbatched `(image float32 [H, W, C] in [0, 1], label
int32)`; the on-disk ones as `trainer.data.files.Files`, so each worker
decodes only its own files and a resume seeks instead of replaying.
"""

import dataclasses
import os

import ml_collections
import numpy as np
import tensorflow as tf

from trainer.data.files import Files, ordered
from trainer.errors import DataError, message_line

DIGITS_EVAL_EXAMPLES = 300
DIGITS_SPLIT_SEED = 1234  # fixed: the split never depends on config.seed


@dataclasses.dataclass(frozen=True)
class DataInfo:
  """What the model needs to know about a dataset."""
  input_shape: tuple  # per example, e.g. (8, 8, 1)
  num_classes: int
  num_train: int | None  # None when the source does not say (mock data)
  num_eval: int | None
  class_names: tuple = ()  # label i's name, where the source has names


@dataclasses.dataclass(frozen=True)
class Source:
  train: tf.data.Dataset | Files  # unbatched (image, label), finite
  eval: tf.data.Dataset | Files
  info: DataInfo
  # The training split in memory, (images [N, ...], labels [N]), when it
  # fits: then the training stream is addressed by step and a resume
  # starts at its position without replaying the batches before it.
  train_arrays: tuple | None = None


# The UCI "Optical Recognition of Handwritten Digits" test set (Alpaydin and
# Kaynak, 1998; CC BY 4.0), the file scikit-learn ships as
# sklearn/datasets/data/digits.csv.gz (BSD-3): 1797 rows of 64 pixel values
# in 0..16 and the label. Kept here so the offline default needs no
# scikit-learn (Keras imports it when installed: ~1 s of every process's
# start).
DIGITS_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                           "digits.csv.gz")


def load_digits() -> tuple[np.ndarray, np.ndarray]:
  """The 8x8 digits as scikit-learn's `load_digits(return_X_y=True)` gives
  them: (x float64 [1797, 64] in 0..16, y int64 [1797])."""
  rows = np.loadtxt(DIGITS_FILE, delimiter=",")
  return rows[:, :-1], rows[:, -1].astype(np.int64)


def _digits() -> Source:
  x, y = load_digits()
  images = (x.reshape(-1, 8, 8) / 16.0).astype(np.float32)[..., None]
  labels = y.astype(np.int32)
  order = np.random.RandomState(DIGITS_SPLIT_SEED).permutation(len(labels))
  eval_idx, train_idx = (order[:DIGITS_EVAL_EXAMPLES],
                         order[DIGITS_EVAL_EXAMPLES:])
  make = lambda idx: tf.data.Dataset.from_tensor_slices(
      (images[idx], labels[idx]))
  return Source(make(train_idx), make(eval_idx),
                DataInfo((8, 8, 1), 10, len(train_idx), len(eval_idx)),
                train_arrays=(images[train_idx], labels[train_idx]))


def _synthetic(cfg: ml_collections.ConfigDict, seed: int) -> Source:
  shape = tuple(int(d) for d in cfg.synthetic_shape)
  n = int(cfg.synthetic_examples)
  if n <= 0 or not shape or min(shape) <= 0:
    raise DataError("data.synthetic_shape and data.synthetic_examples must be "
                    f"positive, got {shape} and {n}")
  rng = np.random.RandomState(seed)
  images = rng.uniform(size=(n,) + shape).astype(np.float32)
  labels = rng.randint(0, cfg.num_classes, size=n).astype(np.int32)
  ds = tf.data.Dataset.from_tensor_slices((images, labels))
  return Source(ds, ds, DataInfo(shape, int(cfg.num_classes), n, n),
                train_arrays=(images, labels))



def _prepare(size: int):
  """(image uint8/float [H, W, C], label) -> (float32 in [0, 1] resized to
  `size` x `size` when `size`, int32)."""

  def prepare(image, label):
    image = tf.image.convert_image_dtype(image, tf.float32)
    if size:
      image = tf.image.resize(image, (size, size))
    return image, tf.cast(label, tf.int32)

  return prepare


def _first_example(files: Files, what: str):
  """Decodes the first record of `files`, so a missing key or an image that
  does not decode is one DataError naming `what` before training."""
  try:
    return next(iter(ordered(files).take(1)))
  except StopIteration:
    raise DataError(f"{what}: the files hold no records") from None
  except (tf.errors.OpError, ValueError) as e:
    raise DataError(f"{what}: the first record does not decode: "
                    f"{message_line(e)}"
                    ) from None


def _needs_size(cfg: ml_collections.ConfigDict) -> int:
  if int(cfg.image_size) <= 0:
    raise DataError(f"data.name={cfg.name} decodes images of any size; set "
                    "--config.data.image_size=N to resize them to N x N")
  return int(cfg.image_size)


def _tfrecord(cfg: ml_collections.ConfigDict) -> Source:
  size = _needs_size(cfg)
  if not cfg.train_files or not cfg.eval_files:
    raise DataError("data.name=tfrecord reads data.train_files and "
                    "data.eval_files (globs of tf.train.Example files); set "
                    "both")
  keys = {cfg.image_key: tf.io.FixedLenFeature([], tf.string),
          cfg.label_key: tf.io.FixedLenFeature([], tf.int64)}
  prepare = _prepare(size)
  num_classes = int(cfg.num_classes)

  def make(pattern, key, channels):
    def decode(record):
      parsed = tf.io.parse_single_example(record, keys)
      image = tf.io.decode_image(parsed[cfg.image_key], channels=channels,
                                 expand_animations=False)
      label = parsed[cfg.label_key]
      in_range = tf.debugging.Assert(
          (label >= 0) & (label < num_classes),
          [f"label outside [0, {num_classes}) (data.num_classes) in {key} "
           f"{pattern}:", label], summarize=1)
      with tf.control_dependencies([in_range]):
        return prepare(image, tf.identity(label))
    files = Files(paths=pattern, decode=decode)
    return files, _first_example(files, f"{key} {pattern!r}")

  _, (image, _) = make(cfg.train_files, "data.train_files", 0)
  channels = int(image.shape[-1])  # decode every image to the first's
  train, _ = make(cfg.train_files, "data.train_files", channels)
  evals, _ = make(cfg.eval_files, "data.eval_files", channels)
  return Source(train, evals, DataInfo((size, size, channels),
                                       int(cfg.num_classes), None, None))


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")


def _image_files(root: str, split: str, key: str
                 ) -> tuple[list[str], list[str]]:
  """The images of `root/split/<label>/`, sorted, and their label names;
  `key` is the config key that names `split`."""
  folder = os.path.join(root, split)
  if not os.path.isdir(folder):
    raise DataError(f"data.name=image_folder: no folder {folder!r} "
                    f"({key}={split!r}); the layout is "
                    "<data.data_dir>/<split>/<label>/<image>: set "
                    f"--config.{key} to the split's folder name")
  paths, labels = [], []
  for label in sorted(e.name for e in os.scandir(folder) if e.is_dir()):
    for entry in sorted(os.scandir(os.path.join(folder, label)),
                        key=lambda e: e.name):
      if entry.name.lower().endswith(IMAGE_EXTENSIONS):
        paths.append(entry.path)
        labels.append(label)
  if not paths:
    raise DataError(f"data.name=image_folder: no images in {folder!r} (one "
                    f"folder per label holding {'/'.join(IMAGE_EXTENSIONS)} "
                    "files)")
  return paths, labels


def _image_folder(cfg: ml_collections.ConfigDict) -> Source:
  size = _needs_size(cfg)
  if not cfg.data_dir:
    raise DataError("data.name=image_folder reads data.data_dir; set it to "
                    "the folder holding <split>/<label>/<image>")
  train_paths, train_labels = _image_files(cfg.data_dir, cfg.train_split,
                                           "data.train_split")
  eval_paths, eval_labels = _image_files(cfg.data_dir, cfg.eval_split,
                                         "data.eval_split")
  classes = sorted(set(train_labels))
  unknown = sorted(set(eval_labels) - set(classes))
  if unknown:
    raise DataError(f"data.name=image_folder: eval split {cfg.eval_split!r} "
                    f"has labels {unknown[:5]} that the train split lacks")
  table = tf.lookup.StaticHashTable(tf.lookup.KeyValueTensorInitializer(
      tf.constant(classes), tf.range(len(classes), dtype=tf.int64)), -1)
  prepare = _prepare(size)

  def make(paths, channels):
    def decode(path):
      label = table.lookup(tf.strings.split(path, os.sep)[-2])
      image = tf.io.decode_image(tf.io.read_file(path), channels=channels,
                                 expand_animations=False)
      return prepare(image, label)
    files = Files(paths=paths, decode=decode, reader=None,
                  record_counts=[1] * len(paths))
    return files, _first_example(files, f"image folder {paths[0]!r}")

  _, (image, _) = make(train_paths, 0)
  channels = int(image.shape[-1])  # decode every image to the first's
  train, _ = make(train_paths, channels)
  evals, _ = make(eval_paths, channels)
  return Source(train, evals, DataInfo((size, size, channels), len(classes),
                                       len(train_paths), len(eval_paths),
                                       tuple(classes)))


def _tfds_files(builder, split: str, decode) -> Files | None:
  """The TFRecord files of a whole TFDS split, or None when TFDS reads it
  another way (a sliced split such as train[:10%], another file format)."""
  if str(builder.info.file_format) not in ("FileFormat.TFRECORD",
                                           "tfrecord"):
    return None
  try:
    instructions = builder.info.splits[split].file_instructions
  except (KeyError, ValueError):
    return None
  if any(fi.skip or fi.take != fi.examples_in_shard for fi in instructions):
    return None
  return Files(paths=[fi.filename for fi in instructions], decode=decode,
               record_counts=[fi.take for fi in instructions])


def _tfds(cfg: ml_collections.ConfigDict, seed: int) -> Source:
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  data_dir = cfg.data_dir or None
  try:
    builder = tfds.builder(cfg.name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    raise DataError(f"unknown data.name {cfg.name!r}: not digits, synthetic, "
                    "image_folder, tfrecord or a TFDS dataset name (see "
                    "`tfds.list_builders()`)") from None
  features = builder.info.features
  if "image" not in features or "label" not in features:
    raise DataError(f"TFDS dataset {cfg.name!r} has no image/label features;"
                    " only image classification datasets are supported")
  prepare = _prepare(int(cfg.image_size))

  def decode(record):
    example = features.deserialize_example(record)
    return prepare(example["image"], example["label"])

  def load(split, training):
    try:
      if builder.is_prepared():
        files = _tfds_files(builder, split, decode)
        if files is not None:
          return files
      ds = builder.as_dataset(
          split=split, as_supervised=True, shuffle_files=training,
          read_config=tfds.ReadConfig(shuffle_seed=seed))
    except AssertionError:
      raise DataError(
          f"TFDS dataset {cfg.name!r} is not in data_dir "
          f"{data_dir or tfds.core.constants.DATA_DIR!r} and this machine is "
          "offline; prepare it where there is network (`tfds build "
          f"{cfg.name} --data_dir=DIR`), copy DIR here and set "
          "--config.data.data_dir=DIR") from None
    except (ValueError, KeyError) as e:
      raise DataError(f"TFDS dataset {cfg.name!r}: {e}") from None
    return ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE)

  def split_size(split):
    info = builder.info.splits.get(split) if builder.info.splits else None
    return info.num_examples if info else None

  shape = tuple(features["image"].shape)
  if cfg.image_size:
    shape = (int(cfg.image_size), int(cfg.image_size), shape[-1])
  if None in shape:
    raise DataError(f"TFDS dataset {cfg.name!r} has images of varying size; "
                    "set --config.data.image_size=N to resize them")
  train = load(cfg.train_split, True)
  arrays = None
  if cfg.in_memory:  # one ordered pass, then gathers from memory
    whole = ordered(train) if isinstance(train, Files) else load(
        cfg.train_split, False)
    batches = list(whole.batch(4096).as_numpy_iterator())
    arrays = tuple(np.concatenate(parts) for parts in zip(*batches))
  return Source(train, load(cfg.eval_split, False),
                DataInfo(shape, int(features["label"].num_classes),
                         split_size(cfg.train_split),
                         split_size(cfg.eval_split)),
                train_arrays=arrays)


def load_source(cfg: ml_collections.ConfigDict, seed: int) -> Source:
  """The dataset named by `cfg.name` (the config's `data` section)."""
  if cfg.name == "digits":
    return _digits()
  if cfg.name == "synthetic":
    return _synthetic(cfg, seed)
  if cfg.name == "tfrecord":
    return _tfrecord(cfg)
  if cfg.name == "image_folder":
    return _image_folder(cfg)
  return _tfds(cfg, seed)
