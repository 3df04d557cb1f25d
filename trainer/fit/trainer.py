"""The Trainer: the outer training loop and the Python API (fit, evaluate,
predict in Keras' words).

`train_steps` runs `steps_per_loop` train steps per host call: a `tf.range`
loop inside one `tf.function` (trainer/fit/host_loop.py), each step a
`strategy.run` of the per-replica step in trainer/step/builtin.py. A finite
dataset ends the loop early; a partial last batch is averaged over its real
size.
Inputs: trainer/fit/inputs.py; evaluation: trainer/fit/evaluation.py; prediction:
trainer/fit/predict.py; how long fit trains: trainer/fit/plan.py.
"""

import time
from typing import Callable, Sequence

import keras
import tensorflow as tf

from trainer import compat
from trainer.data import bad_records
from trainer.fit import inputs
from trainer.distribute.agreement import WorkerAgreement
from trainer.errors import ConfigError, UserError, untraced_message
from trainer.fit.evaluation import Evaluator
from trainer.fit.epochs import run_epochs
from trainer.fit.epoch_window import EpochWindow
from trainer.fit.host_loop import host_loop
from trainer.fit.plan import FitPlan
from trainer.fit.logs import host_loop_logs, loss_scale_logs
from trainer.optimize.optimizers import (inner_optimizer, prepare_optimizers,
                                        set_learning_rate)
from trainer.fit.predict import Predictor
from trainer.optimize.pruning import Pruner, PruningSchedule
from trainer.step.metrics import clone_metric, resolve_metric
from trainer.step.loss import (ComputeLoss, float32_losses, make_compute_loss,
                               resolve_loss)
from trainer.step.builtin import TrainStep
from trainer.step.custom import CustomStep
from trainer.distribute.strategy import is_chief, num_workers


class Trainer:
  """Trains a Keras model under a tf.distribute strategy.

  Args:
    model: a Keras model created inside `strategy.scope()`; or, for a
      `train_step` of several models, {name: model}, the first the main one
      (evaluated with `loss`, predicted, pruned; `trainer.model`).
    optimizer: a Keras optimizer, or its name ("adam", with Keras'
      defaults). One created outside the scope is re-created
      inside it from its config; read the one in use from `trainer.optimizer`.
      Under the `mixed_float16` policy it is wrapped in LossScaleOptimizer.
      Several models: {model name: optimizer}, one per model trained
      (`trainer.optimizers`); a model without one is left as it is.
    loss: a per-example loss `(y_true, y_pred) -> [batch]`, a Keras loss with
      reduction='none', or a Keras loss class name such as
      "SparseCategoricalCrossentropy" (then from_logits is False).
    compute_loss: instead of `loss`, the whole per-replica forward pass:
      `(model, batch, training) -> (per_example_loss [batch], y_pred)`;
      `model` is what was passed here (a dict of several).
    train_step: your own step, `(batch, step: StepContext) -> {name:
      scalar}` (trainer/step/context.py), instead of the built-in one;
      `loss` or `compute_loss` then only evaluates (neither: no `evaluate`).
    metrics: Keras metrics, updated with (y_true, y_pred), or their names as
      `compile` takes them ("accuracy": the kind the loss implies; "mae");
      cloned inside the scope for training and for evaluation (from their
      config). Or a
      function returning fresh instances, called once for each (a metric
      whose constructor arguments its config does not hold).
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
    seed: shuffles numpy inputs to `fit` (a new order every epoch).
    workdir: the run's directory, for callbacks that write files
      (`trainer.workdir`), or None.
    watchdog: a trainer.distribute.watchdog.Watchdog told of every host-loop
      boundary (multi-worker runs), or None.
    skipping: the inputs' trainer.data.bad_records.Skipping (records that do
      not decode are skipped and counted): logs gain `bad_records`, summed
      over workers, and a count past its limit is a DataError.
  """

  def __init__(self, *, model: keras.Model | dict, optimizer, loss=None,
               compute_loss: ComputeLoss | None = None,
               train_step: Callable | None = None,
               metrics: Sequence[keras.metrics.Metric] | Callable = (),
               strategy: tf.distribute.Strategy | None = None,
               steps_per_loop: int = 1, global_clipnorm: float = 0.0,
               jit_compile: bool = False, grad_accum_steps: int = 1,
               pruning: PruningSchedule | None = None,
               min_loss_scale: float = 1.0, seed: int = 0,
               workdir: str | None = None, watchdog=None, skipping=None):
    if loss is not None and compute_loss is not None:
      raise ValueError("pass `loss` or `compute_loss`, not both")
    if train_step is None and loss is None and compute_loss is None:
      raise ValueError("pass `loss` or `compute_loss` (or your own "
                       "`train_step`)")
    if steps_per_loop < 1:
      raise ValueError(f"steps_per_loop must be >= 1, got {steps_per_loop}")
    self.strategy = strategy or tf.distribute.get_strategy()
    self.models = dict(model) if isinstance(model, dict) else {"model": model}
    if len(self.models) > 1 and train_step is None:
      raise ValueError("several models need your own `train_step`: the "
                       "built-in step trains one model")
    self.model = next(iter(self.models.values()))
    self.steps_per_loop = int(steps_per_loop)
    self.min_loss_scale = float(min_loss_scale)
    self.seed = int(seed)
    self._compute_loss = (float32_losses(compute_loss) if compute_loss else
                          loss and make_compute_loss(resolve_loss(loss)))
    self.optimizers, aliases = prepare_optimizers(optimizer, self.models,
                                                  self.strategy)
    main = next(iter(self.models))  # the main model's optimizer, else the first
    self.optimizer = self.optimizers.get(
        main, next(iter(self.optimizers.values())))
    with self.strategy.scope():
      given = metrics if callable(metrics) else [
          resolve_metric(m, loss) for m in metrics]
      make = given if callable(given) else lambda: [
          clone_metric(m) for m in given]
      self.train_metrics = list(make())
      eval_metrics = list(make())
      self.pruner = Pruner(self.model, pruning) if pruning else None
    # Outside the scope: a plain variable, not one synchronized per replica.
    self.epoch_window = EpochWindow(self.train_metrics)
    after_update = self.pruner and self.pruner.after_update
    if train_step is not None:
      if grad_accum_steps > 1:
        raise ConfigError("train.grad_accum_steps > 1 does not apply to a "
                          "task's own train_step; set it to 1")
      self.step = CustomStep(train_step=train_step, models=self.models,
                             optimizers=self.optimizers, aliases=aliases,
                             strategy=self.strategy,
                             global_clipnorm=global_clipnorm,
                             jit_compile=jit_compile, seed=seed,
                             after_update=after_update,
                             metrics=self.train_metrics)
    else:
      self.step = TrainStep(model=self.model, optimizer=self.optimizer,
                            compute_loss=self._compute_loss,
                            strategy=self.strategy,
                            metrics=self.train_metrics,
                            global_clipnorm=global_clipnorm,
                            jit_compile=jit_compile,
                            accum_steps=grad_accum_steps,
                            after_update=after_update)
    self.is_chief = is_chief(self.strategy)
    self.num_workers = num_workers(self.strategy)
    self._train_loop = tf.function(self._train_loop_fn)
    self.agreement = WorkerAgreement(self.strategy, self.num_workers)
    self._preempt_requested = False
    self.preempted = False  # the run stopped early on request_preemption()
    self.watchdog, self.workdir = watchdog, workdir
    self.skipping = skipping
    self._evaluator = self._compute_loss and Evaluator(
        model=model if compute_loss else self.model,
        compute_loss=self._compute_loss, strategy=self.strategy,
        metrics=eval_metrics, distribute=self.distribute)
    self._predictor = Predictor(self.model, self.strategy, self.distribute)

  @property
  def global_step(self) -> tf.Variable:
    """int64 count of train steps taken, skipped (overflow) steps included."""
    return self.step.global_step

  def distribute(self, data):
    """A distributed dataset from a dataset function or a batched dataset
    (see trainer.fit.inputs.distribute); anything else is passed through."""
    return inputs.distribute(self.strategy, data, self.num_workers)

  def _train_loop_fn(self, iterator, num_steps):
    """Up to `num_steps` steps (trainer/fit/host_loop.py)."""
    return compat.converted(host_loop, ours=True)(self.step, self.strategy,
                                                  iterator, num_steps)

  def train_steps(self, iterator, num_steps: int, *,
                  reset_metrics: bool = True) -> dict[str, float]:
    """Runs up to `num_steps` steps from a distributed iterator.

    Returns the logs of this call (Python floats): `loss` (mean per-example
    loss over the examples seen), each train metric (accumulated since the
    last reset), `steps`, `examples`, `loss_sum`, `examples_per_sec`,
    `step_time` (seconds), `input_wait` (the fraction of the call spent
    waiting for the next batch; not with op determinism), `grad_norm` (of the last step; 0 if the
    data ran out before it), `skipped_steps`,
    `learning_rate`, and `loss_scale` under mixed_float16. Every value is
    global: reduced over replicas and workers.
    """
    if reset_metrics:
      for metric in self.train_metrics:
        metric.reset_state()
    first = int(self.global_step.numpy())
    self._beat(f"train steps {first}-{first + num_steps}")
    start = time.perf_counter()
    try:
      with bad_records.reported(
          lambda: f"training steps {first + 1}-{first + num_steps}",
          steps=(first, num_steps)):
        out = self._train_loop(iterator, tf.constant(num_steps, tf.int64))
    except UserError as e:  # a misused StepContext, found while tracing
      untraced = type(e)(untraced_message(e))
      untraced.__dict__.update(e.__dict__)  # a bad record's steps
      raise untraced from None
    out = tf.nest.map_structure(lambda t: t.numpy(), out)
    elapsed = time.perf_counter() - start
    self._beat(f"the callbacks after step {first + int(out['steps'])} "
               "(logging, checkpoint)")
    if self.watchdog is not None:
      self.watchdog.arm()  # the first loop (tracing, compiles) is done
    return self._loop_logs(out, elapsed)

  def _loop_logs(self, out: dict, elapsed: float) -> dict[str, float]:
    """The logs of one host loop (trainer/fit/logs.py) with the metrics,
    loss scales and sparsity."""
    several = len(self.optimizers) > 1
    logs = host_loop_logs(out, elapsed, several_optimizers=several,
                          learning_rate=self.learning_rate())
    if self.step.updates_metrics:
      for metric in self.train_metrics:
        logs[metric.name] = float(metric.result())
    logs.update(loss_scale_logs(self.step.loss_scales, several))
    if self.pruner is not None:
      logs["sparsity"] = self.pruner.sparsity()
    if self.skipping is not None:
      logs["bad_records"] = self._bad_records(self.skipping.train_count(),
                                              "the training data so far")
    return logs

  def _bad_records(self, count: int, where: str) -> int:
    """Bad records skipped (this process's `count`), summed over workers; a
    count past the limit is a DataError on every worker (one sum)."""
    total = self.agreement.total(count)
    self.skipping.observe(total, where, say=self.is_chief)
    return total

  def learning_rate(self) -> float:
    """The learning rate the next step will use."""
    return float(keras.ops.convert_to_numpy(
        inner_optimizer(self.optimizer).learning_rate))

  def evaluate(self, x=None, y=None, *, batch_size: int | None = None,
               sample_weight=None) -> dict[str, float]:
    """One full pass: `loss`, each metric, and `num_examples`.

    `x` as `fit` takes it (numpy arrays with `y`, batched by `batch_size`,
    default 32; or a batched dataset or dataset function). Exact over the
    whole set: the last partial batch counts once, an empty replica none.
    """
    if self._evaluator is None:
      raise ValueError("this trainer has no `loss` or `compute_loss` to "
                       "evaluate with")
    data = inputs.as_input(x, y, sample_weight, batch_size=batch_size,
                           replicas=self.strategy.num_replicas_in_sync)
    self._beat("evaluation")
    skipped = self.skipping and int(self.skipping.eval_count.numpy())
    with bad_records.reported(lambda: "the evaluation after step "
                              f"{int(self.global_step.numpy())}",
                              evaluation=True):
      logs = self._evaluator(data)
    if self.skipping is not None:
      logs["bad_records"] = self._bad_records(
          int(self.skipping.eval_count.numpy()) - skipped,
          "one pass over the eval data")
    self._beat("the callbacks after an evaluation")
    return logs

  def predict(self, x, *, batch_size: int | None = None):
    """The model's outputs for every example of `x`, in input order.

    `x`: numpy arrays (or a dict of them), batched here by `batch_size`
    (default 32, split across the replicas), or a batched
    `tf.data.Dataset` of x or (x, ...). Returns numpy [N, ...], or a nest of
    them for several outputs; every example once, the partial last batch
    included. On several workers each worker returns the whole result.
    """
    return self._predictor(x, batch_size)

  def evaluate_with_callbacks(self, callback_list, data) -> dict:
    callback_list.on_test_begin()
    eval_logs = self.evaluate(data)
    callback_list.on_test_end(eval_logs)
    return eval_logs

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

  def agree_on_decisions(self) -> None:
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
      set_learning_rate(self.optimizer, lr)

  def fit(self, x=None, y=None, *, batch_size: int | None = None,
          epochs: int | None = None, steps: int | None = None,
          steps_per_epoch: int | None = None, sample_weight=None,
          validation_data=None, validation_split: float = 0.0,
          shuffle: bool = True, initial_epoch: int = 0, eval_every: int = 0,
          callbacks: Sequence[keras.callbacks.Callback] = ()
         ) -> keras.callbacks.History:
    """Trains, as Keras' `Model.fit` does, under the trainer's strategy.

    `x`: numpy arrays (a dict of arrays for several inputs) with `y` (and
    `sample_weight`), batched here by the global `batch_size` (default 32)
    and reshuffled every epoch with the trainer's seed if `shuffle`; or a
    `tf.data.Dataset` batched by the global batch size; or a dataset
    function (`InputContext -> per-replica batches`); or an iterator over
    this trainer's `distribute(...)`, which the next `fit` continues as one
    long `fit` would.

    How long: `epochs` (Keras' meaning: epochs `initial_epoch` .. `epochs`-1
    from this call on) of `steps_per_epoch` steps, by default one pass over
    a finite dataset, iterated afresh each epoch (its partial last batch is
    averaged over its real size); or `steps` (until `global_step == steps`,
    in epochs of `steps_per_epoch` counted from step 0, so a restored run
    continues; data that runs out ends the run). Neither: one epoch.

    Validation: `validation_data` ((x, y[, w]) arrays, a dataset or a
    dataset function) or `validation_split` (the last fraction of the
    arrays), evaluated at every epoch end and every `eval_every` steps.

    Callbacks follow the Keras protocol (docs/callbacks.md), with global
    values (reduced over replicas and workers) in every `logs`; the batch
    hooks run once per host loop of up to `steps_per_loop` steps. Setting
    `model.stop_training = True` ends the run after the current host loop,
    on every worker. Callbacks that only write output run on the chief
    alone (trainer/callbacks/base.py).

    Returns a `keras.callbacks.History`: `.history` holds the epoch logs
    (`loss`, metrics, `val_...`), `.last_logs` the last train logs merged
    with the last eval logs (`eval/...`).

    Raises:
      ValueError: a bad argument, named.
      TrainingDiverged: the run can no longer make progress (a NaN loss
        without a loss scale, the loss scale below its floor), before any
        callback (so no checkpoint) sees it.
    """
    if epochs is not None and steps is not None:
      raise ValueError("pass `epochs` or `steps`, not both: `epochs` counts "
                       "passes over the data, `steps` train steps")
    replicas = self.strategy.num_replicas_in_sync
    if validation_split:
      if validation_data is not None:
        raise ValueError("pass `validation_data` or `validation_split`, not "
                         "both")
      (x, y, sample_weight), validation_data = inputs.split_validation(
          x, y, sample_weight, validation_split)
    train = inputs.as_input(x, y, sample_weight, batch_size=batch_size,
                            replicas=replicas, shuffle=shuffle,
                            seed=self.seed)
    validation = inputs.validation_input(validation_data, batch_size,
                                         replicas)
    plan = FitPlan.make(train, epochs=epochs, steps=steps,
                        steps_per_epoch=steps_per_epoch,
                        initial_epoch=initial_epoch,
                        step=int(self.global_step.numpy()))
    return run_epochs(self, train, plan, validation, eval_every=eval_every,
                      callbacks=callbacks)
