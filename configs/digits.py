"""The offline default: the 8x8 digits (trainer/data/digits.csv.gz), a small MLP, 2 CPU cores.

  python -m launch.train --config=configs/digits.py --workdir=runs/digits
Reaches >= 95% eval accuracy in a few seconds on CPU.
"""

from trainer.config import default_config


def get_config():
  c = default_config()
  c.data.name = "digits"
  c.data.global_batch_size = 64
  c.data.eval_batch_size = 100
  c.model.name = "mlp"
  c.model.width = 128
  c.model.depth = 2
  c.optimizer.name = "adam"
  c.optimizer.learning_rate = 3e-3
  c.train.steps = 600
  c.train.steps_per_loop = 50
  c.train.steps_per_epoch = 100  # evaluates at every epoch end
  c.train.checkpoint_every = 200
  return c
