"""Layers that work like any Keras layer, under mixed precision, across
replicas and through `model.save` / `keras.models.load_model` (safe mode).

  DenseLayer              dense.py: dense layer (kernel, bias, activation)
  squared_relu            activations.py: activation, "squared_relu"
  ParametricSwish         activations.py: x * sigmoid(beta * x), beta trained
  get_activation          activations.py: names -> functions (+ registered)
  l2_normalize            lambdas.py: registered function for Lambda layers
  lambda_layer            lambdas.py: a Lambda that will load in safe mode
  batch_normalization     normalization.py: BatchNormalization(synchronized=)
  synchronize_batch_norm  normalization.py: clone a model, synchronized BN

Everything is registered under the package name "trainer" (e.g.
"trainer>DenseLayer"); `import trainer` before `keras.models.load_model`.
"""

from trainer.layers.activations import ParametricSwish, squared_relu
from trainer.layers.activations import get as get_activation
from trainer.layers.dense import DenseLayer
from trainer.layers.lambdas import l2_normalize, lambda_layer
from trainer.layers.normalization import (batch_normalization,
                                          synchronize_batch_norm)

__all__ = ["DenseLayer", "ParametricSwish", "batch_normalization",
           "get_activation", "l2_normalize", "lambda_layer", "squared_relu",
           "synchronize_batch_norm"]
