"""Models by name (`model.name`). Every model ends in a float32 logits layer,
so predictions and losses are float32 under every precision policy.

Shapes: input `images` [batch, *DataInfo.input_shape] float32, output
`logits` [batch, num_classes] float32 (the names an exported SavedModel's
signature takes from the model).
"""

from typing import Callable

import keras
import ml_collections

from trainer import layers
from trainer.data import DataInfo
from trainer.errors import ConfigError


INPUT_NAME = "images"


def _images(info: DataInfo) -> keras.KerasTensor:
  return keras.Input(info.input_shape, name=INPUT_NAME)


def _logits(x, num_classes):
  return keras.layers.Dense(num_classes, dtype="float32", name="logits")(x)


def mlp(cfg: ml_collections.ConfigDict, info: DataInfo) -> keras.Model:
  """Flatten, `depth` x DenseLayer(`width`, relu), logits.

  The hidden layers are `trainer.layers.DenseLayer`, numerically the same as
  `keras.layers.Dense` (same initializers, ops and variable paths).
  """
  inputs = _images(info)
  x = keras.layers.Flatten()(inputs)
  for i in range(cfg.depth):
    x = layers.DenseLayer(cfg.width, activation="relu", name=f"dense_{i}")(x)
    if cfg.dropout:
      x = keras.layers.Dropout(cfg.dropout)(x)
  return keras.Model(inputs, _logits(x, info.num_classes), name="mlp")


def cnn(cfg: ml_collections.ConfigDict, info: DataInfo) -> keras.Model:
  """Two conv blocks (`width`, 2*`width` filters), global pooling, logits."""
  inputs = _images(info)
  x = inputs
  for i, filters in enumerate((cfg.width, 2 * cfg.width)):
    x = keras.layers.Conv2D(filters, 3, padding="same", activation="relu",
                            name=f"conv_{i}a")(x)
    x = keras.layers.Conv2D(filters, 3, padding="same", activation="relu",
                            name=f"conv_{i}b")(x)
    if min(x.shape[1:3]) >= 4:
      x = keras.layers.MaxPooling2D()(x)
  x = keras.layers.GlobalAveragePooling2D()(x)
  if cfg.dropout:
    x = keras.layers.Dropout(cfg.dropout)(x)
  return keras.Model(inputs, _logits(x, info.num_classes), name="cnn")


def _bn(sync_bn, name=None):
  return layers.batch_normalization(synchronized=sync_bn, name=name)


def _residual_block(x, filters, stride, name, sync_bn):
  shortcut = x
  y = keras.layers.Conv2D(filters, 3, stride, padding="same", use_bias=False,
                          name=f"{name}_conv1")(x)
  y = _bn(sync_bn, f"{name}_bn1")(y)
  y = keras.layers.ReLU()(y)
  y = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False,
                          name=f"{name}_conv2")(y)
  y = _bn(sync_bn, f"{name}_bn2")(y)
  if stride != 1 or shortcut.shape[-1] != filters:
    shortcut = keras.layers.Conv2D(filters, 1, stride, use_bias=False,
                                   name=f"{name}_proj")(shortcut)
    shortcut = _bn(sync_bn, f"{name}_bn_proj")(shortcut)
  return keras.layers.ReLU()(keras.layers.Add()([y, shortcut]))


def resnet(cfg: ml_collections.ConfigDict, info: DataInfo) -> keras.Model:
  """CIFAR-style ResNet (He et al. 2016): 3 stages of `depth` basic blocks
  with `width`, 2*`width`, 4*`width` filters; depth=3 is ResNet-20.

  `sync_batch_norm`: every BatchNormalization layer is cross-replica.
  """
  inputs = _images(info)
  # Every layer with variables is named: checkpoints key variables by path,
  # and Keras' automatic names depend on what the process built before. The
  # stem keeps the names a fresh process gave it, so older checkpoints load.
  x = keras.layers.Conv2D(cfg.width, 3, padding="same", use_bias=False,
                          name="conv2d")(inputs)
  x = keras.layers.ReLU()(_bn(cfg.sync_batch_norm, "batch_normalization")(x))
  for stage in range(3):
    for block in range(cfg.depth):
      stride = 2 if stage > 0 and block == 0 else 1
      x = _residual_block(x, cfg.width * 2**stage, stride,
                          f"stage{stage}_block{block}", cfg.sync_batch_norm)
  x = keras.layers.GlobalAveragePooling2D()(x)
  return keras.Model(inputs, _logits(x, info.num_classes), name="resnet")


def resnet50(cfg: ml_collections.ConfigDict, info: DataInfo) -> keras.Model:
  """Keras' ResNet-50 backbone (random init) with a float32 logits head.

  `sync_batch_norm`: the backbone is cloned with every BatchNormalization
  layer cross-replica (same layer names, fresh random weights).
  """
  if min(info.input_shape[:2]) < 32:
    raise ConfigError(f"resnet50 needs images of at least 32x32, got "
                      f"{info.input_shape}; set --config.data.image_size=32 "
                      "or larger")
  backbone = keras.applications.ResNet50(
      include_top=False, weights=None, input_tensor=_images(info),
      pooling="avg")
  if cfg.sync_batch_norm:
    backbone = layers.synchronize_batch_norm(backbone)
  return keras.Model(backbone.input,
                     _logits(backbone.output, info.num_classes),
                     name="resnet50")


MODELS: dict[str, Callable[[ml_collections.ConfigDict, DataInfo],
                           keras.Model]] = {
    "mlp": mlp, "cnn": cnn, "resnet": resnet, "resnet50": resnet50}


def build_model(cfg: ml_collections.ConfigDict, info: DataInfo) -> keras.Model:
  """The model named by `cfg.name`; call inside `strategy.scope()`."""
  if cfg.name not in MODELS:
    raise ConfigError(f"unknown model.name {cfg.name!r}; use one of: "
                      f"{', '.join(MODELS)}")
  return MODELS[cfg.name](cfg, info)
