"""Writes `WORKDIR/metrics.jsonl`: one JSON object per log event.

Every line has `step`; train values under `train/...` (loss, accuracy,
examples_per_sec, step_time, grad_norm, learning_rate, loss_scale under
mixed_float16), eval values under `eval/...`. Only the chief writes.
"""

import json
import os

import keras
from absl import logging


class MetricsLogger(keras.callbacks.Callback):
  """Appends train and eval logs to a JSONL file and to the absl log."""

  def __init__(self, path: str | None):
    super().__init__()
    self.path = path
    self.step = 0
    self.records: list[dict] = []

  def _write(self, record: dict) -> None:
    self.records.append(record)
    if self.path:
      with open(self.path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")

  def on_train_batch_end(self, batch, logs=None):
    self.step = int(batch)
    logs = logs or {}
    self._write({"step": self.step,
                 **{f"train/{k}": v for k, v in logs.items()}})
    extra = (f" loss_scale {logs['loss_scale']:g}"
             if "loss_scale" in logs else "")
    logging.info("step %d: loss %.4f, %.0f examples/s%s", self.step,
                 logs.get("loss", float("nan")),
                 logs.get("examples_per_sec", 0.0), extra)

  def on_test_end(self, logs=None):
    logs = logs or {}
    self._write({"step": self.step,
                 **{f"eval/{k}": v for k, v in logs.items()}})
    logging.info("step %d eval: %s", self.step,
                 ", ".join(f"{k} {v:.4g}" for k, v in logs.items()))


def read_metrics(workdir: str) -> list[dict]:
  """The records of `workdir/metrics.jsonl`, in order."""
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]
