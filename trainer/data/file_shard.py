"""Each input pipeline (worker) reads its own share of an on-disk dataset.

A task's `tf.data` pipeline over files (`TFRecordDataset`, an `interleave`
over a file list, a TFDS split read from `data.data_dir`) is split by file
with TensorFlow's own auto-shard rewrite (`AutoShardPolicy.FILE`, the one
`experimental_distribute_dataset` uses): worker i of P reads files i, i + P,
... and decodes only their records. The rewrite gives a worker with no file
an empty dataset without a word, and refuses a pipeline that reads no files,
so `shard_by_file` first checks that every worker's share holds an example;
when one does not (fewer files than workers, or no files at all) it falls
back to keeping every P-th example of the whole pipeline: each worker then
runs the pipeline's maps on every example (today's cost), which it logs.
"""

import tensorflow as tf
from absl import logging

from trainer import compat

FILE = tf.data.experimental.AutoShardPolicy.FILE


def _file_share(examples: tf.data.Dataset, num_shards: int,
                index: int) -> tf.data.Dataset:
  options = tf.data.Options()
  options.experimental_distribute.auto_shard_policy = FILE
  return compat.shard_by_file(examples.with_options(options), num_shards,
                              index)


def every_share_has_files(examples: tf.data.Dataset, num_shards: int) -> bool:
  """True when the FILE rewrite gives each of `num_shards` pipelines at
  least one example (reads the first example of each share)."""
  try:
    for index in range(num_shards):
      for _ in _file_share(examples, num_shards, index).take(1):
        break
      else:
        return False
  except (tf.errors.NotFoundError, tf.errors.InvalidArgumentError):
    return False  # "Found an unshardable source dataset": no file reader
  return True


def shard_by_file(examples: tf.data.Dataset, num_shards: int,
                  index: int, *, quiet: bool = False) -> tf.data.Dataset:
  """Input pipeline `index`'s share of unbatched `examples` (of
  `num_shards` pipelines): its files when every share has some, else every
  `num_shards`-th example (logged unless `quiet`). One pipeline: `examples`
  unchanged."""
  if num_shards == 1:
    return examples
  if every_share_has_files(examples, num_shards):
    if not quiet:
      logging.info("input pipeline %d of %d reads its own files (sharded "
                   "by file)", index, num_shards)
    return _file_share(examples, num_shards, index)
  if not quiet:
    logging.warning(
        "the training data cannot be split by file across %d input "
        "pipelines (it reads no files, or fewer files than pipelines): each "
        "worker runs the whole pipeline and keeps one example in %d; write "
        "at least %d files for each worker to read only its own", num_shards,
        num_shards, num_shards)
  options = tf.data.Options()
  options.experimental_distribute.auto_shard_policy = (
      tf.data.experimental.AutoShardPolicy.OFF)
  return examples.shard(num_shards, index).with_options(options)
