"""A progress bar over the whole run: steps, ETA, loss, metrics, examples/s.

Keras' own `Progbar` draws it. On a terminal it redraws in place after every
host loop; when stdout is not a terminal (a log file, CI) it prints one line
at the end. Chief only.
"""

import sys

import keras

from trainer.callbacks.base import TrainerCallback

_SHOWN_EXTRA = ("examples_per_sec", "loss_scale", "bad_records")


class ProgressBar(TrainerCallback):
  """Progress of `params['total_steps']` global steps, with ETA."""

  chief_only = True

  def __init__(self):
    super().__init__()
    self._bar = None
    self._first = 0

  def on_train_begin(self, logs=None):
    self._first = self.global_step
    total = self.params.get("total_steps", 0) - self._first
    self._bar = keras.utils.Progbar(
        target=max(total, 1), unit_name="step", stateful_metrics=None,
        stateless_metrics=(), verbose=1 if sys.stdout.isatty() else 2)

  def _values(self, logs, names):
    return [(k, logs[k]) for k in names if k in logs and not (
        k.endswith("bad_records") and not logs[k])]  # shown once there are some

  def on_train_batch_end(self, batch, logs=None):
    logs = logs or {}
    metrics = ["loss"] + [m.name for m in self.trainer.train_metrics]
    self._bar.update(self.global_step - self._first,
                     self._values(logs, metrics + list(_SHOWN_EXTRA)),
                     finalize=False)

  def on_test_end(self, logs=None):
    logs = {f"val_{k}": v for k, v in (logs or {}).items()
            if k != "num_examples"}
    self._bar.update(self.global_step - self._first,
                     self._values(logs, sorted(logs)), finalize=False)

  def on_train_end(self, logs=None):
    self._bar.update(self.global_step - self._first, finalize=True)
