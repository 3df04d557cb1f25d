"""Serving signatures from a model's own inputs and outputs
(trainer/export/signature.py): names by dict key, by input and by layer."""

import keras
import numpy as np
import tensorflow as tf

from trainer.export import signature as signature_lib


def test_signature_names_dict_inputs_and_outputs_by_key():
  a = keras.Input((3,), name="a")  # Keras wants dict keys = input names
  b = keras.Input((5,), dtype="int32", name="b")
  hidden = keras.layers.Concatenate()([
      a, keras.layers.Embedding(10, 4)(b)[:, 0]])
  model = keras.Model({"a": a, "b": b}, {
      "score": keras.layers.Dense(1, name="head")(hidden),
      "classes": keras.layers.Dense(3, name="cls")(hidden)})
  x = {"a": np.ones((2, 3), np.float32), "b": np.ones((2, 5), np.int32)}
  outputs = tf.nest.map_structure(np.asarray, model(x))
  sig = signature_lib.of_model(model, x, outputs)
  assert {n: (s.dtype.name, s.shape.as_list()) for n, s in
          sig.inputs.items()} == {"a": ("float32", [None, 3]),
                                  "b": ("int32", [None, 5])}
  assert list(sig.outputs) == ["classes", "score"]
  assert sig.named({"b": x["b"], "a": x["a"]})["b"].dtype == np.int32


def test_signature_names_single_and_list_inputs_by_the_input_and_layer():
  a, b = keras.Input((3,), name="left"), keras.Input((3,), name="right")
  two = keras.Model([a, b], keras.layers.Dense(2, name="out")(
      keras.layers.Add()([a, b])))
  x = [np.ones((2, 3), np.float32)] * 2
  sig = signature_lib.of_model(two, x, np.asarray(two(x)))
  assert list(sig.inputs) == ["left", "right"] and list(sig.outputs) == [
      "out"]
  assert sig.model_inputs({"left": 1, "right": 2}) == [1, 2]

  class Subclassed(keras.Model):

    def __init__(self):
      super().__init__()
      self.dense = keras.layers.Dense(2)

    def call(self, x):
      return self.dense(x)

  model = Subclassed()
  x = np.ones((2, 3), np.float32)
  sig = signature_lib.of_model(model, x, np.asarray(model(x)))
  assert list(sig.inputs) == ["inputs"] and list(sig.outputs) == [
      "output_0"]
