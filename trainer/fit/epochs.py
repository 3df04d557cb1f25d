"""The epoch and host loops of `Trainer.fit` (trainer/fit/trainer.py).

Per epoch: host loops of up to `steps_per_loop` steps (`Trainer.train_steps`),
cut at every `eval_every` step and every step a callback asks for
(`ends_loops_every`, e.g. checkpoints), the Keras callback hooks around each
with global logs, evaluation every `eval_every` steps and at the epoch end,
and after every hook the workers' agreement on stop, learning rate and
preemption (DESIGN.md fact 11).
"""

import keras

from trainer.callbacks.base import TrainerCallback, runs_on_chief_only
from trainer.callbacks.best_model import set_monitor_mode
from trainer.fit.plan import FitPlan
from trainer.fit.logs import (InputBoundWarning, check_diverged,
                                loss_scale_logs)


def run_epochs(trainer, train, plan: FitPlan, validation, *, eval_every: int,
               callbacks) -> keras.callbacks.History:
  """The epoch and host loops of `Trainer.fit` (see there) for `trainer`:
  callbacks, host loops of `train_steps`, evaluation, agreement between
  workers, early stops.

  What it uses of the Trainer, all public: `train_steps`, `distribute`,
  `agree_on_decisions`, `evaluate_with_callbacks`, `learning_rate`,
  `global_step`, `step` (`loss_scales`, `log_names`, `updates_metrics`),
  `model`, `optimizer(s)`, `train_metrics`, `steps_per_loop`,
  `min_loss_scale`, `is_chief`, `preempted`.
  """
  history = keras.callbacks.History()
  # Host loops end at these multiples of the global step (the same on
  # every worker: computed before chief-only callbacks are dropped).
  boundaries = [every for every in [eval_every, *(
      getattr(cb, "ends_loops_every", 0) for cb in callbacks)] if every > 0]
  callbacks = [cb for cb in callbacks
               if trainer.is_chief or not runs_on_chief_only(cb)] + [history]
  for cb in callbacks:
    if isinstance(cb, TrainerCallback):
      cb.set_trainer(trainer)
    set_monitor_mode(cb, trainer.train_metrics)
  trainer.model.optimizer = trainer.optimizer  # ReduceLROnPlateau and friends
  callback_list = keras.callbacks.CallbackList(
      callbacks, model=trainer.model, verbose=0, steps=plan.steps_per_epoch,
      epochs=plan.epochs, total_steps=plan.total_steps)
  distributed, iterator, exhausted = trainer.distribute(train), None, False
  logs: dict = {}
  eval_logs: dict = {}
  trainer.model.stop_training = False
  callback_list.on_train_begin()
  step = int(trainer.global_step.numpy())
  input_bound = InputBoundWarning()
  epoch = plan.first_epoch
  ended = False
  while (epoch < plan.epochs and not plan.done(step) and
         not (ended or trainer.model.stop_training or trainer.preempted)):
    epoch_start = plan.epoch_start(epoch, step)
    if iterator is None or plan.new_pass_each_epoch or exhausted:
      iterator = iter(distributed)
    epoch_end = plan.epoch_end(epoch_start)
    callback_list.on_epoch_begin(epoch)
    trainer.agree_on_decisions()
    window = trainer.epoch_window  # continued when restored mid-epoch
    window.start(epoch_start, step)
    examples, exhausted = 0, False  # examples of this call's loops
    while epoch_end is None or step < epoch_end:
      todo = trainer.steps_per_loop if epoch_end is None else min(
          trainer.steps_per_loop, epoch_end - step)
      for every in boundaries:
        todo = min(todo, every - step % every)
      callback_list.on_train_batch_begin(step - epoch_start)
      out = trainer.train_steps(iterator, todo, reset_metrics=False)
      exhausted = out["steps"] < todo
      if out["steps"] == 0:
        break
      input_bound.observe(out, step, int(trainer.global_step.numpy()))
      step = int(trainer.global_step.numpy())
      check_diverged(step, out, loss_scale_logs(  # before any callback
          trainer.step.loss_scales, len(trainer.optimizers) > 1),
                     trainer.min_loss_scale)
      window.add(out, trainer.step.log_names)
      examples += out["examples"]
      del out["loss_sum"]
      logs = {**out, "loop_loss": out["loss"], **window.means()}
      callback_list.on_train_batch_end(step - epoch_start - 1, logs)
      if (validation is not None and eval_every and step % eval_every == 0
          and not exhausted and (epoch_end is None or step < epoch_end)):
        eval_logs = trainer.evaluate_with_callbacks(callback_list, validation)
      trainer.agree_on_decisions()
      if exhausted or trainer.model.stop_training or trainer.preempted:
        break
    ended = exhausted and plan.run_ends_with_data
    if trainer.preempted or examples == 0:
      break  # mid-epoch preemption (the resumed run finishes the epoch),
      # or finite data that ran out exactly at the epoch boundary
    epoch_logs = {**window.means(),
                  **({m.name: float(m.result()) for m in trainer.train_metrics}
                     if trainer.step.updates_metrics else {}),
                  "learning_rate": trainer.learning_rate()}
    if validation is not None:
      eval_logs = trainer.evaluate_with_callbacks(callback_list, validation)
      epoch_logs.update({f"val_{k}": v for k, v in eval_logs.items()
                         if k != "num_examples"})
    callback_list.on_epoch_end(epoch, epoch_logs)
    trainer.agree_on_decisions()
    epoch += 1
  logs.update({f"eval/{k}": v for k, v in eval_logs.items()})
  callback_list.on_train_end(logs)
  history.last_logs = logs
  return history
