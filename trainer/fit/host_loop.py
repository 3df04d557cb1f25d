"""One host loop: up to N train steps inside one `tf.function` call.

A `tf.range` loop (as in Orbit's `utils/loop_fns.py`): each iteration takes
the next per-replica batch (ending early when a finite input runs out) and
runs the step (trainer/step/builtin.py or custom.py). The step's `sum`
outputs are added up over the loop and its `last` ones kept from the last
step, so the host reads one small dict per loop, not per step.
"""

import tensorflow as tf

from trainer import compat


def host_loop(step, strategy: tf.distribute.Strategy, iterator,
              num_steps: tf.Tensor) -> dict:
  """Up to `num_steps` (int64 scalar) steps of `step` on batches of
  `iterator` (a distributed iterator or a dataset iterator).

  Returns {"steps": int64 steps taken, "sum": {name: summed output},
  "last": {name: output of the last step}, and "input_wait": float64
  seconds blocked on the input (not under op determinism, which refuses
  `tf.timestamp`)}. Call it converted by autograph (its loop is a Python
  `for` over `tf.range`): `compat.converted(host_loop, ours=True)`.
  """
  with strategy.scope():
    steps = tf.constant(0, tf.int64)
    zeros = step.zero_outputs(iterator.element_spec)
    sums, last = zeros["sum"], zeros["last"]
    timed = not compat.op_determinism_enabled()
    waited = tf.constant(0.0, tf.float64)
    for i in tf.range(num_steps):
      if timed:
        asked = tf.timestamp()
        with tf.control_dependencies([asked]):
          optional = iterator.get_next_as_optional()
        has_value = optional.has_value()
        with tf.control_dependencies([has_value]):
          waited += tf.timestamp() - asked
      else:
        optional = iterator.get_next_as_optional()
        has_value = optional.has_value()
      if not has_value:
        break
      is_last = tf.equal(i, num_steps - 1)  # norms are logged for it only
      out = step(optional.get_value(), want_norm=is_last)
      steps += 1
      sums = {k: sums[k] + v for k, v in out["sum"].items()}
      # `last_if`: a value kept from the last step that made it (an update
      # with `when`), else from the loop's last step.
      made = out.get("last_if", {})
      last = {k: tf.where(made.get(k, is_last), v, last[k])
              for k, v in out["last"].items()}
  out = {"steps": steps, "sum": sums, "last": last}
  if timed:
    out["input_wait"] = waited
  return out
