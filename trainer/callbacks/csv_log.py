"""`WORKDIR/log.csv`: Keras' CSVLogger, one row per epoch, that a resumed
run continues without writing an epoch twice."""

import csv
import os

import keras

from trainer.callbacks.base import TrainerCallback


class EpochCSVLogger(keras.callbacks.CSVLogger, TrainerCallback):
  """Appends one row per epoch to `path` (chief only).

  A run resumed from a checkpoint inside epoch e (or at its end, killed
  before it was saved) trains epoch e again: the rows of epochs >= e that
  the earlier run wrote are dropped first, so each epoch has one row.
  """

  chief_only = True

  def __init__(self, path: str):
    keras.callbacks.CSVLogger.__init__(self, path, append=True)
    self.trainer = None

  def on_train_begin(self, logs=None):
    steps_per_epoch = self.params.get("steps") or 0
    if steps_per_epoch and os.path.exists(self.filename):
      first_epoch = self.global_step // steps_per_epoch
      with open(self.filename, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
      kept = rows[:1] + [r for r in rows[1:] if r and int(r[0]) < first_epoch]
      if len(kept) < len(rows):
        with open(self.filename, "w", newline="", encoding="utf-8") as f:
          csv.writer(f).writerows(kept if len(kept) > 1 else [])
    super().on_train_begin(logs)
