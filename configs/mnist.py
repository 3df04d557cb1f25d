"""MNIST (TFDS `mnist`) with the small CNN. Needs the dataset in data_dir."""

from trainer.config import default_config


def get_config():
  c = default_config()
  c.data.name = "mnist"
  c.data.global_batch_size = 256
  c.data.eval_batch_size = 1000
  c.model.name = "cnn"
  c.model.width = 32
  c.optimizer.name = "adam"
  c.optimizer.learning_rate = 1e-3
  c.optimizer.schedule = "cosine"
  c.optimizer.warmup_steps = 200
  c.train.steps = 5000
  c.train.steps_per_loop = 100
  c.train.checkpoint_every = 1000
  c.data.in_memory = True  # fits in host memory: exact resume, global shuffle
  return c
