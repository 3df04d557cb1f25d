"""CIFAR-10 (TFDS `cifar10`) with ResNet-20, SGD + momentum, cosine decay,
mixed precision on GPUs. Needs the dataset in data_dir."""

from trainer.config import default_config


def get_config():
  c = default_config()
  c.data.name = "cifar10"
  c.data.global_batch_size = 512
  c.data.eval_batch_size = 1000
  c.model.name = "resnet"
  c.model.width = 16
  c.model.depth = 3  # ResNet-20
  c.optimizer.name = "momentum"
  c.optimizer.learning_rate = 0.4
  c.optimizer.momentum = 0.9
  c.optimizer.schedule = "cosine"
  c.optimizer.warmup_steps = 500
  c.optimizer.global_clipnorm = 5.0
  c.train.steps = 20_000
  c.train.steps_per_loop = 100
  c.train.checkpoint_every = 2000
  c.precision.policy = "mixed_float16"
  c.data.in_memory = True  # fits in host memory: exact resume, global shuffle
  return c
