"""Optimizers and model optimization: mixed precision and pruning.

  optimizers.py  build_optimizer from the config, loss scaling, the fused
                 Adam/SGD update
  precision.py   set_policy (float32, mixed_float16, mixed_bfloat16)
  pruning.py     magnitude pruning: schedule, masks, sparsity

May import: trainer.config, trainer.errors.
"""
