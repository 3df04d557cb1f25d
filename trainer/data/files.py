"""Examples read from files, split across workers by file and seekable.

A task (or a built-in source) returns `Files` from `train_data()` or
`eval_data()`: the files, how to read raw records from one, and how to
decode a raw record into an example. The trainer then owns the pipeline:

  training, input pipeline i of P:
    its own files (every P-th of the sorted list; with fewer files than
    pipelines, every file and every P-th raw record) ->
    epoch e: the files in an order fixed by (seed, e), read interleaved ->
    raw records cut into windows of `window`, each window permuted by
    (seed, e, window index) -> decode -> per-replica batches.

  The stream is a pure function of (seed, P, i): global step k starts at
  raw record k * b * R of pipeline i's stream (b per-replica batch, R local
  replicas), so a resume at step k counts the records of the pipeline's
  files (`record_counts`, or one raw read of them), skips whole epochs
  without reading them and skips at most one epoch of raw records, never
  decoding them: its cost does not grow with k.

  eval: one pass over every file in order, raw records split across
  pipelines before they are decoded, the last batch partial.
"""

import dataclasses
import glob as glob_lib
from typing import Callable, Sequence

import numpy as np
import tensorflow as tf
from absl import logging

from trainer.errors import DataError

INTERLEAVE_CYCLE = 16  # files read at once; fixed: it sets the record order


@dataclasses.dataclass(frozen=True)
class Files:
  """A split of a task's data as files of raw records.

  Attributes:
    paths: file paths or glob patterns (matched and sorted once).
    decode: raw record -> example (x, y) or (x, y, sample_weight); runs in
      tf.data (a tf.function), after the split across workers.
    reader: path (a string tensor) -> tf.data.Dataset of raw records, e.g.
      tf.data.TFRecordDataset; None when each file is one record, its path
      (an image file: `decode` reads it).
    record_counts: raw records per file, in the order of the sorted paths,
      when known (TFDS says); else counted, by one raw read of a pipeline's
      own files, when a run resumes.
  """
  paths: Sequence[str] | str
  decode: Callable
  reader: Callable[[tf.Tensor], tf.data.Dataset] | None = (
      tf.data.TFRecordDataset)
  record_counts: Sequence[int] | None = None

  def matched(self) -> list[str]:
    """The sorted files `paths` names (DataError if there are none)."""
    patterns = [self.paths] if isinstance(self.paths, str) else list(
        self.paths)
    found = []
    for pattern in patterns:
      hits = sorted(glob_lib.glob(str(pattern)))
      if not hits:
        raise DataError(f"no file matches {str(pattern)!r}; check the path "
                        "(a glob such as /data/train-*.tfrecord)")
      found.extend(hits)
    if self.record_counts is not None and len(self.record_counts) != len(
        found):
      raise DataError(f"{len(self.record_counts)} record counts for "
                      f"{len(found)} files")
    return found


def _read(files: Files, paths: tf.Tensor) -> tf.data.Dataset:
  """The raw records of `paths` (a string vector), interleaved in order."""
  names = tf.data.Dataset.from_tensor_slices(paths)
  if files.reader is None:
    return names
  return names.interleave(files.reader, cycle_length=INTERLEAVE_CYCLE,
                          block_length=1, num_parallel_calls=tf.data.AUTOTUNE,
                          deterministic=True)


def _own_files(paths: list[str], num_pipelines: int, index: int
              ) -> tuple[list[int], bool]:
  """Indices of pipeline `index`'s files, and whether its records must
  be split further (fewer files than pipelines: every file, every P-th
  record)."""
  if len(paths) >= num_pipelines:
    return list(range(index, len(paths), num_pipelines)), False
  return list(range(len(paths))), True


def _count_records(files: Files, paths: list[str]) -> list[int]:
  """Raw records per file: from `record_counts`, or one raw read each."""
  if files.reader is None:
    return [1] * len(paths)
  return [int(files.reader(tf.constant(p)).reduce(
      np.int64(0), lambda n, _: n + 1)) for p in paths]


def _windowed_shuffle(raw: tf.data.Dataset, *, window: int, seed: int,
                      epoch: tf.Tensor, first_window: int = 0
                     ) -> tf.data.Dataset:
  """Each run of `window` raw records permuted by (seed, epoch, window
  index): a shuffle whose order is a function of the position."""

  def permute(w, records):
    key = tf.random.experimental.stateless_fold_in(
        tf.stack([tf.constant(seed, tf.int64), tf.cast(epoch, tf.int64)]), w)
    order = tf.random.experimental.stateless_shuffle(
        tf.range(tf.shape(tf.nest.flatten(records)[0])[0]), seed=key)
    return tf.nest.map_structure(lambda t: tf.gather(t, order), records)

  return raw.batch(window).enumerate(start=first_window).map(
      permute, num_parallel_calls=tf.data.AUTOTUNE,
      deterministic=True).unbatch()


def train_fn(files: Files, *, global_batch_size: int, seed: int,
             window: int, start_step: int = 0
            ) -> Callable[[tf.distribute.InputContext], tf.data.Dataset]:
  """The training dataset function for `files` (see the module docstring).

  Returns a function of `tf.distribute.InputContext` giving per-replica
  batches, for `strategy.distribute_datasets_from_function`.
  """
  paths = files.matched()
  if window < 1:
    raise DataError(f"data.shuffle_buffer must be at least 1, got {window}")

  def dataset_fn(ctx: tf.distribute.InputContext) -> tf.data.Dataset:
    per_replica = ctx.get_per_replica_batch_size(global_batch_size)
    pipelines, index = ctx.num_input_pipelines, ctx.input_pipeline_id
    own, split_records = _own_files(paths, pipelines, index)
    if split_records and pipelines > 1:
      logging.warning(
          "%d files for %d input pipelines: every pipeline reads every file "
          "and keeps one raw record in %d (give at least as many files as "
          "workers to split the reading too)", len(paths), pipelines,
          pipelines)
    own_paths = tf.constant([paths[j] for j in own])

    def epoch_records(epoch, skip=0):
      order = tf.random.experimental.stateless_shuffle(
          tf.range(len(own)), seed=tf.stack(
              [tf.constant(seed, tf.int64), tf.cast(epoch, tf.int64)]))
      raw = _read(files, tf.gather(own_paths, order))
      if split_records and pipelines > 1:
        raw = raw.shard(pipelines, index)
      whole_windows, rest = divmod(skip, window)
      raw = _windowed_shuffle(raw.skip(whole_windows * window), window=window,
                              seed=seed, epoch=epoch,
                              first_window=whole_windows)
      return raw.skip(rest)

    per_pipeline_step = per_replica * (ctx.num_replicas_in_sync // pipelines)
    first_epoch, skip = 0, 0
    if start_step:
      counts = (list(files.record_counts) if files.record_counts is not None
                else None)
      per_file = ([counts[j] for j in own] if counts is not None
                  else _count_records(files, [paths[j] for j in own]))
      epoch_size = sum(per_file)
      if split_records and pipelines > 1:
        epoch_size = len(range(index, epoch_size, pipelines))
      if epoch_size < per_replica:
        raise DataError(f"input pipeline {index} has {epoch_size} examples, "
                        f"fewer than a per-replica batch of {per_replica}")
      first_epoch, skip = divmod(start_step * per_pipeline_step, epoch_size)
    first = epoch_records(tf.constant(first_epoch, tf.int64), skip)
    rest = tf.data.Dataset.range(first_epoch + 1, 2**62).flat_map(
        epoch_records)
    return first.concatenate(rest).map(
        files.decode, num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True).batch(per_replica, drop_remainder=True).prefetch(
            tf.data.AUTOTUNE)

  return dataset_fn


def ordered(files: Files, num_pipelines: int = 1, index: int = 0
           ) -> tf.data.Dataset:
  """Every example of `files` once, in file order; with several pipelines
  pipeline `index` keeps every `num_pipelines`-th raw record, before it is
  decoded."""
  raw = _read(files, tf.constant(files.matched()))
  if num_pipelines > 1:
    raw = raw.shard(num_pipelines, index)
  return raw.map(files.decode, num_parallel_calls=tf.data.AUTOTUNE,
                 deterministic=True)


def eval_fn(files: Files, *, global_batch_size: int, take: int | None = None
           ) -> Callable[[tf.distribute.InputContext], tf.data.Dataset]:
  """The eval dataset function: one pass, raw records split across
  pipelines before decoding, the last batch partial; `take` examples per
  pipeline at most (the testing mode)."""
  files.matched()  # bad paths fail here, before training

  def dataset_fn(ctx: tf.distribute.InputContext) -> tf.data.Dataset:
    per_replica = ctx.get_per_replica_batch_size(global_batch_size)
    ds = ordered(files, ctx.num_input_pipelines, ctx.input_pipeline_id)
    if take is not None:
      ds = ds.take(take)
    return ds.batch(per_replica).prefetch(tf.data.AUTOTUNE)

  return dataset_fn
