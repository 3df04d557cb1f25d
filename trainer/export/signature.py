"""A model's serving signature: its own input and output names, dtypes, shapes.

The SavedModel's `serving_default` (and the TFLite signature converted from
it) takes one tensor per model input, named as the model names it: the key
of a dict input (`{"tokens": int32 [batch, 24]}`), else the `keras.Input`'s
name (`features`, `images`); a model without Keras inputs (subclassed) gets
the names of the data's x (dict keys, else `inputs`, `input_1`, ...). It
returns one tensor per model output: the key of a dict output, else the name
of the layer that computes it (`logits`, `prediction`), else `output_0`, ...
The batch dimension is None; the other dimensions and the dtypes are the
model's (for a model without Keras inputs, the data's).
"""

import dataclasses
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from trainer.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Signature:
  """Attributes:
    inputs: name -> TensorSpec [None, ...], in the model's flat input order.
    outputs: name -> TensorSpec [None, ...], in the model's flat output order.
    input_structure: the model's inputs as it takes them (a dict, list or
      single entry), each leaf the input's name.
    output_structure: the model's outputs likewise.
  """
  inputs: dict[str, tf.TensorSpec]
  outputs: dict[str, tf.TensorSpec]
  input_structure: Any
  output_structure: Any

  def named(self, x) -> dict[str, np.ndarray]:
    """The task's x (one batch) as {input name: array of its dtype}."""
    names = list(self.inputs)
    if isinstance(x, dict) and all(n in x for n in names):
      flat = [x[n] for n in names]
    else:
      flat = tf.nest.flatten(x)
      if len(flat) != len(names):
        raise ConfigError(f"the data's x has {len(flat)} arrays, the model "
                          f"{len(names)} inputs ({', '.join(names)})")
    return {n: np.asarray(a).astype(self.inputs[n].dtype.as_numpy_dtype,
                                    copy=False)
            for n, a in zip(names, flat)}

  def model_inputs(self, named: dict):
    """{input name: tensor} packed as the model takes its inputs."""
    return tf.nest.pack_sequence_as(
        self.input_structure,
        [named[n] for n in tf.nest.flatten(self.input_structure)])

  def pack_outputs(self, flat: list):
    """Outputs in the signature's order packed as the model returns them."""
    return tf.nest.pack_sequence_as(self.output_structure, flat)

  def describe(self) -> dict:
    """{"inputs": {name: {"dtype", "shape"}}, "outputs": ...} for a report."""
    spec = lambda s: {"dtype": s.dtype.name, "shape": s.shape.as_list()}
    return {"inputs": {n: spec(s) for n, s in self.inputs.items()},
            "outputs": {n: spec(s) for n, s in self.outputs.items()}}


def _keras_inputs(model: keras.Model):
  """The model's Keras inputs as it takes them, or None (subclassed)."""
  try:
    return model.input  # Functional: a KerasTensor, list or dict
  except (AttributeError, ValueError):
    inputs = getattr(model, "inputs", None)  # Sequential
    if not inputs:
      return None
    return inputs[0] if len(inputs) == 1 else list(inputs)


def _leaf_names(structure, names_of_leaves: list[str]):
  """`structure` with its leaves replaced by names: dict keys where it is a
  flat dict, else `names_of_leaves` in flat order."""
  if isinstance(structure, dict) and not any(
      isinstance(v, (dict, list, tuple)) for v in structure.values()):
    return {k: k for k in structure}
  return tf.nest.pack_sequence_as(structure, names_of_leaves)


def _unique(names: list[str], fallback: str) -> list[str]:
  if len(set(names)) == len(names) and all(names):
    return names
  return [f"{fallback}_{i}" for i in range(len(names))]


def _spec(shape, dtype, name: str) -> tf.TensorSpec:
  return tf.TensorSpec([None, *shape[1:]], tf.as_dtype(dtype), name=name)


def of_model(model: keras.Model, x, outputs) -> Signature:
  """The signature of `model`, which maps the batch `x` (as the task gives
  it) to `outputs` (as the model returns them, numpy)."""
  keras_inputs = _keras_inputs(model)
  source = x if keras_inputs is None else keras_inputs
  flat = tf.nest.flatten(source)
  if keras_inputs is not None:
    names = [t.name for t in flat]
  elif len(flat) == 1:
    names = ["inputs"]
  else:
    names = [f"input_{i}" for i in range(len(flat))]
  input_structure = _leaf_names(source, _unique(names, "input"))
  inputs = {n: _spec(a.shape, a.dtype, n) for n, a in zip(
      tf.nest.flatten(input_structure), flat)}

  flat_out = tf.nest.flatten(outputs)
  if isinstance(model, keras.Sequential):
    layer_names = [model.layers[-1].name]
  else:
    layer_names = list(getattr(model, "output_names", None) or [])
  if len(layer_names) != len(flat_out):
    layer_names = [f"output_{i}" for i in range(len(flat_out))]
  output_structure = _leaf_names(outputs, _unique(layer_names, "output"))
  return Signature(
      inputs=inputs,
      outputs={n: _spec(a.shape, a.dtype, n) for n, a in zip(
          tf.nest.flatten(output_structure), flat_out)},
      input_structure=input_structure, output_structure=output_structure)


def classes_reason(signature: Signature, class_names) -> str | None:
  """Why a model cannot have a `classify` signature for `class_names`
  (None when it can: one output of shape [batch, len(class_names)])."""
  if not class_names:
    return "the run has no data.class_names"
  shapes = [s.shape.as_list() for s in signature.outputs.values()]
  if len(shapes) != 1 or shapes[0][1:] != [len(class_names)]:
    return (f"the model's outputs {shapes} are not one [batch, "
            f"{len(class_names)}] score per class")
  return None


def write_saved_model(model: keras.Model, signature: Signature, path: str,
                      class_names=()) -> None:
  """A SavedModel whose `serving_default` maps {input name: tensor} to
  {output name: tensor} as `signature` says; with `class_names` (output i
  is class_names[i]) and a model of one [batch, classes] output, also
  `classify`: the same inputs to {"class_name": string [batch], the top
  class's name; "class_index": int64 [batch]; "scores": the output}."""

  def outputs_of(named):
    return tf.nest.flatten(model(signature.model_inputs(named),
                                 training=False))

  def serve(named):
    return dict(zip(signature.outputs, outputs_of(named)))

  archive = keras.export.ExportArchive()
  archive.track(model)
  archive.add_endpoint("serving_default", serve,
                       input_signature=[dict(signature.inputs)])
  if classes_reason(signature, class_names) is None:
    names = tf.constant([str(n) for n in class_names])

    def classify(named):
      scores = outputs_of(named)[0]
      index = tf.argmax(scores, axis=-1)
      return {"class_name": tf.gather(names, index), "class_index": index,
              "scores": scores}

    archive.add_endpoint("classify", classify,
                         input_signature=[dict(signature.inputs)])
  archive.write_out(path, verbose=False)
