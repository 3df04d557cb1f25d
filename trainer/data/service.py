"""Training input decoded on tf.data service workers (`data.service`).

The training pipeline is built here, serialized and sent to the service's
dispatcher; its workers (other machines' CPUs) read and decode, and every
training worker consumes per-replica batches from one shared job:

  files (`trainer.data.Files`, the built-in on-disk sources): the sorted
    files in an order fixed by (seed, resume step) -> read interleaved ->
    raw records shuffled through `data.shuffle_buffer` -> repeat -> decode
    -> per-replica batches.
  a task's own tf.data pipeline: shuffled through `data.shuffle_buffer` ->
    repeat -> per-replica batches.

Sharding is `ShardingPolicy.DYNAMIC`: the dispatcher hands each service
worker the next file (or element) of the pipeline's one source, so every
record is decoded once per epoch over all service workers, and training
workers take batches first come, first served. What it gives up: batch
order and exact resume (a resume starts a new job, with files in a new
order, mid-epoch position lost); `train.deterministic=True` is refused.
Evaluation is not sent: it stays on the training hosts (each worker must
get its share of a finite pass, fact 11 in DESIGN.md).
"""

import hashlib
import socket
import urllib.parse
from typing import Callable

import numpy as np
import tensorflow as tf
from absl import logging
from tensorflow.core.framework import graph_pb2

from trainer import compat
from trainer.data.files import INTERLEAVE_CYCLE, Files
from trainer.errors import ConfigError, DataError

# Ops that call back into the Python process that built the pipeline: a
# service worker has no such callback ("Could not find callback").
PYTHON_OPS = ("PyFunc", "EagerPyFunc", "PyFuncStateless")


def dispatcher_target(address: str, timeout: float = 5.0) -> str:
  """`grpc://host:port` for `address` (`host:port` or `grpc://host:port`),
  once a dispatcher answers on it.

  Raises:
    ConfigError: a malformed address, or nothing listening there.
  """
  target = address if "://" in address else f"grpc://{address}"
  parsed = urllib.parse.urlsplit(target)
  try:
    port = parsed.port
  except ValueError:
    port = None
  if parsed.scheme != "grpc" or not parsed.hostname or port is None:
    raise ConfigError(
        f"data.service={address!r} is not a dispatcher address; give "
        "host:port or grpc://host:port")
  try:
    socket.create_connection((parsed.hostname, port), timeout=timeout).close()
  except OSError as e:
    raise ConfigError(
        f"data.service: no tf.data service dispatcher answers at "
        f"{parsed.hostname}:{port} ({e.strerror or e}); start one (python -m "
        "launch.data_service --role=dispatcher, BUILD.md) or fix the "
        "address") from None
  return f"grpc://{parsed.hostname}:{port}"


def job_name(run_id: str, start_step: int) -> str:
  """The job every training worker of one run shares, resumed at
  `start_step` (a resume starts a new job)."""
  digest = hashlib.sha1(run_id.encode()).hexdigest()[:12]
  return f"trainer-{digest}-step{start_step}"


def _graph(ds: tf.data.Dataset) -> graph_pb2.GraphDef:
  graph = graph_pb2.GraphDef()
  graph.ParseFromString(compat.serialized_graph(ds))
  return graph


def check_portable(ds: tf.data.Dataset) -> None:
  """Refuses a pipeline a service worker cannot run as it runs here.

  Raises:
    DataError: it calls Python (`tf.py_function`, `tf.numpy_function`,
      `from_generator`), or it reads from more than one source dataset
      (a zip or concatenate: DYNAMIC sharding splits each source on its own,
      so zipped elements would no longer pair up).
  """
  graph = _graph(ds)
  ops = {n.op for n in graph.node} | {
      n.op for f in graph.library.function for n in f.node_def}
  python = sorted(ops.intersection(PYTHON_OPS))
  if python:
    raise DataError(
        f"data.service: the training pipeline calls Python ({python[0]}: "
        "tf.py_function, tf.numpy_function or Dataset.from_generator), "
        "which runs only in the process that built it, not on a service "
        "worker; write that step in TensorFlow ops or leave data.service "
        "empty")
  nodes = {n.name: n for n in graph.node}

  def is_dataset(name: str) -> bool:
    node = nodes.get(name.lstrip("^").split(":")[0])
    return node is not None and "Dataset" in node.op

  sources = [n.op for n in graph.node
             if "Dataset" in n.op and not any(map(is_dataset, n.input))]
  if len(sources) > 1:
    raise DataError(
        f"data.service: the training pipeline reads {len(sources)} source "
        f"datasets ({', '.join(sources)}: a zip or concatenate); the "
        "service splits each source on its own, so their elements would "
        "not pair up; build it from one source (e.g. one from_tensor_slices "
        "of tuples) or return trainer.data.Files from train_data()")


def _files_pipeline(files: Files, *, seed: int, start_step: int,
                    window: int) -> tf.data.Dataset:
  """Decoded examples of `files`, one source: its file list."""
  paths = files.matched()
  order = np.random.default_rng([seed, start_step]).permutation(len(paths))
  ds = tf.data.Dataset.from_tensor_slices([paths[i] for i in order])
  if files.reader is not None:
    ds = ds.interleave(files.reader,
                       cycle_length=min(INTERLEAVE_CYCLE, len(paths)),
                       num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.shuffle(window, seed=seed).repeat()
  return ds.map(files.decode, num_parallel_calls=tf.data.AUTOTUNE)


def _examples(train, *, seed: int, start_step: int, window: int
             ) -> tf.data.Dataset:
  """The examples the service decodes, unbatched, repeated."""
  if train.files is not None:
    return _files_pipeline(train.files, seed=seed, start_step=start_step,
                           window=window)
  return train.dataset.shuffle(window, seed=seed + start_step).repeat()


def check(train, service: str, *, window: int) -> str:
  """The dispatcher's target, once `train` (a trainer.task.Examples) is
  known to run on the service at `service`; called before training.

  Raises:
    ConfigError: no dispatcher at `service`.
    DataError: the data are in memory (nothing to decode), or the pipeline
      cannot run on a service worker (`check_portable`).
  """
  if train.arrays is not None:
    raise DataError(
        "data.service: the training data are arrays in memory, with nothing "
        "to decode on service workers; leave data.service empty, or return "
        "trainer.data.Files (or a tf.data pipeline over files) from "
        "train_data()")
  if window < 1:
    raise DataError(f"data.shuffle_buffer must be at least 1, got {window}")
  target = dispatcher_target(service)
  check_portable(_examples(train, seed=0, start_step=0, window=window))
  return target


def train_fn(train, *, service: str, run_id: str, global_batch_size: int,
             seed: int, window: int, start_step: int = 0
            ) -> Callable[[tf.distribute.InputContext], tf.data.Dataset]:
  """The training dataset function with decoding on the tf.data service at
  `service` (`train`: a trainer.task.Examples of files or a pipeline); one
  job per (`run_id`, `start_step`), shared by every training worker.

  Raises:
    ConfigError, DataError: as `check`.
  """
  target = check(train, service, window=window)
  name = job_name(run_id, start_step)
  if start_step:
    logging.warning(
        "data.service: resuming at step %d with a new service job (%s): the "
        "input starts over in a new order; the weights and the step are "
        "restored exactly", start_step, name)

  def dataset_fn(ctx: tf.distribute.InputContext) -> tf.data.Dataset:
    per_replica = ctx.get_per_replica_batch_size(global_batch_size)
    ds = _examples(train, seed=seed, start_step=start_step, window=window)
    ds = ds.batch(per_replica, drop_remainder=True).apply(
        tf.data.experimental.service.distribute(
            processing_mode=(
                tf.data.experimental.service.ShardingPolicy.DYNAMIC),
            service=target, job_name=name))
    return ds.prefetch(tf.data.AUTOTUNE)

  return dataset_fn
