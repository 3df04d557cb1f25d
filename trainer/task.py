"""The Task contract: a user's experiment, run by every entry point.

Config key `task` names it: `"package.module:Name"` (importable from the
working directory or PYTHONPATH) or `"path/to/file.py:Name"` (a file outside
any package, e.g. next to the config). `Name(config)` builds the task: a
class, or a function returning an object, with these methods:

  build_model() -> keras.Model          called inside strategy.scope(), under
                                        the precision policy; or {name:
                                        model} for train_step, the first
                                        the main one (evaluated, exported,
                                        pruned)
  train_data(), eval_data()             the examples, unbatched: a tuple of
                                        numpy arrays (x, y) or (x, y, w), x
                                        maybe a dict of arrays, files
                                        (trainer.data.Files: paths, a
                                        reader, a decode function), or a
                                        tf.data.Dataset of such elements
  build_losses(labels, model_outputs)   per-example loss, [batch] float32
                                        (not needed with compute_loss)
  build_metrics() -> [keras Metric]     fresh instances
optional:
  compute_loss(model, batch, training)  -> (per_example_loss [batch],
                                        predictions); replaces the forward
                                        pass + build_losses; `model` is what
                                        build_model() returned
  callbacks() -> [keras Callback]
  build_optimizer() -> keras Optimizer  else `optimizer.*` from the config;
                                        or {model name: optimizer}
  train_step(batch, step) -> {name: scalar}   your own step
                                        (trainer/step/context.py); the
                                        losses and metrics then evaluate.
                                        With it, train_data() may give x
                                        alone (no labels: a GAN), and
                                        eval_data() (then build_losses or
                                        compute_loss, build_metrics) may be
                                        left out: no evaluation

Its own settings live in the config's `user` section (never checked).
Everything here names the method that returned what, so a broken task is
one clear error line before anything is written.
"""

import dataclasses
import importlib
import importlib.util
import os
import re
import sys
import typing
from typing import Callable

import keras
import numpy as np
import tensorflow as tf

from trainer.data import files as files_lib
from trainer.data import pipeline
from trainer.data.files import Files
from trainer.errors import ConfigError, DataError, first_line


class Task(typing.Protocol):
  """The methods every task has (the module docstring says what each
  returns). `build_losses` may be left out when `compute_loss` is given."""

  def build_model(self) -> keras.Model | dict: ...

  def train_data(self): ...

  def eval_data(self): ...

  def build_losses(self, labels, model_outputs) -> tf.Tensor: ...

  def build_metrics(self) -> list: ...


@dataclasses.dataclass(frozen=True)
class OptionalMethods:
  """A task's optional methods, looked up once: each the bound method, or
  None where the task has none."""
  compute_loss: Callable | None = None
  callbacks: Callable | None = None
  build_optimizer: Callable | None = None
  train_step: Callable | None = None


REQUIRED = tuple(name for name in Task.__dict__
                 if not name.startswith("_") and callable(Task.__dict__[name]))
OPTIONAL = tuple(field.name for field in dataclasses.fields(OptionalMethods))


def optional_methods(task: Task) -> OptionalMethods:
  """The optional methods `task` has (the only place that looks)."""
  return OptionalMethods(**{name: getattr(task, name) for name in OPTIONAL
                            if callable(getattr(task, name, None))})


def _import_file(path: str, spec: str):
  """Imports the Python file `path` as a module (once per file)."""
  full = os.path.abspath(path)
  if not os.path.isfile(full):
    raise ConfigError(f"task {spec!r}: file {path!r} does not exist")
  stem = re.sub(r"\W", "_", os.path.splitext(os.path.basename(full))[0])
  name = f"trainer_task_{stem}"
  module = sys.modules.get(name)
  if module is not None and getattr(module, "__file__", None) == full:
    return module
  folder = os.path.dirname(full)
  if folder not in sys.path:  # so the file can import its neighbours
    sys.path.insert(0, folder)
  module_spec = importlib.util.spec_from_file_location(name, full)
  module = importlib.util.module_from_spec(module_spec)
  sys.modules[name] = module
  try:
    module_spec.loader.exec_module(module)
  except Exception:
    del sys.modules[name]
    raise
  return module


def load_task(spec: str, config):
  """Builds the task named by `spec` (`module:Name` or `file.py:Name`).

  Raises:
    ConfigError: the module, file or name is not found, or the task lacks a
      required method.
  """
  where, _, name = spec.rpartition(":")
  if not where or not name.isidentifier():
    raise ConfigError(f"task {spec!r} must look like 'package.module:Name' or "
                      "'path/to/file.py:Name'")
  if where.endswith(".py") or os.sep in where:
    module = _import_file(where, spec)
  else:
    try:
      module = importlib.import_module(where)
    except ImportError as e:
      raise ConfigError(f"task {spec!r}: cannot import {where!r} ({e}); is it "
                        "on PYTHONPATH, or give its file: "
                        "'path/to/file.py:Name'") from None
  factory = getattr(module, name, None)
  if factory is None:
    raise ConfigError(f"task {spec!r}: {where} has no {name!r}")
  task = factory(config)
  check_methods(task, f"task {spec!r}")
  return task


def spec_of(task) -> str:
  """The `task` config value that loads `task`'s class again in another
  process: `module:Name`, or `path/file.py:Name` for a task file."""
  module = sys.modules.get(type(task).__module__)
  where = type(task).__module__
  if where.startswith("trainer_task_") and getattr(module, "__file__", None):
    where = module.__file__
  return f"{where}:{type(task).__qualname__}"


def has_evaluation(task) -> bool:
  """Whether `task` evaluates: it has eval_data() (a task with its own
  train_step may leave it out)."""
  return callable(getattr(task, "eval_data", None))


def metrics_of(task) -> Callable[[], list]:
  """`task.build_metrics`, or no metrics for a task with its own
  train_step that has none."""
  build = getattr(task, "build_metrics", None)
  return build if callable(build) else list


def check_methods(task, what: str) -> None:
  """Raises ConfigError naming the required methods `task` lacks."""
  missing = [m for m in REQUIRED if not callable(getattr(task, m, None))]
  methods = optional_methods(task)
  if "build_losses" in missing and methods.compute_loss:
    missing.remove("build_losses")  # compute_loss gives the losses
  if methods.train_step:
    # Its own step trains: evaluation (eval_data and what it needs) is
    # optional, but eval_data needs a loss.
    optional = ["build_metrics", "eval_data"] + (
        [] if has_evaluation(task) else ["build_losses"])
    missing = [m for m in missing if m not in optional]
  if missing:
    raise ConfigError(
        f"{what}: {type(task).__name__} has no method "
        f"{', '.join(missing)}; a task has {', '.join(REQUIRED)} "
        f"(and optionally {', '.join(OPTIONAL)})")


@dataclasses.dataclass(frozen=True)
class Examples:
  """One split of a task's data, unbatched.

  Attributes:
    dataset: the examples as a tf.data.Dataset of (x, y) or (x, y, w).
    arrays: the same as a nest of numpy arrays [N, ...] when the task gave
      arrays: then training is addressed by step (exact resume, no replay).
    size: the number of examples, or None when the dataset does not say.
    files: the same as `trainer.data.Files` when the task gave files: then
      each worker decodes only its own and a resume seeks (no replay).
  """
  dataset: tf.data.Dataset
  arrays: tuple | None
  size: int | None
  files: Files | None = None


def _is_arrays(value) -> bool:
  """An array, or a dict of them: x alone."""
  if isinstance(value, dict):
    return bool(value) and all(_is_arrays(v) for v in value.values())
  return isinstance(value, np.ndarray) or tf.is_tensor(value)


def examples(value, method: str, *, labels: bool = True) -> Examples:
  """Checks what `method` (train_data, eval_data) returned; `labels=False`
  (a task with its own train_step) also takes x alone: an array, a dict of
  arrays, or a Dataset of any elements, handed to train_step as they are.

  Raises:
    DataError: not arrays (x, y[, w]) or a Dataset of such elements, or
      arrays of different lengths.
  """
  what = f"{method}() returned"
  if isinstance(value, Files):
    dataset = files_lib.ordered(value)
    if labels:
      _check_elements(dataset.element_spec,
                      f"{what} Files whose decode gives")
    counts = value.record_counts
    return Examples(dataset, None,
                    None if counts is None else int(sum(counts)), files=value)
  if isinstance(value, tf.data.Dataset):
    value = pipeline.unbatched(value, what)
    if labels:
      _check_elements(value.element_spec, f"{what} a Dataset of")
    cardinality = int(value.cardinality())
    if cardinality == 0:
      raise DataError(f"{what} a Dataset with no examples")
    return Examples(value, None, cardinality if cardinality >= 0 else None)
  if not labels and _is_arrays(value):
    return _x_alone(value, what)
  if not isinstance(value, (tuple, list)) or len(value) not in (2, 3):
    if _is_arrays(value):
      raise DataError(
          f"{what} {type(value).__name__} (x alone, no labels); return "
          "numpy arrays (x, y) or (x, y, sample_weight), or give the task "
          "its own train_step(batch, step), which may take x alone")
    raise DataError(f"{what} {type(value).__name__}; return numpy arrays "
                    "(x, y) or (x, y, sample_weight), or a tf.data.Dataset")
  try:
    arrays = tuple(tf.nest.map_structure(np.asarray, part) for part in value)
  except (TypeError, ValueError) as e:
    raise DataError(f"{what} something that is not arrays ({e})") from None
  lengths = {label: _rows(part, label, what)
             for label, part in zip(("x", "y", "sample_weight"), arrays)}
  if len(set(lengths.values())) != 1:
    detail = ", ".join(f"{k} with {v}" for k, v in lengths.items())
    raise DataError(f"{what} {detail} examples; x, y (and sample_weight) "
                    "must have one row per example each")
  size = lengths["x"]
  if size == 0:
    raise DataError(f"{what} no examples")
  return Examples(tf.data.Dataset.from_tensor_slices(arrays), arrays, size)


def _rows(part, label: str, what: str) -> int:
  """The rows of `part` (x, y or sample_weight: an array or a nest of
  them), which must all have the same number of rows."""
  if any(a.ndim == 0 for a in tf.nest.flatten(part)):
    raise DataError(f"{what} a scalar as {label}; return arrays with one "
                    "row per example: (x, y) or (x, y, sample_weight)")
  sizes = {len(a) for a in tf.nest.flatten(part)}
  if len(sizes) != 1:
    raise DataError(f"{what} {label} whose arrays have different lengths "
                    f"{sorted(sizes)}; every array holds one row per "
                    "example")
  return sizes.pop()


def _x_alone(x, what: str) -> Examples:
  """Examples of x alone (an array or a dict of arrays), no labels."""
  x = tf.nest.map_structure(np.asarray, x)
  size = _rows(x, "x", what)
  if size == 0:
    raise DataError(f"{what} no examples")
  return Examples(tf.data.Dataset.from_tensor_slices(x), x, size)


def _check_elements(spec, what: str) -> None:
  if not isinstance(spec, tuple) or len(spec) not in (2, 3):
    raise DataError(f"{what} {spec}; its elements must be (x, y) or (x, y, "
                    "sample_weight), unbatched")


def first_batch(train: Examples):
  """The first 2 examples as a batch (DataError if there are none)."""
  try:
    return next(iter(train.dataset.batch(2)))
  except StopIteration:
    raise DataError("train_data() returned a Dataset with no examples"
                    ) from None


def main_model(built, *, has_train_step: bool) -> keras.Model:
  """The model build_model() returned, or the first of a dict of them (a
  task with its own train_step may have several).

  Raises:
    ConfigError: not a keras.Model (or a dict of them), a dict without a
      train_step, or a model in the dict without variables.
  """
  if isinstance(built, dict):
    if not has_train_step:
      raise ConfigError(f"build_model() returned {len(built)} models "
                        f"({', '.join(built)}); several models need the "
                        "task's own train_step(batch, step)")
    if not built:
      raise ConfigError("build_model() returned an empty dict")
    for name, model in built.items():
      if not isinstance(model, keras.Model):
        raise ConfigError(f"build_model() returned {type(model).__name__} "
                          f"as {name!r}, not a keras.Model")
      if not model.variables:
        raise ConfigError(f"build_model(): model {name!r} has no variables "
                          "yet; give it a keras.Input or call it once")
    return next(iter(built.values()))
  if not isinstance(built, keras.Model):
    raise ConfigError(f"build_model() returned {type(built).__name__}, not a "
                      "keras.Model")
  return built


def build_variables(model, train: Examples) -> None:
  """Calls a model that has no variables yet (a subclassed model makes them
  when first called) on 2 training examples; call inside strategy.scope()
  so its variables are the strategy's."""
  if isinstance(model, keras.Model) and not model.variables:
    batch = first_batch(train)
    x = batch[0] if isinstance(batch, tuple) else batch
    try:
      model(x, training=False)
    except Exception as e:  # pylint: disable=broad-except
      raise ConfigError(
          "the model from build_model() does not take x from train_data() "
          f"(2 examples): {first_line(e)}") from None


def check_task(task, model: keras.Model, train: Examples, *,
               compute_loss=None, method: str = "train_data") -> None:
  """Runs the model, the loss and the metrics on 2 examples of `train` (what
  `method` returned), eagerly and before anything is written, so a task
  whose pieces do not fit is one error naming the method, not a traceback
  from inside a traced step.

  Raises:
    ConfigError: build_model() did not return a Keras model, the model does
      not take the examples, build_losses (or compute_loss) fails or does not
      return [batch], or a metric from build_metrics() fails on them.
  """
  main = main_model(model,
                    has_train_step=bool(optional_methods(task).train_step))
  batch = first_batch(train)
  x, y, _ = keras.utils.unpack_x_y_sample_weight(batch)
  shape = lambda t: tf.nest.map_structure(lambda a: tuple(a.shape), t)
  if compute_loss is not None:
    step = "compute_loss(model, batch, training=False)"
    try:
      per_example, outputs = compute_loss(model, batch, False)
    except Exception as e:  # pylint: disable=broad-except
      raise ConfigError(f"{step} failed on 2 examples of {method}(): "
                        f"{first_line(e)}") from None
  else:
    try:
      outputs = main(x, training=False)
    except Exception as e:  # pylint: disable=broad-except
      raise ConfigError(
          f"the model from build_model() does not take x from {method}() "
          f"(2 examples, shape {shape(x)}): {first_line(e)}") from None
    step = (f"build_losses(labels {shape(y)}, model_outputs "
            f"{shape(outputs)})")
    try:
      per_example = task.build_losses(y, outputs)
    except Exception as e:  # pylint: disable=broad-except
      raise ConfigError(f"{step} failed: {first_line(e)}; do the model's "
                        "outputs fit the labels?") from None
  rows = len(tf.nest.flatten(y)[0])
  got = tuple(getattr(per_example, "shape", ()))
  if got != (rows,):
    raise ConfigError(f"{step} returned shape {got} for {rows} examples; it "
                      "must return one loss per example, shape [batch] (for "
                      "a Keras loss use reduction='none')")
  for metric in metrics_of(task)():
    try:
      metric.update_state(y, tf.nest.map_structure(
          lambda t: tf.cast(t, tf.float32), outputs))
    except Exception as e:  # pylint: disable=broad-except
      raise ConfigError(f"metric {metric.name!r} from build_metrics() fails "
                        f"on labels {shape(y)} and model outputs "
                        f"{shape(outputs)}: {first_line(e)}") from None

