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

from trainer.data import bad_records
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


def _read(files: Files, paths: tf.Tensor, *, tagged: bool = False
         ) -> tf.data.Dataset:
  """The raw records of `paths` (a string vector), interleaved in order;
  `tagged`: each as (path, index in its file, raw), to name a bad one."""
  names = tf.data.Dataset.from_tensor_slices(paths)
  if files.reader is None:
    return names.map(lambda p: (p, tf.constant(0, tf.int64), p)) if (
        tagged) else names
  reader = files.reader
  if tagged:
    reader = lambda p: files.reader(p).enumerate().map(
        lambda i, raw: (p, i, raw))
  return names.interleave(reader, cycle_length=INTERLEAVE_CYCLE,
                          block_length=1, num_parallel_calls=tf.data.AUTOTUNE,
                          deterministic=True)


def _decode(files: Files, records: tf.data.Dataset,
            skipping: bad_records.Skipping | None, *, training: bool
           ) -> tf.data.Dataset:
  """Examples of `records` (tagged when `skipping`): bad ones end the run,
  or with `skipping` are counted and replaced (training) or dropped."""
  if skipping is None:
    return records.map(files.decode, num_parallel_calls=tf.data.AUTOTUNE,
                       deterministic=True)
  return skipping.decoded(records, lambda raw: files.decode(raw),
                          first_example(files), training=training,
                          indexed=files.reader is not None)


def first_example(files: Files):
  """The first example of `files` in file order (DataError if none
  decodes: the first record is checked before any run)."""
  try:
    return next(iter(ordered(files).take(1)))
  except StopIteration:
    raise DataError(f"{files.matched()[0]}: the files hold no records"
                    ) from None


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


class TrainInput:
  """The training dataset function for `files` (see the module docstring):
  `TrainInput(...)(ctx)` gives input pipeline `ctx.input_pipeline_id`'s
  per-replica batches, for `strategy.distribute_datasets_from_function`.
  `first_bad` names the record that ended a host loop.
  """

  def __init__(self, files: Files, *, global_batch_size: int, seed: int,
               window: int, start_step: int = 0,
               skipping: bad_records.Skipping | None = None):
    self.files, self.paths = files, files.matched()
    if window < 1:
      raise DataError(f"data.shuffle_buffer must be at least 1, got {window}")
    self.global_batch_size, self.seed, self.window = (global_batch_size, seed,
                                                      window)
    self.start_step, self.skipping = start_step, skipping
    self.contexts: list[tf.distribute.InputContext] = []  # seen here

  def __call__(self, ctx: tf.distribute.InputContext) -> tf.data.Dataset:
    self.contexts.append(ctx)
    per_replica = ctx.get_per_replica_batch_size(self.global_batch_size)
    records = self._records(ctx, self.start_step,
                            tagged=self.skipping is not None)
    return _decode(self.files, records, self.skipping, training=True).batch(
        per_replica, drop_remainder=True).prefetch(tf.data.AUTOTUNE)

  def first_bad(self, first_step: int, num_steps: int
               ) -> tuple[str, int, str] | None:
    """The first record of this process's pipelines, at input positions
    (steps) `first_step + 1` to `first_step + num_steps`, that does not
    decode: (path, index in its file or None, why), or None. Decodes those
    records once."""
    for ctx in self.contexts:
      per_replica = ctx.get_per_replica_batch_size(self.global_batch_size)
      records = per_replica * (ctx.num_replicas_in_sync //
                               ctx.num_input_pipelines) * num_steps
      try:
        found = bad_records.first_bad(self._records(
            ctx, first_step, tagged=True).take(records), self.files.decode,
            indexed=self.files.reader is not None)
      except bad_records.Unreadable:
        own, _ = _own_files(self.paths, ctx.num_input_pipelines,
                            ctx.input_pipeline_id)
        found = bad_records.unreadable_file([self.paths[j] for j in own],
                                            self.files.reader)
      if found:
        return found
    return None

  def _records(self, ctx: tf.distribute.InputContext, start_step: int, *,
               tagged: bool) -> tf.data.Dataset:
    """Pipeline `ctx.input_pipeline_id`'s raw records from `start_step` on,
    not decoded (tagged: (path, index in file, raw))."""
    files, paths, window, seed = (self.files, self.paths, self.window,
                                  self.seed)
    per_replica = ctx.get_per_replica_batch_size(self.global_batch_size)
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
      raw = _read(files, tf.gather(own_paths, order), tagged=tagged)
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
    return first.concatenate(rest)


def train_fn(files: Files, *, global_batch_size: int, seed: int,
             window: int, start_step: int = 0,
             skipping: bad_records.Skipping | None = None) -> TrainInput:
  """The training dataset function for `files`: a `TrainInput`."""
  return TrainInput(files, global_batch_size=global_batch_size, seed=seed,
                    window=window, start_step=start_step, skipping=skipping)


def ordered(files: Files, num_pipelines: int = 1, index: int = 0, *,
            skipping: bad_records.Skipping | None = None) -> tf.data.Dataset:
  """Every example of `files` once, in file order; with several pipelines
  pipeline `index` keeps every `num_pipelines`-th raw record, before it is
  decoded; with `skipping`, records that do not decode are dropped."""
  raw = _read(files, tf.constant(files.matched()), tagged=bool(skipping))
  if num_pipelines > 1:
    raw = raw.shard(num_pipelines, index)
  return _decode(files, raw, skipping, training=False)


class EvalInput:
  """The eval dataset function: one pass, raw records split across
  pipelines before decoding, the last batch partial; `take` examples per
  pipeline at most (the testing mode). `first_bad` names a record that
  does not decode."""

  def __init__(self, files: Files, *, global_batch_size: int,
               take: int | None = None,
               skipping: bad_records.Skipping | None = None):
    files.matched()  # bad paths fail here, before training
    self.files, self.global_batch_size, self.take = (files, global_batch_size,
                                                     take)
    self.skipping = skipping
    self.contexts: list[tf.distribute.InputContext] = []

  def __call__(self, ctx: tf.distribute.InputContext) -> tf.data.Dataset:
    self.contexts.append(ctx)
    per_replica = ctx.get_per_replica_batch_size(self.global_batch_size)
    ds = ordered(self.files, ctx.num_input_pipelines, ctx.input_pipeline_id,
                 skipping=self.skipping)
    if self.take is not None:
      ds = ds.take(self.take)
    return ds.batch(per_replica).prefetch(tf.data.AUTOTUNE)

  def first_bad(self) -> tuple[str, int, str] | None:
    """As TrainInput.first_bad, over this process's share of one pass."""
    for ctx in self.contexts[-1:]:
      raw = _read(self.files, tf.constant(self.files.matched()), tagged=True)
      if ctx.num_input_pipelines > 1:
        raw = raw.shard(ctx.num_input_pipelines, ctx.input_pipeline_id)
      if self.take is not None:
        raw = raw.take(self.take)
      try:
        return bad_records.first_bad(raw, self.files.decode,
                                     indexed=self.files.reader is not None)
      except bad_records.Unreadable:
        return bad_records.unreadable_file(self.files.matched(),
                                           self.files.reader)
    return None


def eval_fn(files: Files, *, global_batch_size: int, take: int | None = None,
            skipping: bad_records.Skipping | None = None) -> EvalInput:
  """The eval dataset function for `files`: an `EvalInput`."""
  return EvalInput(files, global_batch_size=global_batch_size, take=take,
                   skipping=skipping)
