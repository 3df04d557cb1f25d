"""Datasets by name, served per replica through `InputContext`.

Sources (`data.name`):
  digits     the 8x8 handwritten digits that ship inside scikit-learn (offline;
             1797 images, a fixed split of 1497 train / 300 eval);
  synthetic  random images and labels of `data.synthetic_shape`, held in memory;
  <tfds>     any TFDS image-classification dataset already in `data.data_dir`
             (never downloads: no network is assumed).

Every source yields unbatched `(image float32 [H, W, C] in [0, 1], label int32)`.
`input_fn` turns one into a function of `tf.distribute.InputContext` for
`strategy.distribute_datasets_from_function`: training data is split across
input pipelines (workers) by file before anything decodes it, then shuffled
and cut into per-replica batches; eval batches are split across pipelines.
"""

import dataclasses
from typing import Callable

import ml_collections
import numpy as np
import tensorflow as tf
from absl import logging

from trainer import file_shard
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
  # fits: then the training stream is addressed by step and a resume
  # starts at its position without replaying the batches before it.
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
  if cfg.in_memory:  # one ordered pass, then gathers from memory
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

  Training: each input pipeline (worker) takes its own share of the
  examples, by file where it can (`file_shard.shard_by_file`), then
  shuffles it with `seed` (reshuffled each epoch), repeats, and cuts full
  per-replica batches; `start_step` skips the batches of the steps already
  taken (reading them: O(start_step); in-memory sources use
  `stream_input_fn`). In one process the k-th global batch is the same
  examples for any number of replicas; with P workers it is made of the P
  workers' own batches, so it differs from one process's.
  Eval: one pass in order, the last batch partial, so every example is seen
  exactly once.
  """

  def dataset_fn(ctx: tf.distribute.InputContext) -> tf.data.Dataset:
    per_replica = ctx.get_per_replica_batch_size(global_batch_size)
    ds = examples
    if training:  # each pipeline reads its own files (trainer/file_shard.py)
      ds = file_shard.shard_by_file(ds, ctx.num_input_pipelines,
                                    ctx.input_pipeline_id)
      ds = ds.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
      ds = ds.repeat()
    ds = ds.batch(per_replica, drop_remainder=training)
    if ctx.num_input_pipelines > 1 and not training:
      ds = ds.shard(ctx.num_input_pipelines, ctx.input_pipeline_id)
    if start_step:
      ds = ds.skip(start_step * ctx.num_replicas_in_sync //
                   ctx.num_input_pipelines)
    return ds.prefetch(tf.data.AUTOTUNE)

  return dataset_fn


def epoch_permutation(epoch: tf.Tensor, num_examples: int,
                      seed: int) -> tf.Tensor:
  """The order of epoch `epoch` of the training stream: int64 [N], a
  permutation of range(N) fixed by (seed, epoch). O(N) work per epoch."""
  return tf.random.experimental.stateless_shuffle(
      tf.range(num_examples, dtype=tf.int64),
      seed=tf.stack([tf.constant(seed, tf.int64),
                     tf.cast(epoch, tf.int64)]))


# Batches gathered per tf.data call (tf.data's per-call cost is about that
# of one small train step), capped at this many bytes of examples.
CHUNK_BATCHES, CHUNK_BYTES = 16, 4 << 20


def stream_input_fn(arrays, *, global_batch_size: int, seed: int,
                    start_step: int = 0
                   ) -> Callable[[tf.distribute.InputContext],
                                 tf.data.Dataset]:
  """The training dataset function for a source held in memory.

  `arrays` is a nest of numpy arrays with one row per example, e.g.
  (images [N, H, W, C], labels [N]) or ({"ids": [N, T]}, y [N], w [N]).
  The stream is epoch after epoch of the N examples, epoch e in the order
  `epoch_permutation(e)`; global step k reads stream positions
  [k * B, (k + 1) * B) and per-replica batch q positions [q * b, (q + 1) * b).
  Batch q goes to input pipeline q mod P, whose replicas take its batches in
  turn: the same global batches for any number of replicas or workers.
  Starting at `start_step` costs one permutation, not a replay of the steps
  before it (DESIGN.md fact 8).

  Per epoch: one O(N) permutation of indices; per chunk of up to 16 batches:
  one gather from the arrays.
  """
  flat = tf.nest.flatten(arrays)
  num_examples = len(flat[0])

  def dataset_fn(ctx: tf.distribute.InputContext) -> tf.data.Dataset:
    per_replica = ctx.get_per_replica_batch_size(global_batch_size)
    if per_replica > num_examples:
      raise DataError(f"a per-replica batch of {per_replica} is larger than "
                      f"the {num_examples} training examples")
    tensors = tf.nest.map_structure(tf.constant, arrays)
    first_epoch, skip = divmod(
        start_step * ctx.num_replicas_in_sync * per_replica, num_examples)

    def epoch_order(epoch):  # the first epoch starts at the resumed position
      order = epoch_permutation(epoch, num_examples, seed)
      return order[tf.where(epoch == first_epoch, skip, 0):]

    indices = tf.data.Dataset.range(first_epoch, 2**62).map(
        epoch_order).rebatch(per_replica, drop_remainder=True)
    if ctx.num_input_pipelines > 1:
      indices = indices.shard(ctx.num_input_pipelines, ctx.input_pipeline_id)
    batch_bytes = per_replica * max(1, sum(a[0].nbytes for a in flat))
    chunk = max(1, min(CHUNK_BATCHES, CHUNK_BYTES // batch_bytes))
    gather = lambda idx: tf.nest.map_structure(
        lambda t: tf.gather(t, idx), tensors)
    return indices.batch(chunk).map(
        gather, num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True).unbatch().prefetch(tf.data.AUTOTUNE)

  return dataset_fn


def train_input_fn(train, *, global_batch_size: int, seed: int,
                   shuffle_buffer: int, start_step: int = 0):
  """The training dataset function for `train` (a trainer.task.Examples):
  addressed by step if it is in memory (`train.arrays`), else shuffled
  through a buffer, skipping the batches of the steps already taken."""
  if train.arrays is not None:
    return stream_input_fn(train.arrays, global_batch_size=global_batch_size,
                           seed=seed, start_step=start_step)
  if start_step:
    logging.info("resuming a tf.data training set at step %d: reading and "
                 "dropping the %d global batches before it (give arrays for "
                 "a resume without replay)", start_step, start_step)
  return input_fn(train.dataset, global_batch_size=global_batch_size,
                  training=True, seed=seed, shuffle_buffer=shuffle_buffer,
                  start_step=start_step)


def check_train_batch(train, per_replica_batch: int) -> None:
  """Refuses a per-replica batch larger than an in-memory training set
  (`train`: a trainer.task.Examples; the step-addressed stream cuts each
  epoch into batches)."""
  if train.arrays is not None and per_replica_batch > train.size:
    raise DataError(f"a per-replica batch of {per_replica_batch} is larger "
                    f"than the {train.size} training examples; lower "
                    "data.global_batch_size")


def check_batch_size(global_batch_size: int, num_parts: int,
                     key: str = "data.global_batch_size",
                     parts: str = "replicas") -> None:
  """Refuses a batch that `num_parts` replicas (or micro-batches) cannot share."""
  if global_batch_size % num_parts:
    raise ConfigError(
        f"{key}={global_batch_size} cannot be shared evenly by "
        f"{num_parts} {parts}; use a multiple of {num_parts}")
