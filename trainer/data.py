"""Datasets by name, served per replica through `InputContext`.

Sources (`data.name`):
  digits     the 8x8 handwritten digits that ship inside scikit-learn (offline;
             1797 images, a fixed split of 1497 train / 300 eval);
  synthetic  random images and labels of `data.synthetic_shape`, held in memory;
  <tfds>     any TFDS image-classification dataset already in `data.data_dir`
             (never downloads: no network is assumed).

Every source yields unbatched `(image float32 [H, W, C] in [0, 1], label int32)`.
`input_fn` turns one into a function of `tf.distribute.InputContext` for
`strategy.distribute_datasets_from_function`: seeded shuffle, per-replica
batches, then batch-level sharding across input pipelines (workers), so the
k-th global batch holds the same examples whatever the replica layout.
"""

import dataclasses
from typing import Callable

import ml_collections
import numpy as np
import tensorflow as tf

from trainer.errors import ConfigError, DataError

DIGITS_EVAL_EXAMPLES = 300
DIGITS_SPLIT_SEED = 1234  # fixed: the split never depends on config.seed


@dataclasses.dataclass(frozen=True)
class DataInfo:
  """What the model needs to know about a dataset."""
  input_shape: tuple  # per example, e.g. (8, 8, 1)
  num_classes: int
  num_train: int | None  # None when the source does not say (mock data)
  num_eval: int | None


@dataclasses.dataclass(frozen=True)
class Source:
  train: tf.data.Dataset  # unbatched (image, label), finite
  eval: tf.data.Dataset
  info: DataInfo
  # The training split in memory, (images [N, ...], labels [N]), when it
  # fits: then the training stream is random access and resumes in O(1).
  train_arrays: tuple | None = None


def _digits() -> Source:
  from sklearn import datasets as sk_datasets  # pylint: disable=import-outside-toplevel
  digits = sk_datasets.load_digits()
  images = (digits.images / 16.0).astype(np.float32)[..., None]
  labels = digits.target.astype(np.int32)
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


def _tfds(cfg: ml_collections.ConfigDict, seed: int) -> Source:
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  data_dir = cfg.data_dir or None
  try:
    builder = tfds.builder(cfg.name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    raise DataError(f"unknown data.name {cfg.name!r}: not digits, synthetic "
                    "or a TFDS dataset name (see `tfds.list_builders()`)"
                    ) from None
  features = builder.info.features
  if "image" not in features or "label" not in features:
    raise DataError(f"TFDS dataset {cfg.name!r} has no image/label features;"
                    " only image classification datasets are supported")

  def load(split, training):
    try:
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
    except ValueError as e:
      raise DataError(f"TFDS dataset {cfg.name!r}: {e}") from None
    size = int(cfg.image_size)

    def prepare(image, label):
      image = tf.image.convert_image_dtype(image, tf.float32)
      if size:
        image = tf.image.resize(image, (size, size))
      return image, tf.cast(label, tf.int32)

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
  if cfg.in_memory:  # one ordered pass, then random access from memory
    ordered = load(cfg.train_split, False).batch(4096)
    batches = list(ordered.as_numpy_iterator())
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
  return _tfds(cfg, seed)


def input_fn(examples: tf.data.Dataset, *, global_batch_size: int,
             training: bool, seed: int = 0, shuffle_buffer: int = 10_000,
             start_step: int = 0
            ) -> Callable[[tf.distribute.InputContext], tf.data.Dataset]:
  """A dataset function for `strategy.distribute_datasets_from_function`.

  Training: shuffled with `seed` (reshuffled each epoch), repeated, full
  batches only; `start_step` skips the batches of the steps already taken
  (reading them: O(start_step); in-memory sources use `stream_input_fn`).
  Eval: one pass in order, the last batch partial, so every example is seen
  exactly once.
  """

  def dataset_fn(ctx: tf.distribute.InputContext) -> tf.data.Dataset:
    per_replica = ctx.get_per_replica_batch_size(global_batch_size)
    ds = examples
    if training:
      ds = ds.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
      ds = ds.repeat()
    ds = ds.batch(per_replica, drop_remainder=training)
    if ctx.num_input_pipelines > 1:
      ds = ds.shard(ctx.num_input_pipelines, ctx.input_pipeline_id)
    if start_step:
      ds = ds.skip(start_step * ctx.num_replicas_in_sync //
                   ctx.num_input_pipelines)
    return ds.prefetch(tf.data.AUTOTUNE)

  return dataset_fn


def stream_positions(batch_index: tf.Tensor, per_replica: int,
                     num_examples: int, seed: int) -> tf.Tensor:
  """Example indices of per-replica batches `batch_index` of the stream.

  The training stream is epoch after epoch of the N examples, each epoch a
  permutation fixed by (seed, epoch). Global step k reads stream positions
  [k * B, (k + 1) * B); per-replica batch q reads [q * b, (q + 1) * b).
  Random access: any batch is computed directly, without reading the ones
  before it. `batch_index` is a scalar or a vector of ascending indices
  whose batches span at most N positions. Returns int64
  [*batch_index.shape, per_replica].
  """
  batch_index = tf.convert_to_tensor(batch_index, tf.int64)
  pos = tf.reshape(batch_index, [-1, 1]) * per_replica + tf.range(
      per_replica, dtype=tf.int64)
  pos = tf.reshape(pos, [-1])
  epoch, index = pos // num_examples, pos % num_examples
  max_index = tf.fill(tf.shape(index), tf.constant(num_examples - 1,
                                                   tf.int64))
  first_epoch = epoch[0]  # the positions span at most two epochs

  def permuted(e):
    return tf.random.experimental.index_shuffle(
        index, tf.stack([tf.constant(seed, tf.int64), e]), max_index)

  out = tf.where(epoch == first_epoch, permuted(first_epoch),
                 permuted(first_epoch + 1))
  return tf.reshape(out, tf.concat([tf.shape(batch_index), [per_replica]],
                                   0))


def stream_input_fn(arrays: tuple, *, global_batch_size: int, seed: int,
                    start_step: int = 0
                   ) -> Callable[[tf.distribute.InputContext],
                                 tf.data.Dataset]:
  """The training dataset function for a source held in memory.

  Per-replica batch q of the stream (see `stream_positions`) goes to input
  pipeline q mod P, whose replicas take its batches in turn: the same global
  batches for any number of replicas or workers. Starting at `start_step`
  costs nothing: the position is derived from the step (DESIGN.md fact 8).
  """
  images, labels = arrays
  num_examples = len(labels)

  def dataset_fn(ctx: tf.distribute.InputContext) -> tf.data.Dataset:
    per_replica = ctx.get_per_replica_batch_size(global_batch_size)
    if per_replica > num_examples:
      raise DataError(f"a per-replica batch of {per_replica} is larger than "
                      f"the {num_examples} training examples")
    images_t, labels_t = tf.constant(images), tf.constant(labels)
    first = start_step * ctx.num_replicas_in_sync + ctx.input_pipeline_id
    pipelines = ctx.num_input_pipelines
    batches = tf.data.Dataset.range(first, 2**62, pipelines)
    # Up to 16 batches per map call (tf.data's per-element cost is about
    # that of one digits train step), spanning at most N positions.
    chunk = max(1, min(16, num_examples // (per_replica * pipelines)))

    def gather(qs):  # [chunk] batch indices -> [chunk, per_replica, ...]
      idx = stream_positions(qs, per_replica, num_examples, seed)
      return tf.gather(images_t, idx), tf.gather(labels_t, idx)

    return batches.batch(chunk).map(
        gather, num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True).unbatch().prefetch(tf.data.AUTOTUNE)

  return dataset_fn


def train_input_fn(source: Source, *, global_batch_size: int, seed: int,
                   shuffle_buffer: int, start_step: int = 0):
  """The training dataset function: random access if in memory."""
  if source.train_arrays is not None:
    return stream_input_fn(source.train_arrays,
                           global_batch_size=global_batch_size, seed=seed,
                           start_step=start_step)
  return input_fn(source.train, global_batch_size=global_batch_size,
                  training=True, seed=seed, shuffle_buffer=shuffle_buffer,
                  start_step=start_step)


def check_batch_size(global_batch_size: int, num_parts: int,
                     key: str = "data.global_batch_size",
                     parts: str = "replicas") -> None:
  """Refuses a batch that `num_parts` replicas (or micro-batches) cannot share."""
  if global_batch_size % num_parts:
    raise ConfigError(
        f"{key}={global_batch_size} cannot be shared evenly by "
        f"{num_parts} {parts}; use a multiple of {num_parts}")
