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

  Given the `checkpoint` to restore: one written before (keyed by path)
  gets the variables by path, with the model's own name matched
  (`_by_path`); else raises ValueError if it holds another number of model
  variables.
  """
  state = {f"v{i}": v for i, v in enumerate(model.variables)}
  if checkpoint is None:
    return state
  saved = _saved_paths(checkpoint)
  if saved and "v0" not in saved:
    return _by_path(model, saved)
  if saved and len(saved) != len(state):
    raise ValueError(f"the checkpoint holds {len(saved)} model variables, "
                     f"the model has {len(state)}")
  return state


def model_paths(model) -> dict:
  """The model's variables by path (what `model_state` falls back to)."""
  return {v.path: v for v in model.variables}


def _by_path(model, saved: set[str]) -> dict:
  """The model's variables keyed by path, as checkpoints were written
  before; paths that differ from the `saved` ones only in the model's own
  name (`sequential` in one process, `sequential_1` in another) are
  renamed to them."""
  state = model_paths(model)
  own = f"{model.name}/"
  if set(state) <= saved or not all(p.startswith(own) for p in state):
    return state
  rest = [p[len(own):] for p in state]
  names = {p.split("/", 1)[0] for p in saved}
  fits = [n for n in names if all(f"{n}/{r}" in saved for r in rest)]
  if len(fits) != 1:
    return state
  return {f"{fits[0]}/{r}": v for r, v in zip(rest, state.values())}


def _saved_paths(checkpoint: str) -> set[str]:
  """The keys of the model's variables in `checkpoint` (unescaped: '.S' is
  '/', '..' is '.')."""
  prefix, suffix = "model/", "/.ATTRIBUTES/VARIABLE_VALUE"
  unescape = lambda key: re.sub(r"\.(.)", lambda m: "/" if m.group(1) == "S"
                                else m.group(1), key)
  return {unescape(name[len(prefix):-len(suffix)])
          for name, _ in tf.train.list_variables(checkpoint)
          if name.startswith(prefix) and name.endswith(suffix)}
