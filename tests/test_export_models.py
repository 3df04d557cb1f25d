"""Export of models of every kind (launch.export, trainer/export/): a
format that cannot apply is skipped with its reason, a two-input two-output
model's signatures, subclassed models (quantized, built before a restore),
a Sequential saved under another name, converter errors that mean skip, and
a layer Keras cannot load back named with the fix.
"""

import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from tests.helpers.exports import train_and_export
from trainer import layers
from trainer.checkpoint import model_state as model_state_lib
from trainer.checkpoint import restore as restore_lib
from trainer.export import formats as export_formats
from trainer.export import signature as signature_lib

pytestmark = pytest.mark.filterwarnings(
    "ignore:.*tf.lite.Interpreter is deprecated:UserWarning")


ERF_TASK = '''
import keras

from configs import custom_dense


def get_config():
  c = custom_dense.get_config()
  c.task = "{path}:ErfTask"
  c.distribution.strategy = "one_device"
  c.precision.policy = "float32"
  return c


@keras.saving.register_keras_serializable(package="erf_task")
class ErfLayer(keras.layers.Layer):
  """erf(x) @ kernel: a layer Keras cannot quantize, an op TFLite lacks."""

  def build(self, input_shape):
    self.kernel = self.add_weight(shape=(input_shape[-1], 10), name="kernel")

  def call(self, x):
    return keras.ops.matmul(keras.ops.erf(x), self.kernel)


class ErfTask(custom_dense.CustomDenseTask):
  """custom_dense's data, loss and metric; a model of ErfLayer only."""

  def build_model(self):
    return keras.Sequential([keras.Input((self.user.features,),
                                         name="features"),
                             ErfLayer(name="erf")])
'''


@pytest.mark.slow
def test_formats_that_cannot_apply_are_skipped_with_the_reason(tmp_path):
  path = tmp_path / "erf_task.py"
  path.write_text(ERF_TASK.replace("{path}", str(path)))
  workdir = tmp_path / "run"
  proc, report = train_and_export(str(path), workdir)
  assert proc.returncode == 0, proc.stderr[-3000:]  # skips are not failures
  rows = report["formats"]
  assert "bytes" in rows["keras"] and "bytes" in rows["saved_model"]
  for fmt in ("keras_int8", "keras_float8", "keras_int4"):
    assert rows[fmt] == {"file": export_formats.FILES[fmt], "skipped": (
        f"model.quantize('{fmt[6:]}') found no layer to quantize (Keras "
        "quantizes Dense, EinsumDense and Embedding; other layers stay "
        "float)")}
  for fmt in ("tflite_float32", "tflite_float16", "tflite_dynamic_range",
              "tflite_int8"):
    assert rows[fmt]["skipped"].startswith(
        "TFLite has no built-in op for Erf"), rows
  assert sorted(os.listdir(workdir / "export")) == [
      "model.keras", "report.json", "saved_model"]
  table = proc.stdout.splitlines()
  assert sum(" skipped: " in line for line in table) == 7
  assert "failed" not in proc.stdout
  # The converter's own diagnostics ("error: failed while converting") do
  # not reach stderr: its error lines are for bad input only.
  assert not [line for line in proc.stderr.splitlines()
              if line.startswith("error:")], proc.stderr[-3000:]


def test_saved_model_and_tflite_compute_a_two_input_two_output_model(
    tmp_path):
  a = keras.Input((3,), name="values")
  b = keras.Input((4,), dtype="int32", name="ids")
  pooled = keras.ops.mean(keras.layers.Embedding(8, 3)(b), axis=1)
  hidden = keras.layers.Dense(4, name="hidden")(a + pooled)
  model = keras.Model({"values": a, "ids": b}, [
      keras.layers.Dense(2, name="logits")(hidden),
      keras.layers.Dense(1, name="score")(hidden)])
  rng = np.random.default_rng(0)
  x = {"values": rng.normal(size=(5, 3)).astype(np.float32),
       "ids": rng.integers(0, 8, size=(5, 4)).astype(np.int32)}
  reference = [np.asarray(t) for t in model(x)]
  sig = signature_lib.of_model(model, x, reference)
  assert list(sig.outputs) == ["logits", "score"]
  path = str(tmp_path / "saved_model")
  signature_lib.write_saved_model(model, sig, path)
  tflite = tmp_path / "model.tflite"
  tflite.write_bytes(export_formats.tflite_model(path, "float32"))
  for fmt, file, tolerance in (("saved_model", path, 1e-6),
                               ("tflite_float32", str(tflite), 1e-5)):
    got = export_formats.predictor(fmt, file, sig)(x)
    for out, ref in zip(got, reference):
      np.testing.assert_allclose(out, ref, atol=tolerance, err_msg=fmt)


def test_a_subclassed_model_is_quantized_if_it_saves_and_loads():

  class Unregistered(keras.Model):

    def __init__(self, **kwargs):
      super().__init__(**kwargs)
      self.dense = keras.layers.Dense(2, name="dense")

    def call(self, x):
      return self.dense(x)

  registered = keras.saving.register_keras_serializable(
      package="test_export_models")(type("Registered", (Unregistered,), {}))
  x = np.random.default_rng(0).normal(size=(4, 3)).astype(np.float32)
  model = registered()
  model(x)  # built, as a restored model is
  quantized, names = export_formats.quantize_keras(model, "int8")
  assert names == ["dense"]
  np.testing.assert_allclose(quantized(x), model(x), atol=0.05)
  with pytest.raises(export_formats.Skipped, match="neither be cloned nor "
                     "saved and loaded .*Could not locate class"):
    unregistered = Unregistered()
    unregistered(x)
    export_formats.quantize_keras(unregistered, "int8")


@pytest.mark.parametrize("message,reason", [
    ("...\nTF Select ops: Cumprod\nDetails: ...",
     "TFLite has no built-in op for Cumprod (it would need TF Select ops, "
     "the Flex delegate, at run time)"),
    ("...\nCustom ops: Erf, Erfinv\nDetails: ...",
     "TFLite has no op for Erf, Erfinv"),
    ("Quantization not yet supported for op: 'SIN'",
     "TFLite cannot quantize the op SIN to int8"),
    ("Given shapes, [8,4] and [0,4], are not broadcastable.", None),
])
def test_converter_errors_that_mean_skip(message, reason):
  assert export_formats.unsupported_ops(message) == reason



def test_restore_finds_a_sequential_model_saved_under_another_name(
    tmp_path):
  """An unnamed Sequential is `sequential` in a fresh process and
  `sequential_N` after others. Checkpoints key the model's variables by
  position, so it restores into the model under another name."""
  def build(name):
    return keras.Sequential([keras.Input((3,)), keras.layers.Dense(
        2, name="head")], name=name)

  trained = build("sequential")
  trained.get_layer("head").bias.assign([1.0, 2.0])
  new = tf.train.Checkpoint(model=model_state_lib.model_state(
      trained)).save(str(tmp_path / "new"))
  again = build("sequential_7")
  state = model_state_lib.model_state(again, new)
  assert sorted(state) == ["v0", "v1"]
  status = tf.train.Checkpoint(model=state).restore(new).expect_partial()
  status.assert_existing_objects_matched()
  np.testing.assert_array_equal(again.get_layer("head").bias, [1.0, 2.0])


SUBCLASSED_TASK = """
import keras

from configs import custom_dense


@keras.saving.register_keras_serializable(package="subclassed_task")
class TwoLayers(keras.Model):

  def __init__(self, **kwargs):
    super().__init__(**kwargs)
    self.hidden = keras.layers.Dense(8, activation="relu", name="hidden")
    self.head = keras.layers.Dense(10, name="head")

  def call(self, x):
    return self.head(self.hidden(x))


class SubclassedTask(custom_dense.CustomDenseTask):

  def build_model(self):
    return TwoLayers(name="two_layers")
"""


def test_a_subclassed_model_is_built_before_its_checkpoint_is_restored(
    tmp_path):
  """Its variables exist once it is called: restore() calls it on eval
  examples first, else it would restore nothing and export random weights."""
  from configs import custom_dense  # pylint: disable=import-outside-toplevel
  from trainer import task as task_lib  # pylint: disable=import-outside-toplevel
  task_file = tmp_path / "subclassed_task.py"
  task_file.write_text(SUBCLASSED_TASK)
  config = custom_dense.get_config()
  config.task = f"{task_file}:SubclassedTask"
  task = task_lib.load_task(config.task, config)
  trained = task.build_model()
  x = task.eval_data()[0]
  trained(x)
  run = tmp_path / "run"
  (run / "checkpoints").mkdir(parents=True)
  (run / "config.json").write_text(json.dumps(config.to_dict()))
  tf.train.Checkpoint(model=model_state_lib.model_state(trained)).save(
      str(run / "checkpoints" / "ckpt"))
  restored = restore_lib.restore(str(run))
  np.testing.assert_array_equal(restored.model(x), trained(x))
  sig = signature_lib.of_model(restored.model, x, np.asarray(trained(x)))
  assert list(sig.inputs) == ["inputs"] and list(sig.outputs) == ["output_0"]


def test_a_layer_keras_cannot_load_back_is_named_with_the_fix():
  """A plain custom layer (not registered): the .keras formats are one
  error naming the layer, its class and the fix (it was Keras'
  'Sequential could not be deserialized properly'); registered classes,
  Keras' own and the trainer's layers pass."""

  class Plain(keras.layers.Layer):
    def call(self, x):
      return x * 2.0

  model = keras.Sequential([keras.Input((3,)), Plain(name="doubled"),
                            keras.layers.Dense(2)])
  with pytest.raises(ValueError) as raised:
    export_formats.check_saveable(model)
  assert str(raised.value) == (
      "'doubled' (test_export_models.test_a_layer_keras_cannot_load_back_is_"
      "named_with_the_fix.<locals>.Plain) cannot be loaded back from a .keras"
      " file: decorate the class with @keras.saving.register_keras_"
      "serializable(package=...) and give it get_config() returning its "
      "constructor arguments")
  registered = keras.saving.register_keras_serializable(
      package="test_export_models")(type("Registered", (Plain,), {}))
  export_formats.check_saveable(keras.Sequential([
      keras.Input((3,)), registered(), layers.DenseLayer(2)]))
