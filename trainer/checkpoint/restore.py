"""A finished run's model, rebuilt for inference (trainer/export/exporter.py).

WORKDIR/config.json -> the run's task (`task`, trainer/task.py; an older
config without `task` gets the default) -> `task.build_model()` under the
float32 policy (variables are float32 under every policy) <- the model's
variables from the latest checkpoint (not the optimizer, step or input
offset). Loading the task imports its module, so the custom objects it
registers resolve when a saved `.keras` is loaded in the same process.
"""

import contextlib
import dataclasses
import json
import os

import keras
import ml_collections
import tensorflow as tf

from trainer.checkpoint import model_state as model_state_lib
from trainer import config as config_lib
from trainer import task as task_lib
from trainer.errors import DataError, message_line


@dataclasses.dataclass(frozen=True)
class Restored:
  """A trained run rebuilt for export."""
  model: keras.Model  # float32, weights from `checkpoint`
  config: ml_collections.ConfigDict  # the run's resolved config
  task: object  # the run's task, built from `config.task`
  checkpoint: str  # the checkpoint path restored


@contextlib.contextmanager
def float32_policy():
  """The global Keras dtype policy float32 inside, the previous one after:
  models built, copied (quantization), saved and loaded here are float32
  whatever policy the process trained with."""
  previous = keras.config.dtype_policy()
  keras.config.set_dtype_policy("float32")
  try:
    yield
  finally:
    keras.config.set_dtype_policy(previous)


def restore(workdir: str) -> Restored:
  """Rebuilds the run's task and its model in float32, and restores the
  model from the latest checkpoint. Imports the task's module, so the
  custom objects it registers resolve when a saved `.keras` is loaded.

  Raises:
    ConfigError, DataError: no such run, a task that cannot be loaded, or a
      checkpoint that does not fit.
  """
  if not os.path.isdir(workdir):
    raise DataError(f"workdir {workdir} does not exist; pass the --workdir "
                    "of a finished `launch.train` run")
  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    raise DataError(f"{path} not found: {workdir} holds no training run; "
                    "train first with `python -m launch.train`")
  try:
    with open(path, encoding="utf-8") as f:
      config = config_lib.with_defaults(json.load(f))
  except (ValueError, OSError) as e:
    raise DataError(f"cannot read {path}: {e}") from None
  checkpoint = tf.train.latest_checkpoint(os.path.join(workdir, "checkpoints"))
  if checkpoint is None:
    raise DataError(f"no checkpoint in {workdir}/checkpoints; train (or "
                    "resume) the run until it saves one")
  task = task_lib.load_task(config.task, config)
  with float32_policy():
    # the main model of several (the first; a task with its own train_step)
    model = task_lib.main_model(
        task.build_model(),
        has_train_step=bool(task_lib.optional_methods(task).train_step))
    # a subclassed model makes its variables when called
    split = ("eval_data" if task_lib.has_evaluation(task) else
             "train_data")  # a task with its own step may not evaluate
    task_lib.build_variables(model, task_lib.examples(
        getattr(task, split)(), split, labels=split == "eval_data"))
  try:  # only the model: not the optimizer, step or input offset
    reader = tf.train.Checkpoint(
        model=model_state_lib.model_state(model, checkpoint))
    status = reader.restore(checkpoint).expect_partial()
    status.assert_existing_objects_matched()
  except (AssertionError, ValueError, tf.errors.OpError) as e:
    raise DataError(f"checkpoint {checkpoint} does not fit the model of "
                    f"{path}: {message_line(e)}") from None
  return Restored(model, config, task, checkpoint)
