"""One training run from a config: the whole data path in one place.

  build.py  checks and builds (strategy, data, task, Trainer): nothing written
  train.py  restores, writes config.json, trains, recovers, reports

config -> strategy -> precision -> dataset -> model, optimizer -> Trainer
-> callbacks (metrics.jsonl, checkpoints) -> final logs.

Everything that can reject bad input (config values, strategy, batch split,
dataset lookup, model shapes) runs before the workdir is touched.
"""

from typing import Sequence

import keras
import ml_collections

from trainer import compat
from trainer.run.build import build
from trainer.run.train import RunResult, train

__all__ = ["RunResult", "run"]


def run(config: ml_collections.ConfigDict, workdir: str | None, *,
        testing: bool = False, allow_config_change: bool = False,
        callbacks: Sequence[keras.callbacks.Callback] = (),
        task=None) -> RunResult:
  """Trains and evaluates as `config` says; writes into `workdir` if given.

  `task` is a task object (trainer/task.py) to train instead of the one
  `config.task` names, for notebooks and tests; config.json then records
  its class as `task` (resuming from the launcher needs that class to be
  importable and to take the config).
  `callbacks` are added to the ones the config asks for (`callbacks.*`).
  A workdir with a run in it is resumed; if its saved config differs in
  what defines the run (RUN_DEFINING_KEYS), that is refused unless
  `allow_config_change`.

  Raises:
    UserError (ConfigError, DataError): bad input, before any file is written.
  """
  # train.deterministic turns on TensorFlow's process-wide op determinism
  # for this run only: a later run in the same process gets its own setting.
  deterministic_before = compat.op_determinism_enabled()
  try:
    return _run(config, workdir, testing=testing,
                allow_config_change=allow_config_change, callbacks=callbacks,
                task=task)
  finally:
    if not deterministic_before:
      compat.disable_op_determinism()


def _run(config: ml_collections.ConfigDict, workdir: str | None, *,
         testing: bool, allow_config_change: bool,
         callbacks: Sequence[keras.callbacks.Callback], task) -> RunResult:
  """`run`, with op determinism as the config says: build, then train."""
  built = build(config, workdir, testing=testing,
                 allow_config_change=allow_config_change,
                 callbacks=callbacks, task=task)
  try:
    return train(built)
  finally:
    if built.trainer.watchdog:
      built.trainer.watchdog.close()
