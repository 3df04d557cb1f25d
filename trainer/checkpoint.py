"""tf.train checkpoints of the model, optimizer (loss scale included) and
global step, in `WORKDIR/checkpoints/`.

In multi-worker runs every worker saves (saving is a collective, DESIGN.md
fact 11); only the chief writes to the workdir, the others to a scratch
directory that is deleted afterwards.
"""

import shutil
import tempfile

import tensorflow as tf
from absl import logging

from trainer.callbacks.base import TrainerCallback
from trainer.errors import ConfigError, DataError


class Checkpointer:
  """Saves and restores one run's state.

  Args:
    directory: where the chief keeps checkpoints.
    model, optimizer, global_step: the state to save.
    is_chief: False on non-chief workers (they write to a scratch dir).
    max_to_keep: checkpoints kept on disk.
    allow_partial: restore a checkpoint that lacks some of the model's
      variables (a deliberately changed model) instead of refusing.
  """

  def __init__(self, directory: str, *, model, optimizer, global_step,
               is_chief: bool = True, max_to_keep: int = 3,
               allow_partial: bool = False):
    self.allow_partial = allow_partial
    self._scratch = None if is_chief else tempfile.mkdtemp(prefix="ckpt_")
    self.directory = directory if is_chief else self._scratch
    # Keras 3 models do not expose their variables to tf.train.Checkpoint
    # (only the optimizer's copies of the trainable ones get saved), so the
    # model's state is listed by variable path: weights, non-trainable
    # statistics (batch norm) and the dropout seed generators' state.
    self.checkpoint = tf.train.Checkpoint(
        model={v.path: v for v in model.variables}, optimizer=optimizer,
        global_step=global_step)
    self.manager = tf.train.CheckpointManager(
        self.checkpoint, self.directory, max_to_keep=max_to_keep,
        step_counter=global_step)

  def restore_latest(self) -> int | None:
    """Restores the newest readable checkpoint; returns its step, or None.

    A truncated or corrupt checkpoint is reported and the one before it is
    tried. A checkpoint that does not fit the model is a ConfigError.
    """
    for path in reversed(self.manager.checkpoints):
      try:
        status = self.checkpoint.restore(path)
      except ValueError as e:  # shapes differ from the model
        raise ConfigError(
            f"checkpoint {path} does not fit this model ({e}); use a new "
            "--workdir for a different model") from None
      except (tf.errors.OpError, IndexError) as e:
        logging.warning("checkpoint %s is unreadable (%s: %s); falling back "
                        "to the one before it", path, type(e).__name__,
                        str(e).splitlines()[0] if str(e) else "")
        continue
      try:
        status.assert_existing_objects_matched()
      except AssertionError as e:
        message = str(e).splitlines()[0]
        if not self.allow_partial:
          raise ConfigError(f"checkpoint {path} does not fit this model "
                            f"({message}); use a new --workdir") from None
        logging.warning("checkpoint %s restored partially: %s", path, message)
      step = int(self.checkpoint.global_step.numpy())
      logging.info("restored %s (step %d)", path, step)
      return step
    if self.manager.checkpoints:
      raise DataError(f"no checkpoint in {self.directory} can be read; "
                      "move the directory away to start from scratch")
    return None

  def save(self) -> str:
    step = int(self.checkpoint.global_step.numpy())
    if self.manager.latest_checkpoint and self.manager.latest_checkpoint.endswith(
        f"-{step}"):
      return self.manager.latest_checkpoint
    return self.manager.save(checkpoint_number=step)

  def close(self) -> None:
    if self._scratch:
      shutil.rmtree(self._scratch, ignore_errors=True)


class CheckpointEvery(TrainerCallback):
  """Saves every `every` global steps (0 = never) and at the end of training.

  Runs on every worker: saving is a collective (DESIGN.md fact 11).
  """

  def __init__(self, checkpointer: Checkpointer, every: int):
    super().__init__()
    self.checkpointer, self.every, self._last = checkpointer, every, 0

  def on_train_begin(self, logs=None):
    self._last = self.global_step

  def on_train_batch_end(self, batch, logs=None):
    step = self.global_step
    if self.every and step // self.every > self._last // self.every:
      self.checkpointer.save()
    self._last = step

  def on_train_end(self, logs=None):
    path = self.checkpointer.save()
    logging.info("saved %s", path)
