"""One training run from a config: the whole data path in one place.

config -> strategy -> precision -> dataset -> model, optimizer -> Trainer
-> callbacks (metrics.jsonl, checkpoints) -> final logs.

Everything that can reject bad input (config values, strategy, batch split,
dataset lookup, model shapes) runs before the workdir is touched.
"""

import dataclasses
import json
import os
import time
from typing import Sequence

import keras
import ml_collections
import tensorflow as tf
from absl import logging

from trainer import callbacks as callbacks_lib
from trainer import compat
from trainer import config as config_lib
from trainer import data as data_lib
from trainer.data import bad_records
from trainer import task as task_lib
from trainer.checkpoint.checkpointer import CheckpointEvery, Checkpointer
from trainer.checkpoint.workdir import (check_resume_config,
                                        check_workdir_writable,
                                        fix_pruning_schedule,
                                        read_saved_config)
from trainer.distribute import strategy as strategy_lib
from trainer.distribute.stop_signals import StopSignals
from trainer.distribute.watchdog import Watchdog
from trainer.errors import (ConfigError, DataError, TrainingDiverged,
                            first_line)
from trainer.fit.trainer import Trainer
from trainer.optimize import optimizers, precision, pruning

TESTING_STEPS = 6  # train steps in --testing mode
TESTING_EVAL_BATCHES = 4


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


def testing_config(config: ml_collections.ConfigDict
                  ) -> ml_collections.ConfigDict:
  """The single-device testing variant: one device, a few steps."""
  config = ml_collections.ConfigDict(config.to_dict())
  config.distribution.strategy = "one_device"
  config.distribution.num_cpu_devices = 1
  config.train.steps = min(config.train.steps, TESTING_STEPS)
  config.train.steps_per_loop = min(config.train.steps_per_loop,
                                    config.train.steps)
  config.train.steps_per_epoch = config.train.steps
  config.train.eval_every = 0
  config.train.checkpoint_every = 0
  return config


def steps_per_epoch(config: ml_collections.ConfigDict,
                    num_train: int | None) -> int:
  """`train.steps_per_epoch`, or one pass over the training set if 0."""
  if config.train.steps_per_epoch:
    return int(config.train.steps_per_epoch)
  if not num_train:
    return int(config.train.steps)  # size unknown: the run is one epoch
  return max(1, num_train // config.data.global_batch_size)


def _per_replica_spec(train: task_lib.Examples,
                      config: ml_collections.ConfigDict, replicas: int):
  """The TensorSpec nest of one replica's training batch."""
  per_replica = config.data.global_batch_size // replicas
  return tf.nest.map_structure(
      lambda s: tf.TensorSpec([per_replica, *s.shape], s.dtype),
      train.dataset.element_spec)


def run(config: ml_collections.ConfigDict, workdir: str | None, *,
        testing: bool = False, allow_config_change: bool = False,
        callbacks: Sequence[keras.callbacks.Callback] = (),
        task=None) -> RunResult:
  """Trains and evaluates as `config` says; writes into `workdir` if given.

  `task` is a task object (trainer/task.py) to train instead of the one
  `config.task` names, for notebooks and tests; config.json then records
  its class as `task` (resuming from the launcher needs that class to be
  importable and to take the config).
  `callbacks` are added to the ones the config asks for (`callbacks.*`).
  A workdir with a run in it is resumed; if its saved config differs in
  what defines the run (RUN_DEFINING_KEYS), that is refused unless
  `allow_config_change`.

  Raises:
    UserError (ConfigError, DataError): bad input, before any file is written.
  """
  # train.deterministic turns on TensorFlow's process-wide op determinism
  # for this run only: a later run in the same process gets its own setting.
  deterministic_before = compat.op_determinism_enabled()
  try:
    return _run(config, workdir, testing=testing,
                allow_config_change=allow_config_change, callbacks=callbacks,
                task=task)
  finally:
    if not deterministic_before:
      compat.disable_op_determinism()


def _run(config: ml_collections.ConfigDict, workdir: str | None, *,
         testing: bool, allow_config_change: bool,
         callbacks: Sequence[keras.callbacks.Callback], task) -> RunResult:
  """`run`, with op determinism as the config says: build, then train."""
  built = _build(config, workdir, testing=testing,
                 allow_config_change=allow_config_change,
                 callbacks=callbacks, task=task)
  try:
    return _train(built)
  finally:
    if built.trainer.watchdog:
      built.trainer.watchdog.close()


@dataclasses.dataclass
class _Built:
  """Everything a run needs, checked; nothing written yet."""
  config: ml_collections.ConfigDict  # resolved (testing, pruning schedule)
  workdir: str | None
  trainer: Trainer
  train: task_lib.Examples
  eval_fn: object  # InputContext -> eval dataset; None: no evaluation
  callbacks: list
  saved: dict | None  # the saved config of a resumed run, flattened
  testing: bool
  allow_config_change: bool
  config_optimizer: bool  # the optimizer is `optimizer.*`'s, not the task's


def _build(config: ml_collections.ConfigDict, workdir: str | None, *,
           testing: bool, allow_config_change: bool,
           callbacks: Sequence[keras.callbacks.Callback], task) -> _Built:
  """Checks the config, builds the strategy, data, task and Trainer, and
  checks the workdir: every rejection of bad input happens here, and
  nothing is written.

  Raises:
    UserError (ConfigError, DataError): bad input.
  """
  config_lib.validate(config)
  config = config.copy_and_resolve_references()  # run() fills in defaults
  if task is not None:
    task_lib.check_methods(task, f"{type(task).__name__} object")
    config.task = task_lib.spec_of(task)
  if testing:
    config = testing_config(config)
    if workdir and os.path.exists(os.path.join(workdir, "config.json")):
      raise ConfigError(
          f"--testing would overwrite the run in {workdir} (its config.json "
          "and metrics.jsonl); omit --workdir or give an empty one")
  strategy = strategy_lib.build_strategy(
      config.distribution.strategy, config.distribution.num_cpu_devices)
  n = strategy.num_replicas_in_sync
  data_lib.check_batch_size(config.data.global_batch_size,
                            n * config.train.grad_accum_steps,
                            parts="replicas x train.grad_accum_steps micro-"
                            "batches" if config.train.grad_accum_steps > 1
                            else "replicas")
  data_lib.check_batch_size(config.data.eval_batch_size, n,
                            "data.eval_batch_size")
  precision.set_policy(config.precision.policy)
  keras.utils.set_random_seed(config.seed)
  if config.train.deterministic:
    tf.config.experimental.enable_op_determinism()

  if task is None:
    task = task_lib.load_task(config.task, config)
  methods = task_lib.optional_methods(task)
  # A task's own train_step may take x alone, and may have no evaluation.
  own_step = methods.train_step is not None
  train = task_lib.examples(task.train_data(), "train_data",
                            labels=not own_step)
  evals = (task_lib.examples(task.eval_data(), "eval_data")
           if task_lib.has_evaluation(task) else None)
  data_lib.check_train_batch(train, config.data.global_batch_size // n)
  data_lib.check_skipping(train, evals, config.data.skip_bad_records,
                          config.data.service)
  skipping = (bad_records.Skipping(config.data.skip_bad_records)
              if config.data.skip_bad_records else None)
  if config.data.service:
    data_lib.check_service(train, config.data.service,
                           window=config.data.shuffle_buffer)
  eval_fn = evals and data_lib.eval_input_fn(
      evals, global_batch_size=config.data.eval_batch_size,
      take=TESTING_EVAL_BATCHES * config.data.eval_batch_size if testing
      else None, skipping=skipping)
  saved = None
  if workdir and not testing:
    saved_config = read_saved_config(workdir)
    fix_pruning_schedule(config, saved_config)
    saved = check_resume_config(workdir, config, saved_config,
                                allow_config_change)
  else:
    fix_pruning_schedule(config, None)

  with strategy.scope():
    model = task.build_model()
    if not isinstance(model, dict):
      task_lib.build_variables(model, train)
    task_lib.main_model(model, has_train_step=methods.train_step is not None)
    optimizer = (methods.build_optimizer() if methods.build_optimizer
                 else optimizers.build_optimizer(config.optimizer,
                                                 config.train.steps))
  if not own_step:
    task_lib.check_task(task, model, train, compute_loss=methods.compute_loss)
  elif evals is not None:  # its losses and metrics only evaluate
    task_lib.check_task(task, model, evals, compute_loss=methods.compute_loss,
                        method="eval_data")
  if workdir:
    check_workdir_writable(workdir)
  workers = strategy_lib.num_workers(strategy)
  watchdog = (Watchdog(config.distribution.collective_timeout,
                       name=f"worker {strategy.cluster_resolver.task_id}")
              if workers > 1 and config.distribution.collective_timeout
              else None)
  try:
    trainer = Trainer(
        model=model, optimizer=optimizer,
        loss=(None if methods.compute_loss or evals is None
              else task.build_losses),
        compute_loss=methods.compute_loss if evals is not None else None,
        train_step=methods.train_step,
        metrics=task_lib.metrics_of(task),  # fresh ones
        strategy=strategy, steps_per_loop=config.train.steps_per_loop,
        global_clipnorm=config.optimizer.global_clipnorm,
        jit_compile=config.train.jit_compile,
        grad_accum_steps=config.train.grad_accum_steps,
        min_loss_scale=config.precision.min_loss_scale, seed=config.seed,
        pruning=pruning.schedule_from_config(config.pruning,
                                             config.train.steps),
        workdir=workdir, watchdog=watchdog, skipping=skipping)
    if config.train.jit_compile and config.train.deterministic:
      trainer.step.check_compiles(_per_replica_spec(train, config, n))
    if own_step:
      _trace_own_step(trainer, _per_replica_spec(train, config, n),
                      config.precision.policy)
    callbacks = [*callbacks, *(methods.callbacks() if methods.callbacks
                               else ()),
                 *callbacks_lib.build_callbacks(config, workdir,
                                                testing=testing,
                                                metrics=trainer.train_metrics)]
  except BaseException:
    if watchdog:
      watchdog.close()
    raise
  return _Built(config=config, workdir=workdir, trainer=trainer, train=train,
                eval_fn=eval_fn, callbacks=callbacks, saved=saved,
                testing=testing, allow_config_change=allow_config_change,
                config_optimizer=methods.build_optimizer is None)


def _trace_own_step(trainer: Trainer, batch_spec,
                    policy: str) -> None:
  """Traces (runs nothing of) a task's own train_step on one replica's
  batch under the precision policy, so that an error in it is one line
  before anything is written.

  Raises:
    ConfigError: the step raises while traced (its first line, the policy
      named), or misuses `step` (trainer/step/context.py's own message).
  """
  try:
    trainer.step.zero_outputs(batch_spec)
  except ConfigError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    raise ConfigError(
        f"train_step failed when traced on a batch of "
        f"{tf.nest.map_structure(lambda s: tuple(s.shape), batch_spec)} "
        f"under precision.policy={policy}: {first_line(e)}") from None


def _checkpointer(built: _Built) -> Checkpointer:
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
                       if o is not trainer.optimizer})
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


def _train(built: _Built) -> RunResult:
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


def _report_finished(built: _Built, checkpointer: Checkpointer) -> RunResult:
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
