"""The epoch so far: the window of every running mean a train log holds.

`train/loss`, the train metrics and a task's own step values in
`metrics.jsonl`, the callbacks' `logs`, the epoch line and `History` are all
means over the steps of the current epoch up to the logged step (Keras'
window). A resumed run continues that window where the checkpoint left it,
instead of starting a new mean at the resume step: the window is saved in
every checkpoint (trainer/checkpoint/checkpointer.py), as one JSON string.

JSON rather than variables: a task's step names its values only once traced
(after the restore), and a metric may create its variables lazily. Floats
survive the round trip exactly (`repr`), so a resumed run logs the same
numbers as one that was never stopped.
"""

import json

import numpy as np
import tensorflow as tf


class EpochWindow:
  """Running sums of the current epoch and the train metrics' state.

  Args:
    metrics: the train metrics (Keras metrics updated by the step); their
      state is reset with the window and saved with it.
  """

  def __init__(self, metrics):
    self.metrics = list(metrics)
    # The checkpoint's copy, written by `save_state` before each save.
    self.saved = tf.Variable("", dtype=tf.string, trainable=False,
                             name="epoch_window")
    self.first_step = 0
    self.loss_sum, self.examples, self.sums = 0.0, 0, {}

  def start(self, first_step: int, step: int) -> bool:
    """Starts the window of the epoch that began at global step
    `first_step`, now at `step`. Continues the restored window when it is
    that epoch's (a resumed run); else starts empty and resets the metrics.
    Returns True when it continued."""
    saved = json.loads(self.saved.numpy().decode() or "null")
    if (saved is not None and saved["first_step"] == first_step and
        step > first_step and len(saved["metrics"]) == len(self.metrics)):
      self._load(saved)
      return True
    self.first_step = first_step
    self.loss_sum, self.examples, self.sums = 0.0, 0, {}
    for metric in self.metrics:
      metric.reset_state()
    return False

  def _load(self, saved: dict) -> None:
    self.first_step = saved["first_step"]
    self.loss_sum, self.examples = saved["loss_sum"], saved["examples"]
    self.sums = dict(saved["sums"])
    for metric, values in zip(self.metrics, saved["metrics"]):
      if len(values) != len(metric.variables):
        metric.reset_state()  # not built when saved: it had seen nothing
        continue
      for variable, value in zip(metric.variables, values):
        variable.assign(np.asarray(value, dtype=variable.dtype))

  def add(self, loop_logs: dict, names) -> None:
    """Adds one host loop: its `loss_sum`, `examples` and the per-example
    means of the step's own values `names`."""
    self.loss_sum += loop_logs["loss_sum"]
    self.examples += loop_logs["examples"]
    for name in names:
      self.sums[name] = (self.sums.get(name, 0.0) +
                         loop_logs[name] * loop_logs["examples"])

  def means(self) -> dict[str, float]:
    """`loss` and the step's own values, per example over the window."""
    count = max(self.examples, 1)
    return {"loss": self.loss_sum / count,
            **{name: total / count for name, total in self.sums.items()}}

  def save_state(self) -> None:
    """Writes the window into the checkpoint's variable. On several workers
    every worker calls it (reading a metric is a collective)."""
    self.saved.assign(json.dumps({
        "first_step": self.first_step, "loss_sum": self.loss_sum,
        "examples": self.examples, "sums": self.sums,
        "metrics": [[np.asarray(v.numpy()).tolist() for v in m.variables]
                    for m in self.metrics]}))
