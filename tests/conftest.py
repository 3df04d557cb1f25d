"""Test session setup: 2 logical CPU devices, so MirroredStrategy has 2
replicas in-process (must happen before TensorFlow initialises devices)."""

import concurrent.futures
import os
import subprocess
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # pylint: disable=wrong-import-position
import pytest  # pylint: disable=wrong-import-position
import tensorflow as tf  # pylint: disable=wrong-import-position

from trainer.distribute.strategy import configure_cpu_devices  # pylint: disable=wrong-import-position

configure_cpu_devices(2)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The modules that take longest (seconds of a quiet 2-core run, heaviest
# first): xdist's loadscope hands out whole modules in collection order, so
# these go first and the many short modules fill in around them at the end
# (longest processing time first). Collected by number of tests instead,
# test_launch_slurm (9 tests, ~170 s) started last and ran alone for its
# last minutes.
HEAVIEST_MODULES = (
    "test_launch_slurm", "test_combinations", "test_launch_train",
    "test_checkpoint_resume", "test_tasks", "test_distribute_multiworker",
    "test_launch_restarts", "test_export_tasks", "test_step_custom",
    "test_export_models", "test_data_file_shard", "test_launch_bench",
    "test_launch_elastic", "test_data_pipeline_resume", "test_data_service",
    "test_data_files", "test_data_bad_records", "test_checkpoint_disk_full",
    "test_callbacks_multiworker", "test_distribute_soak", "test_export")


def pytest_collection_modifyitems(config, items):  # pylint: disable=unused-argument
  """Heaviest modules first (HEAVIEST_MODULES), the rest as collected."""
  rank = {name: i for i, name in enumerate(HEAVIEST_MODULES)}
  items.sort(key=lambda item: rank.get(item.module.__name__.split(".")[-1],
                                       len(rank)))


@pytest.fixture
def mirrored():
  return tf.distribute.MirroredStrategy(
      ["/cpu:0", "/cpu:1"], cross_device_ops=tf.distribute.ReductionToOneDevice())


@pytest.fixture
def one_device():
  return tf.distribute.OneDeviceStrategy("/cpu:0")


@pytest.fixture
def policy():
  """Sets a Keras dtype policy for one test and restores float32 after."""
  yield keras.mixed_precision.set_dtype_policy
  keras.mixed_precision.set_dtype_policy("float32")


def run_module(*args, env=None, timeout=600, cwd=ROOT):
  """Runs `python -m ARGS` from the project root; returns CompletedProcess."""
  full_env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", **(env or {}))
  return subprocess.run([sys.executable, "-m", *args], cwd=cwd, env=full_env,
                        capture_output=True, text=True, timeout=timeout,
                        check=False)


def run_modules(jobs: dict, processes: int = 3) -> dict:
  """Runs several `run_module(*args, **kwargs)` at once: {key: (args,
  kwargs)} -> {key: CompletedProcess}. A launcher that stops on bad input
  spends its time importing TensorFlow, mostly on one core: on 2 cores, 3
  at a time take about half as long as one after another."""
  with concurrent.futures.ThreadPoolExecutor(processes) as pool:
    futures = {key: pool.submit(run_module, *args, **kwargs)
               for key, (args, kwargs) in jobs.items()}
    return {key: future.result() for key, future in futures.items()}
