"""Build a run: every check of its input, then the strategy, data, task
and Trainer, with nothing written to the workdir (trainer/run/train.py
writes). Bad input raises a UserError here and nowhere later.
"""

import dataclasses
import os
from typing import Sequence

import keras
import ml_collections
import tensorflow as tf

from trainer import callbacks as callbacks_lib
from trainer import config as config_lib
from trainer import data as data_lib
from trainer import task as task_lib
from trainer.checkpoint.workdir import (check_resume_config,
                                        check_workdir_writable,
                                        fix_pruning_schedule,
                                        read_saved_config)
from trainer.data import bad_records
from trainer.distribute import strategy as strategy_lib
from trainer.distribute.watchdog import Watchdog
from trainer.errors import ConfigError, first_line
from trainer.fit.trainer import Trainer
from trainer.optimize import optimizers, precision, pruning


TESTING_STEPS = 6  # train steps in --testing mode
TESTING_EVAL_BATCHES = 4


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


def _per_replica_spec(train: task_lib.Examples,
                      config: ml_collections.ConfigDict, replicas: int):
  """The TensorSpec nest of one replica's training batch."""
  per_replica = config.data.global_batch_size // replicas
  return tf.nest.map_structure(
      lambda s: tf.TensorSpec([per_replica, *s.shape], s.dtype),
      train.dataset.element_spec)


@dataclasses.dataclass
class Built:
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


def build(config: ml_collections.ConfigDict, workdir: str | None, *,
           testing: bool, allow_config_change: bool,
           callbacks: Sequence[keras.callbacks.Callback], task) -> Built:
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
  return Built(config=config, workdir=workdir, trainer=trainer, train=train,
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
