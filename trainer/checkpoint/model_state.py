"""The model's part of a checkpoint: its variables, by position and by path.

Used by trainer/checkpoint/checkpointer.py (save, restore) and trainer/checkpoint/restore.py (export).
"""

import re

import tensorflow as tf


def model_state(model, checkpoint: str | None = None) -> dict:
  """The model's part of a checkpoint: every variable, by its position.

  Keras 3 models do not expose their variables to tf.train.Checkpoint (only
  the optimizer's copies of the trainable ones get saved), so the model's
  state is listed: weights, non-trainable statistics (batch norm) and the
  dropout seed generators' state, as `v0`, `v1`, ... in the order of
  `model.variables`. Not by path: Keras names layers and unnamed weights
  from counters that depend on what the process built before (`dense_1`,
  `sequential_1`), and two variables may share a path. Checkpoints also
  hold the same variables by path (`model_paths`, stored once), for a
  deliberately changed model (`Checkpointer(allow_partial=True)`).

  Given the `checkpoint` to restore: raises ValueError if it holds another
  number of model variables.
  """
  state = {f"v{i}": v for i, v in enumerate(model.variables)}
  if checkpoint is None:
    return state
  saved = _saved_paths(checkpoint)
  if saved and len(saved) != len(state):
    raise ValueError(f"the checkpoint holds {len(saved)} model variables, "
                     f"the model has {len(state)}")
  return state


def model_paths(model) -> dict:
  """The model's variables by path: what a deliberately changed model
  restores from (`Checkpointer(allow_partial=True)`)."""
  return {v.path: v for v in model.variables}


def _saved_paths(checkpoint: str) -> set[str]:
  """The keys of the model's variables in `checkpoint` (unescaped: '.S' is
  '/', '..' is '.')."""
  prefix, suffix = "model/", "/.ATTRIBUTES/VARIABLE_VALUE"
  unescape = lambda key: re.sub(r"\.(.)", lambda m: "/" if m.group(1) == "S"
                                else m.group(1), key)
  return {unescape(name[len(prefix):-len(suffix)])
          for name, _ in tf.train.list_variables(checkpoint)
          if name.startswith(prefix) and name.endswith(suffix)}
