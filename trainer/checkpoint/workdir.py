"""What a workdir holds before a run starts, and the checks on it.

`WORKDIR/config.json` is the resolved config of the run in it: resuming with
a config that changes what the run is (RUN_DEFINING_KEYS) is refused, and
defaults that depend on the run (`pruning.end_step=0`) are fixed when it
starts. Nothing here writes to the workdir.
"""

import json
import os
import tempfile

import ml_collections
from absl import logging

from trainer import config as config_lib
from trainer.optimize import pruning
from trainer.errors import ConfigError


# Config keys whose change makes a checkpoint mean something else.
RUN_DEFINING_KEYS = ("seed", "task", "user", "model", "pruning", "data.name",
                     "data.global_batch_size",
                     "data.image_size", "data.train_split",
                     "data.synthetic_shape", "data.synthetic_examples",
                     "data.num_classes", "data.class_names")


def _flatten(tree: dict, prefix: str = "") -> dict:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(_flatten(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = value
  return flat


def _as_flat_json(config: ml_collections.ConfigDict) -> dict:
  return _flatten(json.loads(json.dumps(config.to_dict(), default=list)))


def read_saved_config(workdir: str) -> ml_collections.ConfigDict | None:
  """WORKDIR/config.json of a run in `workdir` (with every key added to the
  framework since then at its default), or None for a new workdir."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    return None
  with open(path, encoding="utf-8") as f:
    saved = config_lib.with_defaults(json.load(f))
  if saved.pruning.target_sparsity and not saved.pruning.end_step:
    # written before the schedule was fixed at the start of a run
    saved.pruning.end_step = pruning.default_end_step(saved.train.steps)
  return saved


def fix_pruning_schedule(config: ml_collections.ConfigDict,
                         saved: ml_collections.ConfigDict | None) -> None:
  """Resolves `pruning.end_step=0` once, when the run starts: a resumed run
  keeps its schedule even if it is extended (`train.steps` raised)."""
  if config.pruning.target_sparsity and not config.pruning.end_step:
    config.pruning.end_step = (
        saved.pruning.end_step if saved and saved.pruning.end_step else
        pruning.default_end_step(config.train.steps))


def check_resume_config(workdir: str, config: ml_collections.ConfigDict,
                        saved_config: ml_collections.ConfigDict | None,
                        allow_change: bool) -> dict | None:
  """Refuses to resume `workdir` with a config that changes the run.

  Args:
    saved_config: `read_saved_config(workdir)`.

  Returns the saved config, flattened to dotted keys, or None if new.
  """
  if saved_config is None:
    return None
  saved, new = _as_flat_json(saved_config), _as_flat_json(config)
  changed = sorted(
      k for k in set(saved) | set(new)
      if saved.get(k) != new.get(k) and any(
          k == d or k.startswith(d + ".") for d in RUN_DEFINING_KEYS))
  if not changed:
    return saved
  detail = ", ".join(f"{k} {saved.get(k)!r} -> {new.get(k)!r}"
                     for k in changed)
  if allow_change:
    logging.warning("resuming %s with a changed config: %s", workdir, detail)
    return saved
  raise ConfigError(
      f"workdir {workdir} holds a run with a different config ({detail}); "
      "use a new --workdir, or pass --allow_config_change to resume anyway")


def check_workdir_writable(workdir: str) -> None:
  """Raises ConfigError if `workdir` cannot be created or written to.

  Creates and removes a file in the workdir, or in its nearest existing
  ancestor if the workdir does not exist yet: nothing is left behind.
  """
  existing = os.path.abspath(workdir)
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  problem = f"{existing} is a file, not a directory"
  if os.path.isdir(existing):
    try:
      fd, probe = tempfile.mkstemp(prefix=".write_test_", dir=existing)
      os.close(fd)
      os.remove(probe)
      return
    except OSError as e:
      problem = f"creating a file in {existing} failed ({e.strerror})"
  raise ConfigError(f"--workdir {workdir} cannot be written: {problem}; "
                    "choose a directory you can write to")
