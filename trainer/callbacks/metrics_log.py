"""Writes `WORKDIR/metrics.jsonl` and logs progress: one JSON object per event.

Every line has `step` (the global step); train values under `train/...`
after every host loop, with `epoch` (from 1): `train/loss`, the metrics and
a task's own values are means over that epoch up to `step`, continued
across a resume (trainer/fit/epoch_window.py); `train/steps`, `examples`,
`examples_per_sec`, `step_time`, `input_wait`, `skipped_steps` are the host
loop's; `grad_norm`, `learning_rate`, `loss_scale` the last step's. Eval
values under `eval/...` after every evaluation. On resume, lines past the
restored step (written before a crash) are dropped. At each epoch end it
logs one line with the epoch's loss and metrics. Chief only.
"""

import json
import os

from absl import logging

from trainer.callbacks.base import TrainerCallback

# The callbacks' `loop_loss` is the last host loop's mean: another window
# than `loss`, kept out of the file (one window per line).
LOOP_ONLY = ("loop_loss",)


class MetricsLogger(TrainerCallback):
  """Appends train and eval logs to a JSONL file and to the absl log.

  Args:
    path: the JSONL file, or None to only log.
  """

  chief_only = True

  def __init__(self, path: str | None):
    super().__init__()
    self.path = path
    self._epochs = 0
    self._epoch = 0

  def _write(self, record: dict) -> None:
    if self.path:
      with open(self.path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")

  def on_train_begin(self, logs=None):
    self._epochs = self.params.get("epochs", 0)
    if self.path and os.path.exists(self.path):  # resumed: drop what the
      step = self.global_step                    # restored state undid
      with open(self.path, encoding="utf-8") as f:
        lines = [l for l in f if l.strip()]
      kept = [l for l in lines if json.loads(l)["step"] <= step]
      if len(kept) < len(lines):
        with open(self.path, "w", encoding="utf-8") as f:
          f.writelines(kept)

  def on_epoch_begin(self, epoch, logs=None):
    self._epoch = epoch

  def on_train_batch_end(self, batch, logs=None):
    logs = logs or {}
    self._write({"step": self.global_step, "epoch": self._epoch + 1,
                 **{f"train/{k}": v for k, v in logs.items()
                    if k not in LOOP_ONLY}})
    extra = (f", loss_scale {logs['loss_scale']:g}"
             if "loss_scale" in logs else "")
    logging.info("step %d: loss %.4f, %.0f examples/s%s", self.global_step,
                 logs.get("loss", float("nan")),
                 logs.get("examples_per_sec", 0.0), extra)

  def on_test_end(self, logs=None):
    logs = logs or {}
    self._write({"step": self.global_step,
                 **{f"eval/{k}": v for k, v in logs.items()}})

  def on_epoch_end(self, epoch, logs=None):
    logs = logs or {}
    logging.info("epoch %d/%d (step %d): %s", epoch + 1, self._epochs,
                 self.global_step,
                 ", ".join(f"{k} {v:.4g}" for k, v in logs.items()
                           if not (k.endswith("bad_records") and not v)))


def read_metrics(workdir: str) -> list[dict]:
  """The records of `workdir/metrics.jsonl`, in order."""
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]
