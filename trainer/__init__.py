"""A strategy-aware training framework for TensorFlow 2 / Keras 3.

Public API:
  Trainer                                 trainer.fit.trainer
  run                                     trainer.run.run (config [, task]
                                          -> a trained run in a workdir)
  load_task                               trainer.task (your experiment)
  build_strategy, configure_cpu_devices   trainer.distribute.strategy
  set_policy                              trainer.optimize.precision
  layers (DenseLayer, ParametricSwish...) trainer.layers
  data (input_fn, load_source, Files,     trainer.data (one module per data
    load_digits)                          path)
  UserError, ConfigError, DataError       trainer.errors

Packages, from the top of the import order down (a package imports only
those below it; tests/test_layout.py pins it):
  run/          config -> a run in a workdir (build: checks, strategy, data,
                task, trainer; train: checkpoints, signals, recovery)
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

import importlib

# Loaded on first use (PEP 562), so that `import trainer.config` (a config
# file, the launcher checking flags) does not import TensorFlow.
_PUBLIC = {
    "ConfigError": "trainer.errors", "DataError": "trainer.errors",
    "UserError": "trainer.errors", "Files": "trainer.data",
    "input_fn": "trainer.data", "load_source": "trainer.data",
    "build_strategy": "trainer.distribute.strategy",
    "configure_cpu_devices": "trainer.distribute.strategy",
    "Trainer": "trainer.fit.trainer", "set_policy": "trainer.optimize.precision",
    "load_task": "trainer.task", "layers": "trainer.layers",
    "data": "trainer.data",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
  if name not in _PUBLIC:
    raise AttributeError(f"module 'trainer' has no attribute {name!r}")
  module = importlib.import_module(_PUBLIC[name])
  value = module if _PUBLIC[name] == f"trainer.{name}" else getattr(module,
                                                                      name)
  globals()[name] = value
  return value


def __dir__():
  return sorted(set(globals()) | set(_PUBLIC))
