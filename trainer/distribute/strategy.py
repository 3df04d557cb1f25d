"""Builds the tf.distribute strategy named by `distribution.strategy`.

`configure_cpu_devices(n)` must run before TensorFlow initialises its devices
(before any op runs); it splits the host CPU into n logical devices so that
MirroredStrategy can be exercised without GPUs.

`multi_worker` takes its cluster from TF_CONFIG or, when TF_CONFIG is unset,
from the environment of a SLURM job step (`srun`): one worker per SLURM task,
task 0 the chief, ports from TRAINER_SLURM_PORT_BASE or derived from the job
id, GPU counts from the job (SLURM_GPUS_ON_NODE, SLURM_GPUS_PER_TASK) or from
the GPUs visible to the process.
"""

import json
import os
import re

import tensorflow as tf
from absl import logging
from trainer import compat
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
        "describing every worker (BUILD.md, multi-worker), run it as a SLURM "
        "job step (`srun`, see launch/slurm/train.sbatch), or try it on this "
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


PORT_BASE_ENV = "TRAINER_SLURM_PORT_BASE"


def in_slurm_job() -> bool:
  """True if the environment is a SLURM job's: a job step (`srun`) or a
  batch script (an error for `multi_worker` unless the job has one task)."""
  env = os.environ
  return ("SLURM_PROCID" in env and
          ("SLURM_STEP_NUM_TASKS" in env or "SLURM_NTASKS" in env) and
          ("SLURM_STEP_NODELIST" in env or "SLURM_JOB_NODELIST" in env))


def slurm_port_base() -> int:
  """The port of each node's first task; task i on a node listens on base+i.

  TRAINER_SLURM_PORT_BASE if set, else 15000 + SLURM_JOB_ID % 10000: two jobs
  sharing a node get different ports (unless their ids are 10000 apart), a
  requeued job gets its old ones back, and all stay below Linux's ephemeral
  range (32768 and up), where outgoing connections take their ports.
  """
  raw = os.environ.get(PORT_BASE_ENV, "")
  if raw:
    if not raw.isdigit() or not 1024 <= int(raw) <= 65000:
      raise ConfigError(f"{PORT_BASE_ENV}={raw!r} is not a port number in "
                        "[1024, 65000]")
    return int(raw)
  job = os.environ.get("SLURM_JOB_ID", "0")
  return 15000 + (int(job) if job.isdigit() else 0) % 10000


def _gpu_count(name: str) -> int | None:
  """A SLURM GPU count such as `2` or `a100:2` from env var `name`."""
  raw = os.environ.get(name, "")
  if not raw:
    return None
  match = re.fullmatch(r"(?:[\w.-]+:)*(\d+)", raw.strip())
  if not match:
    raise ConfigError(f"{name}={raw!r} is not a GPU count")
  return int(match.group(1))


class SlurmResolver(compat.SlurmClusterResolver):
  """A SLURM job step as `worker` tasks, one per SLURM task; rank 0 is chief.

  Two differences from the stock resolver, which otherwise does the work:
  tasks are laid out on the hosts in SLURM's own (block) order, where the
  stock one sorts host names as strings (`node10` before `node9`: every task
  would get another's address); and `gpus_per_task` may be 0 on CPU-only
  nodes, where the stock one fails ("range() arg 3 must not be zero") or,
  given a made-up GPU, makes MultiWorkerMirroredStrategy place its replica on
  a GPU that does not exist. `_slurm_resolver` pins the GPUs with
  `tf.config.set_visible_devices`, so `auto_set_gpu` is off (its
  CUDA_VISIBLE_DEVICES has no effect once TF has listed the GPUs, and would
  replace the one SLURM set).
  """

  def __init__(self, *, hosts: list[str], tasks_per_host: list[int],
               gpus_per_task: int, port_base: int):
    per_task = max(gpus_per_task, 1)  # what the base class can lay out
    super().__init__(
        jobs={"worker": sum(tasks_per_host)}, port_base=port_base,
        gpus_per_node=per_task * max(tasks_per_host), gpus_per_task=per_task,
        tasks_per_node=dict(zip(hosts, tasks_per_host)), auto_set_gpu=False)
    self._addresses = [f"{host}:{port_base + i}"
                       for host, n in zip(hosts, tasks_per_host)
                       for i in range(n)]
    self._num_gpus = gpus_per_task
    self.task_type, self.task_id = "worker", self._rank

  def cluster_spec(self) -> tf.train.ClusterSpec:
    """`worker` addresses `host:port` in SLURM rank order."""
    return tf.train.ClusterSpec({"worker": self._addresses})

  def num_accelerators(self, task_type=None, task_id=None, config_proto=None):
    """GPUs per task (0 on CPU-only nodes: one CPU replica per task)."""
    del task_type, task_id, config_proto
    return {"GPU": self._num_gpus}


def _slurm_resolver() -> SlurmResolver:
  """The SLURM job step in the environment as a cluster resolver.

  Pins this task's GPUs with `tf.config.set_visible_devices`; must run before
  TensorFlow initialises its devices.
  """
  env = os.environ
  try:
    rank = int(env["SLURM_PROCID"])
    num_tasks = int(env.get("SLURM_STEP_NUM_TASKS") or env["SLURM_NTASKS"])
    hosts = compat.expand_hostlist(env.get("SLURM_STEP_NODELIST") or
                                     env["SLURM_JOB_NODELIST"])
    per_node = (env.get("SLURM_STEP_TASKS_PER_NODE") or
                env.get("SLURM_TASKS_PER_NODE"))
    tasks_per_host = (compat.expand_tasks_per_node(per_node) if per_node else
                      [num_tasks // len(hosts)] * len(hosts))
    local_rank = int(env.get("SLURM_LOCALID", "0"))
  except (KeyError, ValueError, ZeroDivisionError) as e:
    raise ConfigError(f"the SLURM environment is incomplete or malformed "
                      f"({type(e).__name__}: {e}); run the workers with "
                      "`srun` inside an allocation") from None
  if "SLURM_STEP_ID" not in env and num_tasks > 1:
    raise ConfigError(
        f"this is the batch script of a {num_tasks}-task SLURM job, not a job "
        "step: start one process per task with `srun python -m launch.train "
        "...` (see launch/slurm/train.sbatch)")
  if sum(tasks_per_host) != num_tasks or not 0 <= rank < num_tasks:
    raise ConfigError(
        f"inconsistent SLURM step: {num_tasks} tasks, rank {rank}, tasks per "
        f"node {tasks_per_host} on {hosts}")
  # With one task per node every distribution numbers the tasks node by
  # node (SLURM sets `cyclic` for a job of one task per node: train.sbatch's
  # default); with several, only `block` does.
  distribution = env.get("SLURM_DISTRIBUTION", "block").split(":")[0]
  if distribution not in ("", "block") and max(tasks_per_host) > 1:
    raise ConfigError(
        f"SLURM task distribution {distribution!r} is not supported: workers "
        "are numbered node by node; use --distribution=block (the default)")

  visible = tf.config.list_physical_devices("GPU")  # does not init devices
  first = 0  # the rank of this host's first task (block distribution)
  for tasks_here in tasks_per_host:
    if rank < first + tasks_here:
      break
    first += tasks_here
  gpus_per_node = _gpu_count("SLURM_GPUS_ON_NODE")
  if gpus_per_node is None:
    gpus_per_node = len(visible)
  gpus_per_task = _gpu_count("SLURM_GPUS_PER_TASK")
  if gpus_per_task is None:
    gpus_per_task = gpus_per_node // tasks_here
  if gpus_per_node and not gpus_per_task:
    raise ConfigError(
        f"{gpus_per_node} GPU(s) on this node for {tasks_here} SLURM tasks: "
        "use at most one task per GPU (--ntasks-per-node)")
  if gpus_per_task and len(visible) > gpus_per_task:
    # Every task sees the node's GPUs: take this task's share.
    mine = visible[local_rank * gpus_per_task:(local_rank + 1) * gpus_per_task]
    if len(mine) < gpus_per_task:
      raise ConfigError(
          f"SLURM local task {local_rank} needs {gpus_per_task} GPU(s) but "
          f"only {len(visible)} are visible on this node")
    tf.config.set_visible_devices(mine, "GPU")
  elif len(visible) < gpus_per_task:
    raise ConfigError(f"SLURM asks for {gpus_per_task} GPU(s) per task but "
                      f"TensorFlow sees {len(visible)} (BUILD.md, CUDA host)")
  return SlurmResolver(hosts=hosts, tasks_per_host=tasks_per_host,
                       gpus_per_task=gpus_per_task,
                       port_base=slurm_port_base())


def build_strategy(name: str = "auto", num_cpu_devices: int = 1
                  ) -> tf.distribute.Strategy:
  """Returns the strategy for `name`.

  Args:
    name: `auto` (MirroredStrategy over several GPUs, or over several logical
      CPUs when `num_cpu_devices > 1`; otherwise one device), `mirrored`,
      `one_device` or `multi_worker` (cluster from TF_CONFIG, else from the
      SLURM job step this process is a task of).
    num_cpu_devices: logical CPU devices to create when there is no GPU.

  Collectives run without a timeout: TensorFlow keeps one OS thread alive
  per collective for the whole timeout (DESIGN.md fact 15). A dead or frozen
  worker is caught by TensorFlow's coordination service (heartbeats); a
  stuck one by trainer.distribute.watchdog.
  """
  if num_cpu_devices > 1:
    configure_cpu_devices(num_cpu_devices)
  if name == "multi_worker":  # before anything initialises the TF context
    resolver = None
    if not os.environ.get("TF_CONFIG") and in_slurm_job():
      resolver = _slurm_resolver()
    else:
      _check_tf_config()
    strategy = tf.distribute.MultiWorkerMirroredStrategy(
        cluster_resolver=resolver)
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
