"""Slows a run down, loaded with `callbacks.custom=throttle:Throttle`.

Sleeps $THROTTLE_SECONDS (default 0.1) after every host loop, on every worker,
so that a short run lasts long enough to be preempted in the middle
(tests/test_launch_slurm.py).
"""

import os
import time

import keras


class Throttle(keras.callbacks.Callback):
  """Sleeps after each host loop of `steps_per_loop` steps."""

  def on_train_batch_end(self, batch, logs=None):
    time.sleep(float(os.environ.get("THROTTLE_SECONDS", "0.1")))
