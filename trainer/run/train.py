"""Train a built run (trainer/run/build.py): restore the latest checkpoint,
write config.json (the run's first write), train with SIGTERM and Ctrl-C as
preemption, recover from a NaN (train.nan_recovery), name a bad record's
file, report.
"""

import dataclasses
import json
import os
import time

import ml_collections
from absl import logging

from trainer import data as data_lib
from trainer import task as task_lib
from trainer.checkpoint.checkpointer import CheckpointEvery, Checkpointer
from trainer.data import bad_records
from trainer.distribute.stop_signals import StopSignals
from trainer.errors import DataError, TrainingDiverged
from trainer.fit.trainer import Trainer
from trainer.optimize import optimizers
from trainer.run.build import Built


@dataclasses.dataclass
class RunResult:
  logs: dict  # last train logs plus `eval/...`
  steps: int  # global step at the end
  seconds: float
  device: str
  is_chief: bool  # False on non-chief workers of a multi-worker run
  preempted: bool  # stopped early by SIGTERM or SIGINT (Ctrl-C)
  # The latest checkpoint in the workdir at the end (None without one): at
  # step `steps` unless the last host loop's loss was not finite.
  checkpoint: str | None = None
  # The signal that stopped the run early ("SIGTERM", "SIGINT"); None when
  # it was not stopped by one here (another worker's may have been).
  stop_signal: str | None = None
  # The workdir's run was already at train.steps: it was evaluated, and
  # nothing was trained or written.
  already_done: bool = False
  # The task evaluates (a task with its own train_step may not).
  evaluates: bool = True


def steps_per_epoch(config: ml_collections.ConfigDict,
                    num_train: int | None) -> int:
  """`train.steps_per_epoch`, or one pass over the training set if 0."""
  if config.train.steps_per_epoch:
    return int(config.train.steps_per_epoch)
  if not num_train:
    return int(config.train.steps)  # size unknown: the run is one epoch
  return max(1, num_train // config.data.global_batch_size)


def _checkpointer(built: Built) -> Checkpointer:
  """The run's Checkpointer, restored from the latest checkpoint; a changed
  `optimizer.learning_rate` (of a config optimizer) wins over the saved."""
  config, trainer = built.config, built.trainer
  checkpointer = Checkpointer(
      os.path.join(built.workdir, "checkpoints"), model=trainer.model,
      optimizer=trainer.optimizer, global_step=trainer.global_step,
      is_chief=trainer.is_chief, max_to_keep=config.train.max_checkpoints,
      allow_partial=built.allow_config_change,
      async_save=config.train.async_checkpoint,
      pruning_masks=trainer.pruner and trainer.pruner.masks,
      more_models={n: m for n, m in trainer.models.items()
                   if m is not trainer.model},
      more_optimizers={n: o for n, o in trainer.optimizers.items()
                       if o is not trainer.optimizer},
      epoch_window=trainer.epoch_window)
  try:
    checkpointer.restore_latest()
    trainer.check_same_step()
  except BaseException:
    checkpointer.close()  # a worker's scratch directory
    raise
  new_lr = float(config.optimizer.learning_rate)
  if (built.saved and built.config_optimizer and
      config.optimizer.schedule == "constant" and
      built.saved.get("optimizer.learning_rate") != new_lr):
    # The checkpoint holds the old rate; a changed config wins over it.
    optimizers.set_learning_rate(trainer.optimizer, new_lr)
    logging.info("learning rate set to %g from the config", new_lr)
  return checkpointer


def _write_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """WORKDIR/config.json, atomically: other workers may be reading the
  previous one to compare."""
  os.makedirs(workdir, exist_ok=True)
  tmp = os.path.join(workdir, f".config.json.{os.getpid()}")
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(config.to_dict(), f, indent=2, sort_keys=True, default=list)
  os.replace(tmp, os.path.join(workdir, "config.json"))


def train(built: Built) -> RunResult:
  """Restores the latest checkpoint, writes config.json (the first write to
  the workdir), trains with SIGTERM as preemption, reports."""
  config, workdir, trainer = built.config, built.workdir, built.trainer
  chief = trainer.is_chief
  if not chief:
    logging.set_verbosity(logging.WARNING)  # the chief reports progress
  checkpointer = None
  callbacks = list(built.callbacks)
  if workdir and not built.testing:
    checkpointer = _checkpointer(built)
    if int(trainer.global_step.numpy()) >= config.train.steps:
      return _report_finished(built, checkpointer)
    callbacks.append(CheckpointEvery(checkpointer,
                                     config.train.checkpoint_every))
  if workdir and chief:
    _write_config(config, workdir)

  start = time.perf_counter()
  stops = StopSignals(trainer.request_preemption)
  try:
    logs = _fit_with_recovery(trainer, config, built.train, built.eval_fn,
                              callbacks, checkpointer)
    if (built.eval_fn is not None and "eval/loss" not in logs and
        not trainer.preempted):
      # resumed at or past train.steps: nothing to train, report the model
      logs.update({f"eval/{k}": v
                   for k, v in trainer.evaluate(built.eval_fn).items()})
  finally:
    stops.restore()
    if checkpointer:
      checkpointer.close()
  # No worker exits before every one has finished writing: a scheduler that
  # stops a job when its first task exits (srun --kill-on-bad-exit) must not
  # cut the chief's last checkpoint short.
  trainer.barrier()
  device = trainer.strategy.extended.worker_devices[0]
  return RunResult(logs=logs, steps=int(trainer.global_step.numpy()),
                   seconds=time.perf_counter() - start, device=device,
                   is_chief=chief, preempted=trainer.preempted,
                   checkpoint=checkpointer and checkpointer.latest_checkpoint(),
                   stop_signal=stops.received,
                   evaluates=built.eval_fn is not None)


def _fit_with_recovery(trainer: Trainer, config: ml_collections.ConfigDict,
                       train: task_lib.Examples, eval_fn, callbacks,
                       checkpointer: Checkpointer | None) -> dict:
  """`trainer.fit` from the restored step; on a NaN loss, maybe recover.

  With `train.nan_recovery=N`, a diverged run goes back to its latest
  checkpoint and skips the batches that led to the NaN, at most N times;
  after that (or with no checkpoint) TrainingDiverged propagates. Every
  worker sees the same global loss, so all of them recover together.
  """
  recoveries = 0
  while True:
    # The input position is derived from the (restored) step: no iterator
    # state is saved (DESIGN.md fact 8).
    position = (checkpointer.input_position if checkpointer
                else int(trainer.global_step.numpy()))
    train_fn = data_lib.train_input_fn(
        train, global_batch_size=config.data.global_batch_size,
        seed=config.seed, shuffle_buffer=config.data.shuffle_buffer,
        start_step=position, service=config.data.service,
        run_id=(os.path.abspath(trainer.workdir) if trainer.workdir
                else config.to_json()), skipping=trainer.skipping)
    try:
      return trainer.fit(
          train_fn, steps=config.train.steps,
          steps_per_epoch=steps_per_epoch(config, train.size),
          validation_data=eval_fn, eval_every=config.train.eval_every,
          callbacks=callbacks).last_logs
    except DataError as e:  # a bad record: name its file where we can
      raise bad_records.name_the_record(
          e, train_fn, eval_fn, int(checkpointer.input_offset.numpy())
          if checkpointer else 0) from None
    except TrainingDiverged as e:
      if checkpointer and recoveries < config.train.nan_recovery:
        checkpointer.wait()  # this worker's async save, if any
        trainer.barrier()  # ... and every other worker's
      latest = checkpointer.latest_checkpoint() if checkpointer else None
      if recoveries >= config.train.nan_recovery or latest is None:
        e.checkpoint = latest
        raise
      recoveries += 1
      restored = checkpointer.recover(e.step)
      logging.warning(
          "training diverged (%s); recovery %d of %d: restored step %d and "
          "skipping the %d batches that led there (input offset now %d)",
          e, recoveries, config.train.nan_recovery, restored,
          e.step - restored, int(checkpointer.input_offset.numpy()))


def _report_finished(built: Built, checkpointer: Checkpointer) -> RunResult:
  """A workdir already at `train.steps`: evaluates the restored model and
  writes nothing (no checkpoint, metrics.jsonl line or config.json)."""
  trainer, start = built.trainer, time.perf_counter()
  steps = int(trainer.global_step.numpy())
  logging.info("already at step %d (train.steps=%d): nothing to train; "
               "evaluating the restored model", steps,
               built.config.train.steps)
  try:
    logs = ({f"eval/{k}": v
             for k, v in trainer.evaluate(built.eval_fn).items()}
            if built.eval_fn is not None else {})
  finally:
    checkpointer.close()
  trainer.barrier()
  return RunResult(logs=logs, steps=steps,
                   seconds=time.perf_counter() - start,
                   device=trainer.strategy.extended.worker_devices[0],
                   is_chief=trainer.is_chief, preempted=False,
                   checkpoint=checkpointer.latest_checkpoint(),
                   already_done=True, evaluates=built.eval_fn is not None)

