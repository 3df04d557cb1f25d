"""ImageNet (TFDS `imagenet2012`, manual download) with ResNet-50 at 224x224,
mixed precision, for multi-GPU hosts and clusters."""

from trainer.config import default_config


def get_config():
  c = default_config()
  c.data.name = "imagenet2012"
  c.data.eval_split = "validation"
  c.data.image_size = 224
  c.data.num_classes = 1000
  c.data.global_batch_size = 1024
  c.data.eval_batch_size = 1024
  c.model.name = "resnet50"
  c.optimizer.name = "momentum"
  c.optimizer.learning_rate = 0.4  # 0.1 per 256 examples
  c.optimizer.momentum = 0.9
  c.optimizer.schedule = "cosine"
  c.optimizer.warmup_steps = 5 * 1250
  c.train.steps = 90 * 1250  # 90 epochs of 1.28M images
  c.train.steps_per_loop = 500
  c.train.checkpoint_every = 5000
  c.distribution.strategy = "auto"
  c.precision.policy = "mixed_float16"
  return c
