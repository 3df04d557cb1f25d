"""The logs of one host loop, and the divergence check on them.

`host_loop_logs` turns what the Trainer's `tf.function` loop returned (the
step's `sum` and `last` outputs, trainer/step/builtin.py and trainer/step/context.py)
into the Python floats every callback sees; `check_diverged` reads them
before any callback does.
"""

import math

import tensorflow as tf
from absl import logging

from trainer.errors import TrainingDiverged


def loss_scale_logs(loss_scales: dict[str, tf.Variable],
                    several_optimizers: bool) -> dict[str, float]:
  """`loss_scale`, or `loss_scale/<optimizer>` with several optimizers ({}
  without loss scaling)."""
  if not several_optimizers:
    return {"loss_scale": float(v.numpy()) for v in loss_scales.values()}
  return {f"loss_scale/{n}": float(v.numpy()) for n, v in loss_scales.items()}


def host_loop_logs(out: dict, elapsed: float, *, several_optimizers: bool,
                   learning_rate: float) -> dict[str, float]:
  """`loss` (mean per example), `steps`, `examples`, `loss_sum`,
  `examples_per_sec`, `step_time` (s), `skipped_steps`, `input_wait` (the
  fraction of the loop spent waiting for input; absent when not measured,
  under op determinism), `learning_rate`,
  the step's `last` values (`grad_norm`...), and a task's own step's values
  (each averaged per example) and per-optimizer skip counts.

  Args:
    out: {"steps", "sum": {...}, "last": {...}, "input_wait": seconds} as
      numpy values.
    elapsed: seconds the loop took.
  """
  sums, steps = out["sum"], int(out["steps"])
  count = float(sums["count"])
  logs = {"loss": float(sums["loss_sum"] / max(count, 1.0)),
          "steps": steps, "examples": int(count),
          "loss_sum": float(sums["loss_sum"]),
          "examples_per_sec": count / elapsed,
          "step_time": elapsed / max(steps, 1),
          "skipped_steps": int(sums["skipped"]),
          "learning_rate": learning_rate}
  if "input_wait" in out:  # not measured under op determinism
    logs["input_wait"] = min(float(out["input_wait"]) / elapsed, 1.0)
  # A norm below 0: that optimizer made no update in this loop.
  logs.update({k: float(v) for k, v in out["last"].items()
               if not (k.startswith("grad_norm") and v < 0)})
  for key, value in sums.items():  # a task's own step (trainer/step/custom.py)
    if key.startswith("skipped/") and several_optimizers:
      logs[f"skipped_steps/{key[8:]}"] = int(value)
    elif key.startswith("log/"):
      logs[key[4:]] = float(value / max(count, 1.0))
  return logs


def check_diverged(step: int, logs: dict, scales: dict[str, float],
                   min_loss_scale: float) -> None:
  """Raises TrainingDiverged if the run can no longer make progress: a
  non-finite loss without loss scaling, or a loss scale (`scales`, from
  `loss_scale_logs`) below `min_loss_scale`."""
  if not scales:
    if not math.isfinite(logs["loss"]):
      raise TrainingDiverged(step, logs["loss"])
    return
  name, scale = min(scales.items(), key=lambda item: item[1])
  if scale < min_loss_scale:
    raise TrainingDiverged(step, logs["loss"], (
        f"the {name.replace('_', ' ')} fell to {scale:g}, below "
        f"precision.min_loss_scale={min_loss_scale:g}, by global step "
        f"{step} (loss {logs['loss']:g}): every step overflows in float16 "
        "and none is applied"))


INPUT_BOUND = 0.5  # a host loop that waits this much of its time for input


class InputBoundWarning:
  """Warns once per run when the train step waits for its input for at
  least INPUT_BOUND of three host loops in a row, from the third loop on
  (the first ones fill the pipeline's buffers and trace; one slow loop can
  be the machine)."""

  def __init__(self):
    self.loops = 0
    self.bound_in_a_row = 0
    self.warned = False

  def observe(self, logs: dict, first_step: int, last_step: int) -> None:
    self.loops += 1
    bound = self.loops >= 3 and logs.get("input_wait", 0.0) >= INPUT_BOUND
    self.bound_in_a_row = self.bound_in_a_row + 1 if bound else 0
    if self.warned or self.bound_in_a_row < 3:
      return
    self.warned = True
    logging.warning(
        "input-bound: the train step waited for its input %.0f%% of steps "
        "%d-%d (%.0f examples/s): the input pipeline cannot keep up; decode "
        "in parallel (map num_parallel_calls), read more files at once, or "
        "move decoding to the tf.data service (data.service)",
        100 * logs["input_wait"], first_step, last_step,
        logs["examples_per_sec"])
