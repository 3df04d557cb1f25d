"""Features in combination, as users run them: every pair of values of
model x precision policy x partial batches x gradient accumulation x XLA x
pruning x resume appears in at least one case, and each case runs on one
device and on 2 mirrored replicas (so the strategy pairs with everything).

Each case trains a few steps on finite data (in order, so one device and 2
replicas see the same global batches; with `partial`, the last train step
has 1 example and the last eval step leave replica 1 with none), then
asserts: the loss is finite, every eval example is counted once, pruned
kernels have their exact sparsity, and 2 replicas equal one device within
the policy's tolerance (where they can: see `_comparable`).
"""

import itertools

import keras
import numpy as np
import pytest
import tensorflow as tf

from tests.helpers import examples
from trainer import data as data_lib
from trainer.tasks import models
from trainer.checkpoint.checkpointer import Checkpointer
from trainer.config import default_config
from trainer.fit.trainer import Trainer
from trainer.optimize.pruning import PruningSchedule

pytestmark = pytest.mark.slow  # in-process, ~100 s in all: CI runs it

DIMENSIONS = {
    "model": ("mlp", "cnn", "resnet"),
    "policy": ("float32", "mixed_float16", "mixed_bfloat16"),
    "partial": (False, True),
    "accum": (1, 2),
    "jit": (False, True),
    "pruning": (False, True),
    "resume": (False, True),
}
GLOBAL_BATCH = 32
STEPS = 3
# Relative tolerance of 2 replicas against one device, by policy.
RTOL = {"float32": 1e-4, "mixed_float16": 1e-2, "mixed_bfloat16": 3e-2}


def pairwise_cases(dimensions: dict) -> list[dict]:
  """A small set of full assignments covering every pair of values of any
  two dimensions (greedy: each pick covers the most uncovered pairs)."""
  names = list(dimensions)
  pairs = lambda case: {(a, case[a], b, case[b])
                        for a, b in itertools.combinations(names, 2)}
  uncovered = set().union(*(pairs(dict(zip(names, values))) for values in
                            itertools.product(*dimensions.values())))
  all_cases = [dict(zip(names, values))
               for values in itertools.product(*dimensions.values())]
  chosen = []
  while uncovered:
    best = max(all_cases, key=lambda c: len(pairs(c) & uncovered))
    chosen.append(best)
    uncovered -= pairs(best)
  return chosen


CASES = pairwise_cases(DIMENSIONS)


def _comparable(case) -> bool:
  """False where 2 replicas differ from one device by design: batch norm
  that is not synchronized (jit or accumulation on several replicas refuse
  synchronized batch norm) normalizes each replica's share on its own, and
  accumulation normalizes each micro-batch on its own."""
  return case["model"] != "resnet" or (case["accum"] == 1 and not case["jit"])


def _build(case, strategy, replicas):
  cfg = default_config().model
  cfg.name, cfg.width, cfg.depth = case["model"], 8, 1
  cfg.sync_batch_norm = replicas > 1 and _comparable(case)
  with strategy.scope():
    keras.utils.set_random_seed(1)
    model = models.build_model(cfg, data_lib.DataInfo((8, 8, 1), 10, None,
                                                      None))
  pruning = (PruningSchedule(target_sparsity=0.5, begin_step=0, end_step=2,
                             frequency=1, exclude="^logits$")
             if case["pruning"] else None)
  return Trainer(
      model=model, optimizer=keras.optimizers.SGD(0.05),
      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True,
                                                      reduction="none"),
      metrics=[keras.metrics.SparseCategoricalAccuracy("accuracy")],
      strategy=strategy, steps_per_loop=2, jit_compile=case["jit"],
      grad_accum_steps=case["accum"], pruning=pruning)


def _batches(x, y):
  """Per-replica batches in order, the last one partial: the same global
  batches for any replica count (data.input_fn without shuffling)."""
  return data_lib.input_fn(tf.data.Dataset.from_tensor_slices((x, y)),
                           global_batch_size=GLOBAL_BATCH, training=False)


def _train(case, strategy, replicas, workdir):
  """Trains STEPS steps (stopping after 2 and resuming from a checkpoint in
  a new model if `resume`); returns (train logs, eval logs, trainer)."""
  n = GLOBAL_BATCH * (STEPS - 1) + (1 if case["partial"] else GLOBAL_BATCH)
  x, y = examples.images(n, seed=0)
  eval_x, eval_y = examples.images(70 if case["partial"] else 64, seed=1)
  trainer = _build(case, strategy, replicas)
  if case["resume"]:
    trainer.fit(_batches(x, y), steps=2)
    state = dict(model=trainer.model, optimizer=trainer.optimizer,
                 global_step=trainer.global_step)
    masks = lambda t: t.pruner and t.pruner.masks
    Checkpointer(workdir, **state, pruning_masks=masks(trainer)).save()
    trainer = _build(case, strategy, replicas)
    assert Checkpointer(
        workdir, model=trainer.model, optimizer=trainer.optimizer,
        global_step=trainer.global_step,
        pruning_masks=masks(trainer)).restore_latest() == 2
    skip = 2 * GLOBAL_BATCH
    logs = trainer.fit(_batches(x[skip:], y[skip:]), steps=STEPS + 5).last_logs
  else:
    logs = trainer.fit(_batches(x, y), steps=STEPS + 5).last_logs  # data runs out
  assert int(trainer.global_step.numpy()) == STEPS
  return logs, trainer.evaluate(_batches(eval_x, eval_y)), trainer


@pytest.mark.parametrize(
    "case", CASES, ids=["-".join(f"{k}={v}" for k, v in c.items())
                        for c in CASES])
def test_feature_combination(case, one_device, mirrored, tmp_path):
  keras.mixed_precision.set_dtype_policy(case["policy"])
  layouts = ((1, one_device), (2, mirrored)) if _comparable(case) else (
      (2, mirrored),)  # nothing to compare one device with
  try:
    runs = {replicas: _train(case, strategy, replicas,
                             str(tmp_path / str(replicas)))
            for replicas, strategy in layouts}
  finally:
    keras.mixed_precision.set_dtype_policy("float32")
  for replicas, (logs, eval_logs, trainer) in runs.items():
    assert np.isfinite(logs["loss"]) and np.isfinite(eval_logs["loss"]), (
        replicas, logs, eval_logs)
    assert eval_logs["num_examples"] == (70 if case["partial"] else 64)
    if case["pruning"]:
      for kernel in trainer.pruner.kernels:
        zeros = int(np.sum(kernel.numpy() == 0))
        assert zeros == round(0.5 * kernel.numpy().size), kernel.path
  if _comparable(case):
    (_, one, _), (_, two, _) = runs[1], runs[2]
    assert two["loss"] == pytest.approx(one["loss"], rel=RTOL[case["policy"]])
    if case["policy"] == "float32":  # half precision flips near-ties
      assert abs(two["accuracy"] - one["accuracy"]) <= 1 / 64 + 1e-6


def test_the_cases_cover_every_pair():
  names = list(DIMENSIONS)
  for a, b in itertools.combinations(names, 2):
    seen = {(c[a], c[b]) for c in CASES}
    assert seen == set(itertools.product(DIMENSIONS[a], DIMENSIONS[b])), (a, b)
  assert len(CASES) <= 16
