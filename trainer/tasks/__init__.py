"""The built-in experiments: image classification on the models of
models.py (MODELS: mlp, cnn, resnet, resnet50). A task like any user's.

May import: trainer.data, trainer.layers, trainer.errors.
"""
