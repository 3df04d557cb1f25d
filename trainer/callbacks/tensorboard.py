"""TensorBoard scalars and a profiler trace, written by the chief.

`DIR/tensorboard/train`: after every host loop, at the global step: `loss`,
each metric, `learning_rate`, `loss_scale` (mixed_float16), `grad_norm`
(global norm of the reduced, unscaled gradient), `examples_per_sec`,
`step_time` (seconds), `skipped_steps`, and whatever else the train logs
hold (`sparsity`; a task's own train_step's values, per-optimizer
`loss_scale/<name>`...). `DIR/tensorboard/eval`: `loss` and
each metric after every evaluation. With `profile_steps=(a, b)`, a profiler
trace of the host loops covering global steps [a, b) goes to
`DIR/tensorboard/plugins/profile/` (TensorBoard's Profile tab).
"""

import os

import tensorflow as tf
from absl import logging

from trainer.callbacks.base import TrainerCallback

# Train logs that are counts or repeats, not worth a chart.
NOT_SCALARS = ("steps", "examples", "loss_sum", "loop_loss")


class TensorBoardScalars(TrainerCallback):
  """Writes train/eval scalars and an optional profile to `logdir`.

  Args:
    logdir: e.g. WORKDIR/tensorboard.
    profile_steps: (first, stop) global steps to trace; (0, 0) for none.
  """

  chief_only = True

  def __init__(self, logdir: str, profile_steps: tuple[int, int] = (0, 0)):
    super().__init__()
    self.logdir = logdir
    self.profile_steps = tuple(int(s) for s in profile_steps)
    self._writers = {}
    self._profiling = False

  def _writer(self, name: str):
    if name not in self._writers:
      self._writers[name] = tf.summary.create_file_writer(
          os.path.join(self.logdir, name))
    return self._writers[name]

  def _scalars(self, name: str, values: dict) -> None:
    with self._writer(name).as_default(step=self.global_step):
      for key, value in values.items():
        tf.summary.scalar(key, value)

  def on_train_batch_begin(self, batch, logs=None):
    first, stop = self.profile_steps
    if not self._profiling and first <= self.global_step < stop:
      tf.profiler.experimental.start(self.logdir)
      self._profiling = True

  def on_train_batch_end(self, batch, logs=None):
    logs = logs or {}
    self._scalars("train", {k: v for k, v in logs.items()
                            if k not in NOT_SCALARS})
    if self._profiling and self.global_step >= self.profile_steps[1]:
      self._stop_profiler()

  def on_test_end(self, logs=None):
    self._scalars("eval", {k: v for k, v in (logs or {}).items()
                           if k != "num_examples"})

  def _stop_profiler(self) -> None:
    tf.profiler.experimental.stop()
    self._profiling = False
    logging.info("profile of steps %s written to %s", self.profile_steps,
                 self.logdir)

  def on_train_end(self, logs=None):
    if self._profiling:
      self._stop_profiler()
    for writer in self._writers.values():
      writer.flush()
