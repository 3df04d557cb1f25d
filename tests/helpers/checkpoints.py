"""What tests read back from a run's checkpoints."""

import os

import numpy as np
import tensorflow as tf

# Saved, but not a value to compare: the save counter, the object graph (a
# description of the layout) and the epoch window (the logs' running means
# as JSON, trainer/fit/epoch_window.py; pinned through metrics.jsonl).
NOT_STATE = ("save_counter", "OBJECT_GRAPH", "epoch_window")


def variables(path) -> dict[str, np.ndarray]:
  """Every saved tensor of the latest checkpoint under `path` (a workdir or
  its checkpoints/ directory) by key, but NOT_STATE."""
  path = str(path)
  if os.path.isdir(os.path.join(path, "checkpoints")):
    path = os.path.join(path, "checkpoints")
  reader = tf.train.load_checkpoint(path)
  return {name: reader.get_tensor(name)
          for name in reader.get_variable_to_shape_map()
          if not any(skip in name for skip in NOT_STATE)}
