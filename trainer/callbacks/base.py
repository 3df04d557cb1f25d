"""What every callback in a distributed run needs: the trainer, and who runs it.

The Trainer drives callbacks through the Keras protocol (`CallbackList`).
`TrainerCallback` adds `self.trainer`, so a callback can read the int64 global
step, the strategy and `is_chief`. A callback whose only effect is output
(files, TensorBoard, console) runs on the chief alone: set `chief_only = True`
on its class or instance. Stock Keras callbacks of that kind are recognised
by type (DESIGN.md fact 10); every other callback runs on every worker, so
decisions such as `stop_training` are taken everywhere.
"""

import keras

# Stock Keras callbacks whose only effect is writing output.
CHIEF_ONLY_KERAS = (keras.callbacks.CSVLogger, keras.callbacks.TensorBoard,
                    keras.callbacks.ModelCheckpoint,
                    keras.callbacks.ProgbarLogger,
                    keras.callbacks.RemoteMonitor)


def runs_on_chief_only(callback: keras.callbacks.Callback) -> bool:
  """True if `callback` is pure output and must run on the chief alone."""
  return bool(getattr(callback, "chief_only", False)) or isinstance(
      callback, CHIEF_ONLY_KERAS)


class TrainerCallback(keras.callbacks.Callback):
  """A Keras callback that also sees the Trainer that drives it.

  `on_train_batch_end(batch, logs)` follows Keras: `batch` is the index
  within the epoch of the last step of the host loop. Use `self.global_step`
  for the run's step count (resumed runs included).
  """

  chief_only = False
  # > 0: a host loop ends at every multiple of this global step, so
  # on_train_batch_end sees that step exactly (CheckpointEvery uses it);
  # give every worker the same callbacks.
  ends_loops_every = 0

  def __init__(self):
    super().__init__()
    self.trainer = None

  def set_trainer(self, trainer) -> None:
    self.trainer = trainer

  @property
  def global_step(self) -> int:
    """Train steps taken so far, skipped (overflow) steps included."""
    return int(self.trainer.global_step.numpy())
