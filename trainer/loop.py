"""The Trainer: the outer training loop, evaluation, and the Python API.

`train_steps` runs `steps_per_loop` train steps per host call: a `tf.range`
loop inside one `tf.function` (as in Orbit's loop_fns), each step a
`strategy.run` of the per-replica step in trainer/step.py. A finite dataset
ends the loop early; a partial last batch is averaged over its real size.
"""

import math
import time
from typing import Callable, Sequence

import keras
import tensorflow as tf

from trainer import precision
from trainer.pruning import Pruner, PruningSchedule
from trainer.agreement import WorkerAgreement
from trainer.errors import TrainingDiverged
from trainer.callbacks.base import TrainerCallback, runs_on_chief_only
from trainer.strategy import is_chief, num_workers
from trainer.step import (ComputeLoss, TrainStep, call_nonempty,
                          make_compute_loss)

DatasetLike = tf.data.Dataset | Callable[[tf.distribute.InputContext],
                                         tf.data.Dataset]


def _clone_metric(metric: keras.metrics.Metric) -> keras.metrics.Metric:
  return metric.__class__.from_config(metric.get_config())


def _resolve_loss(loss) -> Callable:
  """A per-example loss callable from a name, a Keras loss or a function."""
  if isinstance(loss, str):
    return keras.losses.get({"class_name": loss,
                             "config": {"reduction": "none"}})
  if isinstance(loss, keras.losses.Loss) and loss.reduction != "none":
    raise ValueError(f"the loss {loss.name!r} reduces with "
                     f"{loss.reduction!r}; create it with reduction='none' so "
                     "the trainer can average over the global batch")
  return loss


class Trainer:
  """Trains a Keras model under a tf.distribute strategy.

  Args:
    model: a Keras model created inside `strategy.scope()`.
    optimizer: a Keras optimizer. One created outside the scope is re-created
      inside it from its config; read the one in use from `trainer.optimizer`.
      Under the `mixed_float16` policy it is wrapped in LossScaleOptimizer.
    loss: a per-example loss `(y_true, y_pred) -> [batch]`, a Keras loss with
      reduction='none', or a Keras loss class name such as
      "SparseCategoricalCrossentropy" (then from_logits is False).
    compute_loss: instead of `loss`, the whole per-replica forward pass:
      `(model, batch, training) -> (per_example_loss [batch], y_pred)`.
    metrics: Keras metrics, updated with (y_true, y_pred); cloned inside the
      scope for training and for evaluation.
    strategy: defaults to the current `tf.distribute.get_strategy()`.
    steps_per_loop: train steps per `tf.function` call.
    global_clipnorm: clip the all-reduced gradient to this norm (0 = off).
    jit_compile: XLA-compile each replica's forward and backward pass.
    grad_accum_steps: split each replica's batch into this many micro-batches
      run one after another, one update per global batch (gradient
      accumulation: the same update with 1/k of the activation memory).
    pruning: magnitude pruning of the model's kernels on this schedule
      (`trainer.pruner` holds the masks; logs gain `sparsity`).
    min_loss_scale: under mixed_float16, the run has diverged (fit raises
      TrainingDiverged) when the loss scale falls below this: steps keep
      overflowing at a scale that no longer amplifies the gradients, so
      none is applied.
  """

  def __init__(self, *, model: keras.Model, optimizer, loss=None,
               compute_loss: ComputeLoss | None = None,
               metrics: Sequence[keras.metrics.Metric] = (),
               strategy: tf.distribute.Strategy | None = None,
               steps_per_loop: int = 1, global_clipnorm: float = 0.0,
               jit_compile: bool = False, grad_accum_steps: int = 1,
               pruning: PruningSchedule | None = None,
               min_loss_scale: float = 1.0):
    if (loss is None) == (compute_loss is None):
      raise ValueError("pass exactly one of `loss` and `compute_loss`")
    if steps_per_loop < 1:
      raise ValueError(f"steps_per_loop must be >= 1, got {steps_per_loop}")
    self.strategy = strategy or tf.distribute.get_strategy()
    self.model = model
    self.steps_per_loop = int(steps_per_loop)
    self.min_loss_scale = float(min_loss_scale)
    self._compute_loss = compute_loss or make_compute_loss(_resolve_loss(loss))
    policy = keras.mixed_precision.dtype_policy().name
    with self.strategy.scope():
      if getattr(optimizer, "_distribution_strategy", None) is not (
          self.strategy):
        optimizer = optimizer.__class__.from_config(optimizer.get_config())
      self.optimizer = precision.wrap_optimizer(optimizer, policy)
      self.optimizer.build(model.trainable_variables)  # DESIGN.md fact 1
      self.train_metrics = [_clone_metric(m) for m in metrics]
      self.eval_metrics = [_clone_metric(m) for m in metrics]
      self._eval_loss = keras.metrics.Mean(name="loss")
      self.pruner = Pruner(model, pruning) if pruning else None
    self.step = TrainStep(model=model, optimizer=self.optimizer,
                          compute_loss=self._compute_loss,
                          strategy=self.strategy, metrics=self.train_metrics,
                          global_clipnorm=global_clipnorm,
                          jit_compile=jit_compile,
                          accum_steps=grad_accum_steps,
                          after_update=self.pruner and self.pruner.after_update)
    self.is_chief = is_chief(self.strategy)
    self.num_workers = num_workers(self.strategy)
    self._train_loop = tf.function(self._train_loop_fn)
    self.agreement = WorkerAgreement(self.strategy, self.num_workers)
    self._preempt_requested = False
    self.preempted = False  # the run stopped early on request_preemption()
    # A trainer.watchdog.Watchdog told of every host-loop boundary (set by
    # trainer.run for multi-worker jobs), or None.
    self.watchdog = None
    self._eval_loop = tf.function(self._eval_loop_fn)

  @property
  def global_step(self) -> tf.Variable:
    """int64 count of train steps taken, skipped (overflow) steps included."""
    return self.step.global_step

  def _host_only(self) -> bool:
    """One replica on the host CPU: nothing to split or copy to a device."""
    try:
      devices = self.strategy.extended.worker_devices
    except (AttributeError, RuntimeError):  # the default strategy has none
      return not tf.config.list_logical_devices("GPU")
    return (self.strategy.num_replicas_in_sync == 1 and
            self.num_workers == 1 and len(devices) == 1 and
            "CPU" in devices[0].upper())

  def distribute(self, data: DatasetLike):
    """A distributed dataset from a dataset function or a batched dataset.

    A dataset function gets an InputContext and returns per-replica batches;
    a plain `tf.data.Dataset` must be batched by the global batch size.
    With one replica on the host CPU the dataset is used as it is: the
    distributed iterator would only add ~150 us per batch (measured here) for
    a split and a device copy that do not happen. Anything else (an iterator
    over what this returned) is passed through.
    """
    if self._host_only():
      return data(tf.distribute.InputContext()) if (
          callable(data) and not isinstance(data, tf.data.Dataset)) else data
    if isinstance(data, tf.data.Dataset):
      return self.strategy.experimental_distribute_dataset(data)
    if callable(data):
      return self.strategy.distribute_datasets_from_function(data)
    return data  # already distributed

  def _train_loop_fn(self, iterator, num_steps):
    with self.strategy.scope():
      steps = tf.constant(0, tf.int64)
      loss_sum = tf.constant(0.0)
      count = tf.constant(0.0)
      grad_norm = tf.constant(0.0)
      skipped = tf.constant(0.0)
      for i in tf.range(num_steps):
        optional = iterator.get_next_as_optional()
        if not optional.has_value():
          break
        last = tf.equal(i, num_steps - 1)  # the norm is logged for it only
        out = self.step(optional.get_value(), want_norm=last)
        steps += 1
        loss_sum += out["loss_sum"]
        count += out["count"]
        grad_norm = tf.where(last, out["grad_norm"], grad_norm)
        skipped += 1.0 - out["finite"]
    return {"steps": steps, "loss_sum": loss_sum, "count": count,
            "grad_norm": grad_norm, "skipped": skipped}

  def train_steps(self, iterator, num_steps: int, *,
                  reset_metrics: bool = True) -> dict[str, float]:
    """Runs up to `num_steps` steps from a distributed iterator.

    Returns the logs of this call (Python floats): `loss` (mean per-example
    loss over the examples seen), each train metric (accumulated since the
    last reset), `steps`, `examples`, `loss_sum`, `examples_per_sec`,
    `step_time` (seconds), `grad_norm` (of the last step; 0 if the data ran
    out before it), `skipped_steps`,
    `learning_rate`, and `loss_scale` under mixed_float16. Every value is
    global: reduced over replicas and workers.
    """
    if reset_metrics:
      for metric in self.train_metrics:
        metric.reset_state()
    first = int(self.global_step.numpy())
    self._beat(f"train steps {first}-{first + num_steps}")
    start = time.perf_counter()
    out = self._train_loop(iterator, tf.constant(num_steps, tf.int64))
    out = {k: v.numpy() for k, v in out.items()}
    elapsed = time.perf_counter() - start
    self._beat(f"the callbacks after step {first + int(out['steps'])} "
               "(logging, checkpoint)")
    if self.watchdog is not None:
      self.watchdog.arm()  # the first loop (tracing, compiles) is done
    steps = int(out["steps"])
    logs = {"loss": float(out["loss_sum"] / max(out["count"], 1.0)),
            "steps": steps, "examples": int(out["count"]),
            "loss_sum": float(out["loss_sum"]),
            "examples_per_sec": float(out["count"] / elapsed),
            "step_time": elapsed / max(steps, 1),
            "grad_norm": float(out["grad_norm"]),
            "skipped_steps": int(out["skipped"]),
            "learning_rate": self.learning_rate()}
    for metric in self.train_metrics:
      logs[metric.name] = float(metric.result())
    if self.step.loss_scale is not None:
      logs["loss_scale"] = float(self.step.loss_scale.numpy())
    if self.pruner is not None:
      logs["sparsity"] = self.pruner.sparsity()
    return logs

  def learning_rate(self) -> float:
    """The learning rate the next step will use."""
    inner = getattr(self.optimizer, "inner_optimizer", self.optimizer)
    return float(keras.ops.convert_to_numpy(inner.learning_rate))

  def _eval_step(self, batch):
    per_example, y_pred = call_nonempty(self._compute_loss, self.model, batch,
                                        False)
    _, y, sample_weight = keras.utils.unpack_x_y_sample_weight(batch)
    self._eval_loss.update_state(per_example)
    for metric in self.eval_metrics:
      metric.update_state(y, tf.cast(y_pred, tf.float32), sample_weight)

  def _eval_loop_fn(self, dataset):
    with self.strategy.scope():
      for batch in dataset:
        self.strategy.run(self._eval_step, args=(batch,))

  def evaluate(self, data: DatasetLike) -> dict[str, float]:
    """One full pass over `data`: `loss`, each metric, and `num_examples`.

    Exact over the whole set: the last partial batch counts once.
    """
    for metric in self.eval_metrics + [self._eval_loss]:
      metric.reset_state()
    self._beat("evaluation")
    self._eval_loop(self.distribute(data))
    self._beat("the callbacks after an evaluation")
    logs = {"loss": float(self._eval_loss.result()),
            "num_examples": int(self._eval_loss.count.numpy())}
    for metric in self.eval_metrics:
      logs[metric.name] = float(metric.result())
    return logs

  def _evaluate_with_callbacks(self, callback_list, eval_data) -> dict:
    callback_list.on_test_begin()
    eval_logs = self.evaluate(eval_data)
    callback_list.on_test_end(eval_logs)
    return eval_logs

  def _check_diverged(self, step: int, logs: dict) -> None:
    """Raises TrainingDiverged if the run can no longer make progress."""
    if self.step.loss_scale is None:
      if not math.isfinite(logs["loss"]):
        raise TrainingDiverged(step, logs["loss"])
    elif logs["loss_scale"] < self.min_loss_scale:
      raise TrainingDiverged(step, logs["loss"], (
          f"the loss scale fell to {logs['loss_scale']:g}, below "
          f"precision.min_loss_scale={self.min_loss_scale:g}, by global step "
          f"{step} (loss {logs['loss']:g}): every step overflows in float16 "
          "and none is applied"))

  def _beat(self, what: str) -> None:
    if self.watchdog is not None:
      self.watchdog.beat(what)

  def request_preemption(self) -> None:
    """Asks the run to stop at the next host-loop boundary (e.g. on SIGTERM).

    Safe to call from a signal handler. On every worker the run stops at the
    same step; `self.preempted` is then True and the final checkpoint saved.
    """
    self._preempt_requested = True

  def barrier(self) -> None:
    """Returns when every worker has called it (a no-op on one host)."""
    self._beat("the barrier at the end of the run")
    self.agreement.barrier()

  def check_same_step(self) -> None:
    """Raises DataError on every worker if they hold different global steps
    (after a restore: a workdir that is not shared between the workers)."""
    self.agreement.check_same_step(int(self.global_step.numpy()))

  def _agree_on_decisions(self) -> None:
    """Makes callback decisions the same on every worker (trivial on one).

    `stop_training` set on any worker stops all of them; the chief's learning
    rate (e.g. from ReduceLROnPlateau) becomes everyone's. Every worker takes
    part in this collective at the same points (DESIGN.md fact 11).
    """
    stop, lr, self.preempted = self.agreement.decide(
        self.model.stop_training, self.learning_rate(),
        self._preempt_requested)
    self.model.stop_training = stop
    if lr != self.learning_rate():
      inner = getattr(self.optimizer, "inner_optimizer", self.optimizer)
      inner.learning_rate = float(lr)

  def fit(self, train_data: DatasetLike, *, steps: int,
          steps_per_epoch: int | None = None,
          eval_data: DatasetLike | None = None, eval_every: int = 0,
          callbacks: Sequence[keras.callbacks.Callback] = ()) -> dict:
    """Trains until `global_step == steps`, in epochs of `steps_per_epoch`.

    `train_data` is a dataset (function) for `distribute`, or an iterator
    over this trainer's `distribute(...)`: then the next `fit` continues
    where this one stopped reading, as one long `fit` would (the iterator's
    position is its own: a restored checkpoint does not move it).

    Evaluates on `eval_data` at the end of every epoch and, if `eval_every`
    > 0, also every `eval_every` steps. A resumed run (global step > 0)
    continues in the epoch that step belongs to. A finite `train_data` that
    runs out ends the run.

    Callbacks follow the Keras protocol, with global values (reduced over
    replicas and workers) in every `logs`:
      on_train_begin; per epoch on_epoch_begin(epoch), then per host loop of
      up to `steps_per_loop` steps on_train_batch_begin(batch) and
      on_train_batch_end(batch, logs) (`batch`: index within the epoch;
      logs: `loss` and metrics averaged over the epoch so far, plus
      `loop_loss` (mean over this loop's examples), `examples_per_sec`,
      `step_time`, `grad_norm`, `learning_rate`, `skipped_steps`,
      `loss_scale`); on_test_begin/on_test_end(eval_logs)
      around each evaluation; on_epoch_end(epoch, logs) with `loss`,
      metrics, `learning_rate` and `val_loss`, `val_<metric>`; on_train_end.
    Setting `model.stop_training = True` ends the run after the current host
    loop, on every worker. Callbacks that only write output run on the chief
    alone (trainer/callbacks/base.py).

    Returns the last train logs merged with the last eval logs (`eval/...`).

    Raises:
      TrainingDiverged: the loss is NaN or inf without a loss scale (float32,
        mixed_bfloat16), before any callback (so no checkpoint) sees it.
    """
    steps_per_epoch = int(steps_per_epoch or steps)
    callbacks = [cb for cb in callbacks
                 if self.is_chief or not runs_on_chief_only(cb)]
    for cb in callbacks:
      if isinstance(cb, TrainerCallback):
        cb.set_trainer(self)
    self.model.optimizer = self.optimizer  # ReduceLROnPlateau and friends
    callback_list = keras.callbacks.CallbackList(
        callbacks, model=self.model, verbose=0, steps=steps_per_epoch,
        epochs=-(-steps // steps_per_epoch), total_steps=steps)
    iterator = iter(self.distribute(train_data))
    logs: dict = {}
    eval_logs: dict = {}
    self.model.stop_training = False
    callback_list.on_train_begin()
    step = int(self.global_step.numpy())
    exhausted = False
    while step < steps and not (exhausted or self.model.stop_training
                                or self.preempted):
      epoch = step // steps_per_epoch
      epoch_start, first_step = epoch * steps_per_epoch, step
      epoch_end = min(epoch_start + steps_per_epoch, steps)
      callback_list.on_epoch_begin(epoch)
      self._agree_on_decisions()
      loss_sum, examples = 0.0, 0
      while step < epoch_end:
        todo = min(self.steps_per_loop, epoch_end - step)
        if eval_every:
          todo = min(todo, eval_every - step % eval_every)
        callback_list.on_train_batch_begin(step - epoch_start)
        out = self.train_steps(iterator, todo,
                               reset_metrics=step == first_step)
        exhausted = out["steps"] < todo
        if out["steps"] == 0:
          break
        step = int(self.global_step.numpy())
        self._check_diverged(step, out)  # before any callback
        loss_sum += out.pop("loss_sum")
        examples += out["examples"]
        logs = {**out, "loop_loss": out["loss"],
                "loss": loss_sum / max(examples, 1)}
        callback_list.on_train_batch_end(step - epoch_start - 1, logs)
        if (eval_data is not None and eval_every and step % eval_every == 0
            and step < epoch_end and not exhausted):
          eval_logs = self._evaluate_with_callbacks(callback_list, eval_data)
        self._agree_on_decisions()
        if exhausted or self.model.stop_training or self.preempted:
          break
      if self.preempted or examples == 0:
        break  # mid-epoch preemption (the resumed run finishes the epoch),
        # or finite data that ran out exactly at the epoch boundary
      epoch_logs = {"loss": loss_sum / max(examples, 1),
                    **{m.name: float(m.result()) for m in self.train_metrics},
                    "learning_rate": self.learning_rate()}
      if eval_data is not None:
        eval_logs = self._evaluate_with_callbacks(callback_list, eval_data)
        epoch_logs.update({f"val_{k}": v for k, v in eval_logs.items()
                           if k != "num_examples"})
      callback_list.on_epoch_end(epoch, epoch_logs)
      self._agree_on_decisions()
    logs.update({f"eval/{k}": v for k, v in eval_logs.items()})
    callback_list.on_train_end(logs)
    return logs
