"""Callbacks for the Trainer: the Keras protocol, correct across workers.

  TrainerCallback, runs_on_chief_only   base.py (who runs what)
  MetricsLogger, read_metrics           metrics_log.py (metrics.jsonl, log lines)
  ProgressBar                           progress.py (Keras Progbar, ETA)
  TensorBoardScalars                    tensorboard.py (scalars, profiler)
  BestModelExport                       best_model.py (top-k .keras files)

`build_callbacks(config, workdir)` makes the ones a config asks for
(`callbacks.*` keys); stock Keras callbacks (EarlyStopping, CSVLogger) are
used as they are.
"""

import importlib
import os

import keras
import ml_collections

from trainer.callbacks.base import TrainerCallback, runs_on_chief_only
from trainer.callbacks.best_model import BestModelExport, resolve_mode
from trainer.callbacks.csv_log import EpochCSVLogger
from trainer.callbacks.metrics_log import MetricsLogger, read_metrics
from trainer.callbacks.progress import ProgressBar
from trainer.callbacks.tensorboard import TensorBoardScalars
from trainer.errors import ConfigError

__all__ = ["BestModelExport", "EpochCSVLogger", "MetricsLogger", "ProgressBar",
           "TensorBoardScalars", "TrainerCallback", "build_callbacks",
           "load_custom_callbacks", "read_metrics", "runs_on_chief_only"]


def load_custom_callbacks(spec: str) -> list[keras.callbacks.Callback]:
  """Instantiates `callbacks.custom`: comma-separated `module:Name` entries.

  Each `Name` is a callback class or a function returning a callback, called
  with no arguments; the module must be importable (on PYTHONPATH).
  """
  made = []
  for entry in filter(None, (e.strip() for e in spec.split(","))):
    module_name, _, attr = entry.partition(":")
    if not attr:
      raise ConfigError(f"callbacks.custom entry {entry!r} must look like "
                        "'my_package.my_module:MyCallback'")
    try:
      factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
      raise ConfigError(f"callbacks.custom entry {entry!r} cannot be loaded "
                        f"({type(e).__name__}: {e}); is its module on "
                        "PYTHONPATH?") from None
    callback = factory()
    if not isinstance(callback, keras.callbacks.Callback):
      raise ConfigError(f"callbacks.custom entry {entry!r} made a "
                        f"{type(callback).__name__}, not a "
                        "keras.callbacks.Callback")
    made.append(callback)
  return made


def build_callbacks(config: ml_collections.ConfigDict, workdir: str | None,
                    *, testing: bool = False,
                    metrics=()) -> list[keras.callbacks.Callback]:
  """The callbacks `config.callbacks` asks for, writing under `workdir`.

  `metrics`: the task's Keras metrics, to tell which way a monitored one
  improves (`mode=auto`).
  """
  cfg = config.callbacks
  callbacks = load_custom_callbacks(cfg.custom)
  callbacks.append(MetricsLogger(
      os.path.join(workdir, "metrics.jsonl") if workdir else None))
  if cfg.early_stopping.monitor:
    es = cfg.early_stopping
    callbacks.append(keras.callbacks.EarlyStopping(
        monitor=es.monitor, mode=resolve_mode(
            es.mode, es.monitor, metrics, "callbacks.early_stopping.mode"),
        patience=es.patience,
        min_delta=es.min_delta, restore_best_weights=es.restore_best_weights))
  if testing:
    return callbacks
  if cfg.progress_bar:
    callbacks.append(ProgressBar())
  if workdir and cfg.tensorboard:
    callbacks.append(TensorBoardScalars(os.path.join(workdir, "tensorboard"),
                                        cfg.profile_steps))
  if workdir and cfg.csv_log:
    callbacks.append(EpochCSVLogger(os.path.join(workdir, "log.csv")))
  if workdir and cfg.best_model.monitor:
    callbacks.append(BestModelExport(
        os.path.join(workdir, "best"), monitor=cfg.best_model.monitor,
        mode=cfg.best_model.mode, keep=cfg.best_model.keep, metrics=metrics))
  return callbacks
