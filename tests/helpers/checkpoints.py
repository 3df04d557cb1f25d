"""What tests read back from a run's checkpoints."""

import os

import numpy as np
import tensorflow as tf


def variables(path) -> dict[str, np.ndarray]:
  """Every saved tensor of the latest checkpoint under `path` (a workdir or
  its checkpoints/ directory), by key; not the save counter or the object
  graph (a description of the layout, not a value)."""
  path = str(path)
  if os.path.isdir(os.path.join(path, "checkpoints")):
    path = os.path.join(path, "checkpoints")
  reader = tf.train.load_checkpoint(path)
  return {name: reader.get_tensor(name)
          for name in reader.get_variable_to_shape_map()
          if "save_counter" not in name and "OBJECT_GRAPH" not in name}
