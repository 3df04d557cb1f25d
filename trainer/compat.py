"""Every private TensorFlow / Keras access of the trainer, in one place.

Each function says what it reaches into, why no public API does it, and
which versions it was checked on (TensorFlow 2.21, Keras 3.15; pyproject.toml
pins both, and the test named with each use fails if a new version moves
it). Nothing else in trainer/ touches a private name of either library.
"""

import functools
import inspect

import keras
import tensorflow as tf
from keras.src.backend.tensorflow import core as keras_tf_core
# pylint: disable=g-direct-tensorflow-import
from tensorflow.python.autograph.core import config as tf_autograph_config
from tensorflow.python.data.experimental.ops import distribute as tf_distribute
from tensorflow.python.distribute.cluster_resolver import (
    slurm_cluster_resolver as tf_slurm)
from tensorflow.python.framework import config as tf_config
# pylint: enable=g-direct-tensorflow-import

# The public SlurmClusterResolver (tf.distribute.cluster_resolver), from its
# module: its hostlist parsers below are only there (TF 2.21).
SlurmClusterResolver = tf_slurm.SlurmClusterResolver
expand_hostlist = tf_slurm.expand_hostlist
expand_tasks_per_node = tf_slurm.expand_tasks_per_node


def skip_autograph(package: str) -> None:
  """Autograph leaves the functions of `package` as they are when traced
  code calls them, as it does TensorFlow's and Keras' own
  (`tensorflow/python/autograph/core/config.py` CONVERSION_RULES; no public
  API adds a package). The trainer's graph code has no Python control flow
  on tensors outside the loops of its `tf.function`s (which autograph still
  converts: they are what tf.function was given), and converting it cost
  1.5 s of CPU in every process (84 functions, 23% of a --testing run of
  configs/digits.py). A user's functions called from it are converted by
  `converted` instead. Pinned by tests/test_step_keras_train_step.py (a user's
  loss and step with a Python `if` on a tensor still train)."""
  rules = tf_autograph_config.CONVERSION_RULES
  if not any(isinstance(r, tf_autograph_config.DoNotConvert) and
             r.matches(package) for r in rules):
    tf_autograph_config.CONVERSION_RULES = (
        tf_autograph_config.DoNotConvert(package),) + tuple(rules)


def converted(fn, *, ours: bool = False):
  """A user's callable (a loss, compute_loss, train_step) converted by
  autograph, as tf.function converts what it calls: a Python `if` on a
  tensor works. Functions of TensorFlow, Keras and the trainer need none
  (`skip_autograph`) and come back as they are (`ours=True`: a trainer
  function with a `for` over `tf.range`, converted), as do objects
  autograph cannot convert."""
  module = getattr(inspect.getmodule(fn), "__name__", "") or ""
  if not ours and module.split(".")[0] in ("tensorflow", "keras", "trainer"):
    return fn
  try:
    if inspect.ismethod(fn):  # to_graph gives the function, unbound
      return functools.partial(tf.autograph.to_graph(fn.__func__),
                               fn.__self__)
    return tf.autograph.to_graph(fn)
  except Exception:  # pylint: disable=broad-except
    return fn


skip_autograph("trainer")


def op_determinism_enabled() -> bool:
  """Whether `tf.config.experimental.enable_op_determinism()` is on; TF 2.21
  has no public getter, nor a public way to turn it off again
  (`disable_op_determinism`; trainer.run keeps it to its own run,
  tests/test_fit_input_bound.py)."""
  return tf_config.is_op_determinism_enabled()


def disable_op_determinism() -> None:
  tf_config.disable_op_determinism()


def shard_by_file(dataset: tf.data.Dataset, num_shards: int,
                  index: int) -> tf.data.Dataset:
  """TensorFlow 2.21's auto-shard rewrite (the one
  `experimental_distribute_dataset` applies) on one pipeline's dataset;
  no public API applies it to a dataset alone (tests/test_data_file_shard.py)."""
  return tf_distribute._AutoShardDataset(  # pylint: disable=protected-access
      dataset, num_shards, index, num_shards)


def all_layers(model: keras.Model) -> list:
  """Every layer inside `model`, nested ones included, not the model.

  Keras 3.15 has no public recursive listing (`model.layers` is the top
  level only). Used by the batch-norm statistics (tests/test_partial_
  batches.py), pruning (tests/test_optimize_pruning.py) and export's saveable check.
  """
  return list(model._flatten_layers(include_self=False))  # pylint: disable=protected-access


def dataset_inputs(dataset: tf.data.Dataset) -> list:
  """The datasets `dataset` is made from (its transformation's inputs).

  tf.data 2.21 has no public graph walk; used to find the batching of a
  task's dataset (tests/test_tasks.py, batched datasets).
  """
  return list(dataset._inputs())  # pylint: disable=protected-access


def serialized_graph(dataset: tf.data.Dataset) -> bytes:
  """The GraphDef of `dataset`, serialized, as the tf.data service sends it
  (TF 2.21; tests/test_data_service.py, pipelines the service refuses)."""
  return dataset._as_serialized_graph().numpy()  # pylint: disable=protected-access


def set_gradient_aggregation(optimizer, aggregate) -> bool:
  """Replaces Keras 3.15's all-reduce of gradients inside `apply` (the hook
  `_all_reduce_sum_gradients`) by `aggregate`; False if this Keras has no
  such hook. tests/test_step_builtin.py pins mirrored == one device."""
  if not hasattr(optimizer, "_all_reduce_sum_gradients"):
    return False
  optimizer._all_reduce_sum_gradients = aggregate  # pylint: disable=protected-access
  return True


def adam_slots(optimizer) -> tuple[list, list]:
  """(first moments, second moments) of a Keras 3.15 Adam, in the order
  of `optimizer_variable_index` (tests/test_step_builtin.py, the fused update)."""
  return optimizer._momentums, optimizer._velocities  # pylint: disable=protected-access


def optimizer_variable_index(optimizer, variable) -> int:
  """The position of `variable`'s slots in a Keras 3.15 optimizer."""
  return optimizer._get_variable_index(variable)  # pylint: disable=protected-access


def patch_keras_async_copy(copy_to_cpu) -> None:
  """Makes Keras 3.15's TF variables use `copy_to_cpu(self, object_map)` as
  their async-checkpoint host copy (Keras' own creates a new host variable
  on every save and fails from the second; tests/test_checkpoint_resume.py)."""
  keras_tf_core.Variable._copy_trackable_to_cpu = copy_to_cpu  # pylint: disable=protected-access


def copy_trackable_to_cpu(variable, object_map) -> None:
  """TensorFlow 2.21's host copy of one tf.Variable for async saves."""
  variable._copy_trackable_to_cpu(object_map)  # pylint: disable=protected-access


def take_async_save_error(checkpoint: tf.train.Checkpoint):
  """The error of `checkpoint`'s last async write, cleared (TensorFlow 2.21
  keeps it to re-raise at the next save or at exit); None if none
  (tests/test_checkpoint_disk_full.py)."""
  helper = getattr(checkpoint, "_async_checkpointer_impl", None)
  error = getattr(helper, "_async_error", None)
  if error is not None:
    helper._async_error = None  # pylint: disable=protected-access
  return error
