"""A task's own tf.data pipeline of training examples (opaque to the trainer).

Each input pipeline (worker) takes its share by file where the pipeline
reads files (`file_shard.shard_by_file`), else by example; then it shuffles
through a buffer, repeats and batches. A resume reads and drops the batches
before it (O(start step)): return `trainer.data.Files` or arrays instead for
a resume without replay.
"""

from typing import Callable

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
    if training:  # each pipeline reads its own files (trainer/data/file_shard.py)
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
