"""Keeps the best `keep` models by a monitored epoch metric, as `.keras` files.

`DIR/best/step-<global step>.keras`, plus `DIR/best/index.json`: the kept
files with their monitored values, best first (read back on resume, so a
restarted run keeps ranking against the earlier ones). Chief only.
"""

import json
import os

from absl import logging

from trainer.callbacks.base import TrainerCallback
from trainer.config import MODES
from trainer.errors import ConfigError



def resolve_mode(mode: str, monitor: str, metrics=(),
                 setting: str = "callbacks.best_model.mode") -> str:
  """`min` or `max` for `monitor` (an epoch log key such as `val_r2`).

  `auto` is `min` for a loss; for one of `metrics` (the task's Keras
  metrics) the direction Keras gives it (accuracy up, MAE down); else `max`
  for accuracy-like names. A metric of unknown direction (your own Metric
  subclass) needs `mode` set: that is a ConfigError, not a guess.
  """
  if mode not in MODES:
    raise ConfigError(f"unknown mode {mode!r} for {monitor!r}; use one of: "
                      f"{', '.join(MODES)}")
  if mode != "auto":
    return mode
  name = monitor.removeprefix("val_")
  if name == "loss" or name.endswith("_loss"):
    return "min"
  direction = next((getattr(m, "_direction", None) for m in metrics
                    if m.name == name), None)
  if direction in ("up", "down"):
    return "max" if direction == "up" else "min"
  if any(s in name for s in ("acc", "auc", "precision", "recall")):
    return "max"
  raise ConfigError(f"cannot tell whether {monitor!r} should go up or down: "
                    f"set --config.{setting}=max or min")


def set_monitor_mode(callback, metrics) -> None:
  """Keras' monitor callbacks (EarlyStopping, ReduceLROnPlateau,
  ModelCheckpoint) with mode `auto` look for the metric among a compiled
  model's metrics, which the trainer's model never has: tell them the
  direction from `metrics` (left to Keras' own error if unknown)."""
  if getattr(callback, "mode", None) != "auto" or not isinstance(
      getattr(callback, "monitor", None), str):
    return
  try:
    callback.mode = resolve_mode("auto", callback.monitor, metrics)
  except ConfigError:
    pass


class BestModelExport(TrainerCallback):
  """Saves the model at epoch ends where `monitor` is among the best `keep`.

  Args:
    directory: e.g. WORKDIR/best.
    monitor: an epoch log key, e.g. `val_accuracy` or `val_loss`.
    mode: `min`, `max` or `auto` (see `resolve_mode`).
    keep: how many models to keep.
    metrics: the run's Keras metrics, for `auto`.
  """

  chief_only = True

  def __init__(self, directory: str, *, monitor: str, mode: str = "auto",
               keep: int = 1, metrics=()):
    super().__init__()
    if keep < 1:
      raise ConfigError(f"best model keep must be >= 1, got {keep}")
    self.directory, self.monitor, self.keep = directory, monitor, keep
    self.mode = resolve_mode(mode, monitor, metrics)
    self.index_path = os.path.join(directory, "index.json")
    self.kept: list[dict] = []  # {"path", "value", "step", "epoch"}, best first
    self._warned = False

  def on_train_begin(self, logs=None):
    if os.path.exists(self.index_path):
      with open(self.index_path, encoding="utf-8") as f:
        self.kept = [e for e in json.load(f) if os.path.exists(e["path"])]

  def _better(self, a: float, b: float) -> bool:
    return a > b if self.mode == "max" else a < b

  def on_epoch_end(self, epoch, logs=None):
    value = (logs or {}).get(self.monitor)
    if value is None:
      if not self._warned:
        logging.warning("best model: %r is not in the epoch logs (%s); "
                        "nothing saved", self.monitor,
                        ", ".join(sorted(logs or {})))
        self._warned = True
      return
    if len(self.kept) >= self.keep and not self._better(
        value, self.kept[-1]["value"]):
      return
    os.makedirs(self.directory, exist_ok=True)
    path = os.path.join(self.directory, f"step-{self.global_step}.keras")
    self.model.save(path)
    entry = {"path": path, "value": float(value), "step": self.global_step,
             "epoch": epoch}
    self.kept = [e for e in self.kept if e["path"] != path] + [entry]
    self.kept.sort(key=lambda e: e["value"], reverse=self.mode == "max")
    for old in self.kept[self.keep:]:
      os.remove(old["path"])
    self.kept = self.kept[:self.keep]
    with open(self.index_path, "w", encoding="utf-8") as f:
      json.dump(self.kept, f, indent=2)
    logging.info("best model: %s %s=%.4g", path, self.monitor, value)
