"""tf.train checkpoints of the model, optimizer (loss scale included), global
step and input offset, in `WORKDIR/checkpoints/`.

In multi-worker runs every worker saves (saving is a collective, DESIGN.md
fact 11); only the chief writes to the workdir, the others to a scratch
directory that is deleted afterwards. Every worker restores from the chief's
directory (the workdir is on a filesystem all workers share), so all of them
resume from the same step. Saves can be asynchronous: the
variables are copied to host memory and written by a background thread while
training goes on.

The input position is not saved as an iterator (DESIGN.md fact 8): global
step k reads the training stream at batch `k + input_offset`, where
`input_offset` counts the batches skipped by NaN recovery (`recover`).
"""

import contextlib
import glob
import math
import os
import shutil
import tempfile

import tensorflow as tf
from absl import logging

from trainer import compat
from trainer.callbacks.base import TrainerCallback
from trainer.errors import ConfigError, DataError, first_line, message_line
from trainer.checkpoint.model_state import model_paths, model_state
from trainer.optimize.optimizers import inner_optimizer, is_loss_scaled


def _copy_keras_variable_to_cpu(self, object_map):
  """Keras 3's hook for async checkpoints, fixed to reuse its host copy.

  Keras creates a new host `tf.Variable` on every async save, which fails
  from the second save on ("tf.function only supports singleton
  tf.Variables"); the host copy must be created once and then assigned.
  """
  compat.copy_trackable_to_cpu(self.value, object_map)
  if self in object_map:
    object_map[self].assign(object_map[self.value])
  else:
    object_map[self] = tf.Variable(object_map[self.value])


def enable_keras_async_checkpoints() -> None:
  """Patches Keras variables so async checkpoints can save more than once.

  tests/test_checkpoint_resume.py pins it: async checkpoints equal synchronous ones.
  """
  compat.patch_keras_async_copy(_copy_keras_variable_to_cpu)


class CheckpointWriteError(RuntimeError):
  """A checkpoint could not be written (a full disk, an I/O error).

  The half-written checkpoint has been removed; the checkpoint state file
  still names the last complete one, which the next run resumes from.

  Attributes:
    path: the checkpoint that could not be written.
    intact: the last complete checkpoint, or None.
  """

  def __init__(self, path: str, intact: str | None, error: Exception):
    detail = (str(error).strip().splitlines() or [type(error).__name__])[-1]
    problem = ("the disk is full" if "No space left on device" in detail
               else f"writing failed ({detail})")
    kept = (f"the last complete checkpoint, {intact}, is intact and the same "
            "command resumes from it" if intact else
            "there is no earlier checkpoint, the same command starts over")
    fix = ("free some space (or lower train.max_checkpoints)"
           if problem == "the disk is full" else "fix the cause")
    super().__init__(f"{problem}: checkpoint {path} could not be written; "
                     f"{kept}: {fix} and rerun")
    self.path, self.intact = path, intact


def _loss_scale_state(optimizer) -> dict:
  """A LossScaleOptimizer's own state (its inner optimizer is saved apart)."""
  return {"dynamic_scale": optimizer.dynamic_scale,
          "step_counter": optimizer.step_counter}


class Checkpointer:
  """Saves and restores one run's state.

  Args:
    directory: where the chief keeps checkpoints; every worker restores
      from it.
    model, optimizer, global_step: the state to save.
    is_chief: False on non-chief workers (they write to a scratch dir).
    max_to_keep: checkpoints kept on disk.
    allow_partial: restore a checkpoint that lacks some of the model's
      variables (a deliberately changed model) instead of refusing.
    async_save: write checkpoints in a background thread.
    pruning_masks: the Pruner's masks ({kernel path: mask}), saved by
      position like the model (`pruning_masks/m0`, ...).
    more_models, more_optimizers: a task's other models and optimizers
      ({name: ...}; trainer/step/context.py), saved under `models/<name>`,
      `optimizers/<name>` and `loss_scales/<name>`.
    epoch_window: the epoch's running means (trainer/fit/epoch_window.py),
      saved so a resumed run continues them.
  """

  def __init__(self, directory: str, *, model, optimizer, global_step,
               is_chief: bool = True, max_to_keep: int = 3,
               allow_partial: bool = False, async_save: bool = False,
               pruning_masks: dict | None = None,
               more_models: dict | None = None,
               more_optimizers: dict | None = None, epoch_window=None):
    self.allow_partial = allow_partial
    self._last_saved_step, self._last_saved_path = None, None
    self._in_flight = None  # the async save being written, if any
    if async_save:
      enable_keras_async_checkpoints()
    self._options = tf.train.CheckpointOptions(
        experimental_enable_async_checkpoint=async_save)
    # Batches of the training stream skipped so far (by `recover`); int64.
    self.input_offset = tf.Variable(0, dtype=tf.int64, trainable=False,
                                    name="input_offset")
    self._scratch = None if is_chief else tempfile.mkdtemp(prefix="ckpt_")
    self.directory = directory
    # The optimizer's own state and the loss scale are saved apart, so the
    # layout is the same under every precision.policy: a run resumes under
    # another policy (the variables are float32 in all of them).
    self._model = model
    self._state = {"model": model_state(model),
                   "model_paths": model_paths(model),
                   "optimizer": inner_optimizer(optimizer),
                   "global_step": global_step,
                   "input_offset": self.input_offset}
    if is_loss_scaled(optimizer):
      self._state["loss_scale"] = _loss_scale_state(optimizer)
    if pruning_masks:
      self._state["pruning_masks"] = {
          f"m{i}": mask for i, mask in enumerate(pruning_masks.values())}
    if more_models:
      self._state["models"] = {n: model_state(m)
                               for n, m in more_models.items()}
    if more_optimizers:
      self._state["optimizers"] = {
          n: inner_optimizer(o) for n, o in more_optimizers.items()}
      scales = {n: _loss_scale_state(o) for n, o in more_optimizers.items()
                if is_loss_scaled(o)}
      if scales:
        self._state["loss_scales"] = scales
    self._epoch_window = epoch_window
    if epoch_window is not None:
      self._state["epoch_window"] = epoch_window.saved
    self.checkpoint = tf.train.Checkpoint(**self._state)
    self.manager = tf.train.CheckpointManager(  # saves: this worker's copy
        self.checkpoint, self._scratch or directory, max_to_keep=max_to_keep,
        step_counter=global_step)

  def checkpoints(self) -> list[str]:
    """The chief's checkpoints, oldest first."""
    state = tf.train.get_checkpoint_state(self.directory)
    return list(state.all_model_checkpoint_paths) if state else []

  def latest_checkpoint(self) -> str | None:
    """The chief's newest checkpoint, or None."""
    return (self.checkpoints() or [None])[-1]

  def restore_latest(self) -> int | None:
    """Restores the newest readable checkpoint; returns its step, or None.

    A truncated or corrupt checkpoint is reported and the one before it is
    tried. A checkpoint that does not fit the model is a ConfigError.
    """
    self.wait()  # an async save in flight finishes first
    paths = self.checkpoints()
    for path in reversed(paths):
      try:
        # The checkpoint's `model_paths` are the same variables again.
        status = self._reader_for(path).restore(path).expect_partial()
      except ValueError as e:  # shapes differ from the model
        raise ConfigError(
            f"checkpoint {path} does not fit this model ({e}); use a new "
            "--workdir for a different model") from None
      except (tf.errors.OpError, IndexError) as e:
        logging.warning("checkpoint %s is unreadable (%s); falling back "
                        "to the one before it", path, first_line(e))
        continue
      try:
        status.assert_existing_objects_matched()
      except AssertionError as e:
        message = message_line(e)
        if not self.allow_partial:
          raise ConfigError(f"checkpoint {path} does not fit this model "
                            f"({message}); use a new --workdir") from None
        logging.warning("checkpoint %s restored partially: %s", path, message)
      step = int(self.checkpoint.global_step.numpy())
      self._last_saved_step, self._last_saved_path = step, path
      logging.info("restored %s (step %d)", path, step)
      return step
    if paths:
      raise DataError(f"no checkpoint in {self.directory} can be read; "
                      "move the directory away to start from scratch")
    return None

  def _reader_for(self, path: str) -> tf.train.Checkpoint:
    """The checkpoint layout to restore `path` with.

    A checkpoint written without a loss scale (under float32 or
    mixed_bfloat16) restores into a mixed_float16 run, which then starts
    from the initial scale; one written with a loss scale restores into any
    policy. A deliberately changed model (`allow_partial`) restores what
    still fits, by path.
    """
    try:
      keys = tf.train.load_checkpoint(path).get_variable_to_shape_map()
    except (tf.errors.OpError, ValueError):
      return self.checkpoint  # let restore report it
    state = dict(self._state)
    del state["model_paths"]  # restored through `model`, by position
    try:
      state["model"] = model_state(self._model, path)
    except ValueError:
      if not self.allow_partial:
        raise
      # A deliberately changed model: what still fits, by path.
      del state["model"]
      state["model_paths"] = self._state["model_paths"]
    if "loss_scale" in state and not any(
        k.startswith("loss_scale/") for k in keys):
      logging.info("checkpoint %s has no loss scale (written under another "
                   "precision.policy): starting from the initial scale", path)
      del state["loss_scale"]
    if "epoch_window" in state and not any(
        k.startswith("epoch_window/") for k in keys):
      del state["epoch_window"]  # the resumed epoch's means start anew
    if "loss_scales" in state:  # several optimizers: each on its own
      state["loss_scales"] = {
          n: v for n, v in state["loss_scales"].items()
          if any(k.startswith(f"loss_scales/{n}/") for k in keys)}
      if len(state["loss_scales"]) < len(self._state["loss_scales"]):
        logging.info("checkpoint %s lacks some optimizers' loss scales "
                     "(written under another precision.policy): they start "
                     "from the initial scale", path)
    return tf.train.Checkpoint(**state)

  @property
  def input_position(self) -> int:
    """The stream batch the next step reads: global step + input offset."""
    return int(self.checkpoint.global_step.numpy()) + int(
        self.input_offset.numpy())

  def recover(self, diverged_step: int) -> int:
    """Restores the latest checkpoint and skips the data that diverged.

    The batches between the checkpoint and `diverged_step` are skipped, so
    the retry does not feed the model the same window again (the remedy
    PaLM used for loss spikes). Returns the restored step.

    Raises:
      DataError: there is no checkpoint to go back to.
    """
    # The offset so far, including skips made since the checkpoint was
    # written (a second recovery to the same checkpoint skips further).
    offset = int(self.input_offset.numpy())
    restored = self.restore_latest()
    if restored is None:
      raise DataError("no checkpoint to recover from")
    self.input_offset.assign(offset + max(diverged_step - restored, 0))
    return restored

  def save(self) -> str:
    """Saves the current step once (a second call at the same step is a
    no-op: an async save in flight is not rewritten).

    Raises:
      CheckpointWriteError: this save, or the async one before it, failed.
    """
    step = int(self.checkpoint.global_step.numpy())
    if step == self._last_saved_step:
      return self._last_saved_path
    path = os.path.join(self.manager.directory, f"ckpt-{step}")
    if self._epoch_window is not None:
      self._epoch_window.save_state()
    try:
      saved = self.manager.save(checkpoint_number=step, options=self._options)
    except (tf.errors.OpError, OSError) as e:
      # An async save in flight reports its failure here, at the next save.
      raise self._write_failed(self._in_flight or path, e) from None
    self._in_flight = (
        saved if self._options.experimental_enable_async_checkpoint else None)
    self._last_saved_step, self._last_saved_path = step, saved
    return saved

  def wait(self) -> None:
    """Returns when the async save in flight, if any, is on disk.

    Raises:
      CheckpointWriteError: it failed (TensorFlow's `sync()` only joins the
        writer thread; its error would surface at the next save, or never).
    """
    try:
      self.checkpoint.sync()
    except (tf.errors.OpError, OSError) as e:
      raise self._write_failed(self._in_flight, e) from None
    # The writer thread keeps its error for the next save (or re-raises it
    # at interpreter exit, as a traceback after `done:`): take it now.
    error = compat.take_async_save_error(self.checkpoint)
    if error is not None:
      raise self._write_failed(self._in_flight, error) from None
    in_flight, self._in_flight = self._in_flight, None
    if in_flight:
      state = tf.train.get_checkpoint_state(self.manager.directory)
      if not state or in_flight not in state.all_model_checkpoint_paths:
        raise self._write_failed(in_flight, OSError(
            "the background write did not complete (see the log above)"))

  def _write_failed(self, path: str, error: Exception) -> CheckpointWriteError:
    """Removes what the failed save of `path` left behind in this worker's
    own directory, unless the state file already names it (then it was
    written completely)."""
    self._in_flight = None
    state = tf.train.get_checkpoint_state(self.manager.directory)
    mine = (os.path.realpath(os.path.dirname(path)) ==
            os.path.realpath(self.manager.directory))
    if mine and (not state or path not in state.all_model_checkpoint_paths):
      for leftover in glob.glob(glob.escape(path) + "[._]*"):
        with contextlib.suppress(OSError):
          if os.path.isdir(leftover):
            shutil.rmtree(leftover)
          else:
            os.remove(leftover)
    return CheckpointWriteError(path, self.latest_checkpoint(), error)

  def close(self) -> None:
    """Waits for an async save in flight; removes a worker's scratch dir.

    Raises:
      CheckpointWriteError: the async save in flight failed.
    """
    try:
      self.wait()
    finally:
      if self._scratch:
        shutil.rmtree(self._scratch, ignore_errors=True)


class CheckpointEvery(TrainerCallback):
  """Saves every `every` global steps (0 = never) and at the end of training;
  a host loop ends at each of those steps, whatever `steps_per_loop` is.

  Runs on every worker: saving is a collective (DESIGN.md fact 11).
  """

  def __init__(self, checkpointer: Checkpointer, every: int):
    super().__init__()
    self.checkpointer, self.every, self._last = checkpointer, every, 0
    self.ends_loops_every = every

  def on_train_begin(self, logs=None):
    self._last = self.global_step

  def _healthy(self, logs) -> bool:
    """False when the last host loop's loss is NaN or inf (under
    mixed_float16 such steps are skipped, not fatal): that state is not
    worth a checkpoint, and a later recovery must not go back to it."""
    loss = (logs or {}).get("loop_loss", (logs or {}).get("loss", 0.0))
    if math.isfinite(loss):
      return True
    logging.warning("not checkpointing step %d: the loss is %s",
                    self.global_step, loss)
    return False

  def on_train_batch_end(self, batch, logs=None):
    step = self.global_step
    if self.every and step // self.every > self._last // self.every:
      if not self._healthy(logs):
        return  # try again after the next loop
      self.checkpointer.save()
    self._last = step

  def on_train_end(self, logs=None):
    if self._healthy(logs):
      path = self.checkpointer.save()
      logging.info("saved %s", path)
