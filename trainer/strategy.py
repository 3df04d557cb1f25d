"""Builds the tf.distribute strategy named by `distribution.strategy`.

`configure_cpu_devices(n)` must run before TensorFlow initialises its devices
(before any op runs); it splits the host CPU into n logical devices so that
MirroredStrategy can be exercised without GPUs.
"""

import json
import os

import tensorflow as tf
from absl import logging

from trainer.errors import ConfigError


def configure_cpu_devices(num_devices: int) -> None:
  """Splits the first physical CPU into `num_devices` logical devices.

  Idempotent: a second call asking for the count already configured is a
  no-op; asking for a different count after initialisation is an error.
  """
  cpu = tf.config.list_physical_devices("CPU")[0]
  current = tf.config.get_logical_device_configuration(cpu)
  if num_devices <= 1 and not current:
    return
  if current is not None and len(current) == num_devices:
    return
  try:
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * num_devices)
  except RuntimeError as e:
    raise ConfigError(
        f"distribution.num_cpu_devices={num_devices} must be set before "
        "TensorFlow initialises its devices; call configure_cpu_devices() "
        f"first thing in the process ({e})") from None


def _cpu_names() -> list[str]:
  return [d.name for d in tf.config.list_logical_devices("CPU")]


def _gpu_names() -> list[str]:
  return [d.name for d in tf.config.list_logical_devices("GPU")]


def _check_tf_config() -> None:
  raw = os.environ.get("TF_CONFIG", "")
  if not raw:
    raise ConfigError(
        "distribution.strategy=multi_worker needs a cluster: set TF_CONFIG "
        "describing every worker (BUILD.md, multi-worker), or try it on this "
        "machine with `python -m launch.local --num_workers=N -- ...`")
  try:
    spec = json.loads(raw)
    workers = spec["cluster"]["worker"]
    task = spec["task"]
    index = int(task["index"])
  except (ValueError, KeyError, TypeError) as e:
    raise ConfigError(
        f"TF_CONFIG is malformed ({type(e).__name__}: {e}); expected "
        '{"cluster": {"worker": ["host:port", ...]}, '
        '"task": {"type": "worker", "index": i}}') from None
  if task.get("type") not in ("worker", "chief"):
    raise ConfigError(f"TF_CONFIG task type {task.get('type')!r} is not "
                      "'worker' or 'chief'")
  if task.get("type") == "worker" and not 0 <= index < len(workers):
    raise ConfigError(f"TF_CONFIG task index {index} is out of range for "
                      f"{len(workers)} workers")


def build_strategy(name: str = "auto",
                   num_cpu_devices: int = 1) -> tf.distribute.Strategy:
  """Returns the strategy for `name`.

  Args:
    name: `auto` (MirroredStrategy over several GPUs, or over several logical
      CPUs when `num_cpu_devices > 1`; otherwise one device), `mirrored`,
      `one_device` or `multi_worker` (cluster from TF_CONFIG).
    num_cpu_devices: logical CPU devices to create when there is no GPU.
  """
  if num_cpu_devices > 1:
    configure_cpu_devices(num_cpu_devices)
  if name == "multi_worker":  # before anything initialises the TF context
    _check_tf_config()
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    logging.info("strategy MultiWorkerMirroredStrategy: %d replica(s), "
                 "cluster %s, this task %s %s", strategy.num_replicas_in_sync,
                 strategy.cluster_resolver.cluster_spec().as_dict(),
                 strategy.cluster_resolver.task_type,
                 strategy.cluster_resolver.task_id)
    return strategy
  gpus, cpus = _gpu_names(), _cpu_names()
  if name == "one_device":
    strategy = tf.distribute.OneDeviceStrategy((gpus or cpus)[0])
  elif name == "mirrored" or (name == "auto" and
                              (len(gpus) > 1 or
                               (not gpus and num_cpu_devices > 1))):
    devices = gpus or cpus[:max(num_cpu_devices, 1)]
    strategy = tf.distribute.MirroredStrategy(
        devices,
        cross_device_ops=None if gpus else
        tf.distribute.ReductionToOneDevice())
  elif name == "auto":
    strategy = tf.distribute.OneDeviceStrategy((gpus or cpus)[0])
  else:
    raise ConfigError(f"unknown distribution.strategy {name!r}; use one of: "
                      "auto, mirrored, one_device, multi_worker")
  logging.info("strategy %s with %d replica(s)", type(strategy).__name__,
               strategy.num_replicas_in_sync)
  return strategy


def is_chief(strategy: tf.distribute.Strategy) -> bool:
  """True on the one worker that writes files (always True on one host)."""
  resolver = getattr(strategy, "cluster_resolver", None)
  if resolver is None or not resolver.cluster_spec().as_dict():
    return True
  task_type, task_id = resolver.task_type, resolver.task_id
  if task_type == "chief":
    return True
  has_chief = "chief" in resolver.cluster_spec().as_dict()
  return task_type == "worker" and task_id == 0 and not has_chief


def num_workers(strategy: tf.distribute.Strategy) -> int:
  """Processes taking part in the run (1 unless multi-worker)."""
  resolver = getattr(strategy, "cluster_resolver", None)
  spec = resolver.cluster_spec().as_dict() if resolver else {}
  return max(1, len(spec.get("worker", [])) + len(spec.get("chief", [])))
