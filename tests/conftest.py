"""Test session setup: 2 logical CPU devices, so MirroredStrategy has 2
replicas in-process (must happen before TensorFlow initialises devices)."""

import os
import subprocess
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # pylint: disable=wrong-import-position
import pytest  # pylint: disable=wrong-import-position
import tensorflow as tf  # pylint: disable=wrong-import-position

from trainer.strategy import configure_cpu_devices  # pylint: disable=wrong-import-position

configure_cpu_devices(2)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
