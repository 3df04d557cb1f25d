"""The data path: where each kind of source goes, as dataset functions.

One module per path, so a reader sees which one a source takes:
  sources     the built-in datasets by `data.name` (digits, synthetic,
              image_folder, tfrecord, TFDS)
  stream      examples in memory: a stream addressed by step (exact resume)
  files       examples in files (`Files`): each worker reads its own files,
              a resume seeks without decoding what it skips
  pipeline    a task's own tf.data pipeline: split by file or example,
              epochs shuffled by (seed, epoch), a resume reads at most the
              epoch it starts in
  service     the tf.data service: decoding on other machines
  bad_records a record that does not decode, met mid-run: its file named,
              or (data.skip_bad_records) skipped and counted

Every dataset function takes a `tf.distribute.InputContext` and returns
per-replica batches, for `strategy.distribute_datasets_from_function`.
"""


from trainer.data import files as files_lib
from trainer.data import service as service_lib
from trainer.data.files import Files
from trainer.data.pipeline import input_fn
from trainer.data.service import check as check_service
from trainer.data.sources import DataInfo, Source, load_digits, load_source
from trainer.data.stream import (CHUNK_BATCHES, CHUNK_BYTES, epoch_permutation,
                                 stream_input_fn)
from trainer.errors import ConfigError, DataError

__all__ = ["CHUNK_BATCHES", "CHUNK_BYTES", "DataInfo", "Files", "Source",
           "check_batch_size", "check_service", "check_skipping", "check_train_batch",
           "epoch_permutation", "eval_input_fn", "input_fn", "load_digits",
           "load_source", "stream_input_fn", "train_input_fn"]


def train_input_fn(train, *, global_batch_size: int, seed: int,
                   shuffle_buffer: int, start_step: int = 0,
                   service: str = "", run_id: str = "", skipping=None):
  """The training dataset function for `train` (a trainer.task.Examples):
  decoded on the tf.data service at `service` if given (one job per
  `run_id` and start step), else addressed by step if it is in memory
  (`train.arrays`), seekable if it is files (`train.files`), else a task's
  pipeline shuffled through a buffer epoch by epoch, a resume reading at
  most the epoch it starts in. `skipping` (a bad_records.Skipping) applies to files."""
  if service:
    return service_lib.train_fn(train, service=service, run_id=run_id,
                                global_batch_size=global_batch_size,
                                seed=seed, window=shuffle_buffer,
                                start_step=start_step)
  if train.arrays is not None:
    return stream_input_fn(train.arrays, global_batch_size=global_batch_size,
                           seed=seed, start_step=start_step)
  if train.files is not None:
    return files_lib.train_fn(train.files, global_batch_size=global_batch_size,
                              seed=seed, window=shuffle_buffer,
                              start_step=start_step, skipping=skipping)
  return input_fn(train.dataset, global_batch_size=global_batch_size,
                  training=True, seed=seed, shuffle_buffer=shuffle_buffer,
                  start_step=start_step)


def eval_input_fn(evals, *, global_batch_size: int, take: int | None = None,
                  skipping=None):
  """The eval dataset function for `evals` (a trainer.task.Examples): one
  pass, every example once, the last batch partial; at most `take`
  examples (the testing mode)."""
  if evals.files is not None:
    return files_lib.eval_fn(evals.files, global_batch_size=global_batch_size,
                             take=take, skipping=skipping)
  examples = evals.dataset if take is None else evals.dataset.take(take)
  return input_fn(examples, global_batch_size=global_batch_size,
                  training=False)


def check_train_batch(train, per_replica_batch: int) -> None:
  """Refuses a per-replica batch larger than an in-memory training set
  (`train`: a trainer.task.Examples; the step-addressed stream cuts each
  epoch into batches)."""
  if train.arrays is not None and per_replica_batch > train.size:
    raise DataError(f"a per-replica batch of {per_replica_batch} is larger "
                    f"than the {train.size} training examples; lower "
                    "data.global_batch_size")


def check_skipping(train, evals, limit: int, service: str) -> None:
  """Refuses `data.skip_bad_records` where records are not decoded by the
  trainer (trainer.task.Examples `train`, `evals` or None)."""
  if limit <= 0:
    return
  if service:
    raise ConfigError("data.skip_bad_records does not work with data.service"
                      " (the service's workers decode the records); set one "
                      "of them")
  for examples, method in ((train, "train_data"), (evals, "eval_data")):
    if examples is not None and examples.dataset is not None and (
        examples.files is None and examples.arrays is None):
      raise ConfigError(
          f"data.skip_bad_records needs {method}() as trainer.data.Files "
          "(the trainer decodes those record by record); a tf.data pipeline "
          "of your own decodes on its own: end its map with "
          ".ignore_errors() instead")


def check_batch_size(global_batch_size: int, num_parts: int,
                     key: str = "data.global_batch_size",
                     parts: str = "replicas") -> None:
  """Refuses a batch that `num_parts` replicas (or micro-batches) cannot share."""
  if global_batch_size % num_parts:
    raise ConfigError(
        f"{key}={global_batch_size} cannot be shared evenly by "
        f"{num_parts} {parts}; use a multiple of {num_parts}")
