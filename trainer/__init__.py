"""A strategy-aware training framework for TensorFlow 2 / Keras 3.

Public API:
  build_strategy, configure_cpu_devices   trainer.strategy
  set_policy                              trainer.precision
  Trainer                                 trainer.loop
  layers (DenseLayer, ParametricSwish...) trainer.layers
  input_fn, load_source, Files            trainer.data (a package: one
                                          module per data path)
  run                                     trainer.run.run (config [, task]
                                          -> a trained run in a workdir)
  load_task                               trainer.task (your experiment)
  UserError, ConfigError, DataError       trainer.errors
"""

from trainer import layers
from trainer.data import Files, input_fn, load_source
from trainer.errors import ConfigError, DataError, UserError
from trainer.loop import Trainer
from trainer.precision import set_policy
from trainer.task import load_task
from trainer.strategy import build_strategy, configure_cpu_devices

__all__ = ["ConfigError", "DataError", "Files", "Trainer", "UserError",
           "build_strategy", "configure_cpu_devices", "input_fn",
           "layers", "load_source", "load_task", "set_policy"]
