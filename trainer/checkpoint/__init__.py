"""Checkpoints, resume and restore.

  checkpointer.py  Checkpointer (save, restore, keep N, preemption save) and
                   CheckpointEvery, the callback that saves every N steps
  model_state.py   the model's checkpoint keys (by position and by path)
  restore.py       restore(workdir): a finished run's model for inference
  workdir.py       may this config resume this workdir? (changed keys)

May import: trainer.task, trainer.callbacks, trainer.optimize, trainer.config,
trainer.errors. Never trainer.fit, trainer.step or trainer.run.
"""
