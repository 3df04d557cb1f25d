"""A task's own tf.data pipeline of training examples (opaque to the trainer).

Each input pipeline (worker) takes its share by file where the pipeline
reads files (`file_shard.shard_by_file`), else by example; then it runs
through the share epoch after epoch, each epoch shuffled through a buffer
with a seed of its own, (seed, epoch), and batches. So the stream is the
same whichever epoch it starts at, and a resume at global step k starts at
the epoch that holds this pipeline's position (k x its examples per step)
and reads and drops only the examples of that epoch before it: at most one
epoch of its share, however late the step (a `Dataset.repeat()` would
replay every step since 0; a checkpointed iterator would save the shuffle
buffer, 1.5 GB of decoded ImageNet images per worker, and fails on a
`tf.py_function`, DESIGN.md fact 24).

Finding the epoch needs the share's size: its cardinality where tf.data
knows it, else a count of the records below the task's one-to-one maps
(`_raw`): the raw records, read without running the parse and decode maps,
up to the position (measured in tests/test_data_pipeline_resume.py).
"""

from typing import Callable

import numpy as np
import tensorflow as tf
from absl import logging

from trainer import compat
from trainer.data import file_shard
from trainer.errors import DataError

# tf.data's classes for `batch`, `batch(num_parallel_calls=)`, `rebatch`
# (unbatched again exactly) and for batches that pad or turn ragged (not).
_BATCHES = {"_BatchDataset": "batch", "_ParallelBatchDataset": "batch",
            "_RebatchDataset": "rebatch"}
_PADDED = {"_PaddedBatchDataset": "padded_batch",
           "_DenseToRaggedDataset": "ragged_batch"}


def _batching(dataset: tf.data.Dataset) -> str | None:
  """The batching transformation (`batch`, `padded_batch`...) that the
  elements of `dataset` come from, or None when they are examples (never
  batched, or unbatched after it)."""
  found, todo = None, [dataset]
  while todo:
    node = todo.pop()
    name = type(node).__name__
    if name == "_UnbatchDataset":
      continue  # whatever was batched below was unbatched again
    if name in _PADDED:
      return _PADDED[name]
    found = found or _BATCHES.get(name)
    todo.extend(compat.dataset_inputs(node))
  return found


def unbatched(dataset: tf.data.Dataset, what: str) -> tf.data.Dataset:
  """`dataset` as examples: the Keras habit `...shuffle(n).batch(32)` is
  unbatched (the trainer batches by `data.global_batch_size`), and logged.

  Raises:
    DataError: it is batched with padding or ragged rows, which unbatching
      cannot undo into examples of one shape.
  """
  how = _batching(dataset)
  if how is None:
    return dataset
  if how in _PADDED.values():
    raise DataError(f"{what} a Dataset made by {how}(); return unbatched "
                    "examples (the trainer batches them by "
                    "data.global_batch_size): pad or cut them to one shape "
                    "in your map, or pad inside the model")
  logging.warning("%s a batched Dataset (%s()); the trainer unbatches it and "
                  "batches by data.global_batch_size instead: return "
                  "examples to skip the extra work", what, how)
  return dataset.unbatch()


# tf.data classes that give one element for each element of their input: the
# records below them count the examples above.
_ONE_TO_ONE = frozenset(("_MapDataset", "_ParallelMapDataset",
                         "_PrefetchDataset", "_OptionsDataset",
                         "CacheDataset", "_AssertCardinalityDataset"))


def _raw(examples: tf.data.Dataset) -> tf.data.Dataset:
  """The dataset below `examples`' one-to-one transformations (the task's
  parse and decode maps): as many elements, without decoding them."""
  node = examples
  while type(node).__name__ in _ONE_TO_ONE:
    inputs = compat.dataset_inputs(node)
    if len(inputs) != 1:
      break
    node = inputs[0]
  return node


def share_size(examples: tf.data.Dataset, num_shards: int, index: int, *,
               at_least: int) -> tuple[int | None, str]:
  """The number of examples in pipeline `index`'s share of `examples`, or
  any number above `at_least` when it holds more (None: it never ends),
  and how it was found (for the log)."""
  share = file_shard.shard_by_file(examples, num_shards, index, quiet=True)
  known = int(share.cardinality())
  if known == tf.data.INFINITE_CARDINALITY:
    return None, "tf.data says it never ends"
  if known >= 0:
    return known, "its cardinality"
  raw = _raw(examples)
  how = ("counted from its raw records, without decoding" if raw is not
         examples else "counted by running the pipeline")
  raw = file_shard.shard_by_file(raw, num_shards, index, quiet=True)
  count = raw.take(at_least + 1).reduce(np.int64(0), lambda n, _: n + 1)
  return int(count), how


def epoch_seed(seed: int, epoch: tf.Tensor) -> tf.Tensor:
  """The shuffle seed of `epoch` (int64): one per (seed, epoch)."""
  return (tf.constant(seed, tf.int64) * 1_000_003 + epoch) % (2 ** 62)


def _epochs(share: tf.data.Dataset, *, seed: int, shuffle_buffer: int,
            first_epoch: int) -> tf.data.Dataset:
  """The share's epochs from `first_epoch` on, each shuffled by its own
  `epoch_seed`: the same examples in the same order whichever epoch a run
  starts at."""

  def epoch(number):
    # The function's own graph-level seed, whatever the process's: TF 2.21's
    # seed logic fails on a tensor op seed under a global seed of 0.
    tf.random.set_seed(1)
    return share.shuffle(shuffle_buffer, seed=epoch_seed(seed, number),
                         reshuffle_each_iteration=False)

  return tf.data.Dataset.range(first_epoch, tf.int64.max).flat_map(epoch)


def _start(examples, ctx: tf.distribute.InputContext, position: int,
           step: int) -> tuple[int, int]:
  """(epoch, examples to drop in it) where this pipeline's share resumes:
  after `position` examples of its stream (at global step `step`)."""
  size, how = share_size(examples, ctx.num_input_pipelines,
                         ctx.input_pipeline_id, at_least=position)
  if size == 0:
    raise DataError(f"input pipeline {ctx.input_pipeline_id} of "
                    f"{ctx.num_input_pipelines} has no training example: "
                    "train_data() is empty, or too small to split")
  epoch, skip = (0, position) if size is None or size > position else divmod(
      position, size)
  if size is None:
    logging.warning(
        "resuming a tf.data training set that never ends at step %d: "
        "input pipeline %d reads and drops the %d examples before it (end "
        "train_data() with one pass over the data, without repeat(), for a "
        "resume that reads at most one epoch)", step, ctx.input_pipeline_id,
        position)
  elif size > position:
    logging.info("resuming the tf.data training set at step %d: input "
                 "pipeline %d is in its first epoch and reads and drops the "
                 "%d examples before it", step, ctx.input_pipeline_id, skip)
  else:
    logging.info(
        "resuming the tf.data training set at step %d: input pipeline %d "
        "starts epoch %d of its %d examples (%s) at example %d (reading and "
        "dropping those, not the %d of the steps before)", step,
        ctx.input_pipeline_id, epoch, size, how, skip, position)
  return epoch, skip


def input_fn(examples: tf.data.Dataset, *, global_batch_size: int,
             training: bool, seed: int = 0, shuffle_buffer: int = 10_000,
             start_step: int = 0
            ) -> Callable[[tf.distribute.InputContext], tf.data.Dataset]:
  """A dataset function for `strategy.distribute_datasets_from_function`.

  Training: each input pipeline (worker) takes its own share of the
  examples, by file where it can (`file_shard.shard_by_file`), runs
  through it epoch after epoch, each shuffled by (`seed`, epoch), and cuts
  full per-replica batches; at `start_step` it starts in the epoch of its
  position and drops the examples of that epoch before it (at most one
  epoch; in-memory sources use `stream_input_fn`). In one process the k-th global batch is the same
  examples for any number of replicas; with P workers it is made of the P
  workers' own batches, so it differs from one process's.
  Eval: one pass in order, the last batch partial, so every example is seen
  exactly once.
  """

  def dataset_fn(ctx: tf.distribute.InputContext) -> tf.data.Dataset:
    per_replica = ctx.get_per_replica_batch_size(global_batch_size)
    if not training:
      ds = examples.batch(per_replica)
      if ctx.num_input_pipelines > 1:
        ds = ds.shard(ctx.num_input_pipelines, ctx.input_pipeline_id)
      return ds.prefetch(tf.data.AUTOTUNE)
    first_epoch, skip = 0, 0
    if start_step:  # this pipeline's examples so far
      position = start_step * per_replica * (
          ctx.num_replicas_in_sync // ctx.num_input_pipelines)
      first_epoch, skip = _start(examples, ctx, position, start_step)
    # each pipeline reads its own files (trainer/data/file_shard.py)
    share = file_shard.shard_by_file(examples, ctx.num_input_pipelines,
                                     ctx.input_pipeline_id)
    ds = _epochs(share, seed=seed, shuffle_buffer=shuffle_buffer,
                 first_epoch=first_epoch).skip(skip)
    return ds.batch(per_replica, drop_remainder=True).prefetch(
        tf.data.AUTOTUNE)

  return dataset_fn
