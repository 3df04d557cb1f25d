"""A strategy-aware training framework for TensorFlow 2 / Keras 3.

Public API:
  Trainer                                 trainer.fit.trainer
  run                                     trainer.run.run (config [, task]
                                          -> a trained run in a workdir)
  load_task                               trainer.task (your experiment)
  build_strategy, configure_cpu_devices   trainer.distribute.strategy
  set_policy                              trainer.optimize.precision
  layers (DenseLayer, ParametricSwish...) trainer.layers
  input_fn, load_source, Files            trainer.data (one module per data
                                          path)
  UserError, ConfigError, DataError       trainer.errors

Packages, from the top of the import order down (a package imports only
those below it; tests/test_layout.py pins it):
  run.py        config -> a run in a workdir (strategy, data, task, trainer,
                checkpoints, signals)
  fit/          the Trainer: fit, evaluate, predict, the host loop
  export/       a run's model for serving (SavedModel, .keras, TFLite)
  step/         the train step: built-in, a task's own, the optimizer update
  checkpoint/   save, resume, restore
  task.py       the experiment contract (your model, data, loss, metrics)
  tasks/        the built-in image classification and its models
  callbacks/    the Trainer's callbacks (metrics.jsonl, TensorBoard, ...)
  optimize/     optimizers, mixed precision, pruning
  config.py     every config key and its default
  distribute/   strategies, worker agreement, the stuck-worker watchdog
  data/         the data path: in memory, files, a task's pipeline, service
  layers/       custom layers that survive mixed precision and save/load
  errors.py     the errors a user sees as one line
  compat.py     every private TensorFlow / Keras access, with why
"""

from trainer import layers
from trainer.data import Files, input_fn, load_source
from trainer.distribute.strategy import build_strategy, configure_cpu_devices
from trainer.errors import ConfigError, DataError, UserError
from trainer.fit.trainer import Trainer
from trainer.optimize.precision import set_policy
from trainer.task import load_task

__all__ = ["ConfigError", "DataError", "Files", "Trainer", "UserError",
           "build_strategy", "configure_cpu_devices", "input_fn",
           "layers", "load_source", "load_task", "set_policy"]
