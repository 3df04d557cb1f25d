"""What a run does when it cannot go on, or is resumed in another way than
it started: divergence under mixed_float16, repeated NaN recovery, resuming
under another precision policy, with a shorter or longer run, a pruning
schedule fixed at the start, one CSV row per epoch after a resume."""

import csv
import logging

import pytest
import tensorflow as tf

from conftest import run_module
from trainer.callbacks import read_metrics
from trainer.run import run
from test_checkpoint_resume import PoisonWeights, _config, _input_offset

SPIKE = ["--config.optimizer.name=sgd", "--config.optimizer.learning_rate=0.1",
         "--config.optimizer.schedule=step",
         "--config.optimizer.decay_steps=(30,)",
         "--config.optimizer.decay_factor=1e7", "--config.train.steps=60",
         "--config.train.steps_per_loop=5", "--config.train.checkpoint_every=10",
         "--config.callbacks.progress_bar=False"]


def _steps(workdir) -> list[int]:
  state = tf.train.get_checkpoint_state(str(workdir / "checkpoints"))
  return [int(p.rsplit("-", 1)[1]) for p in state.all_model_checkpoint_paths]


@pytest.mark.slow
def test_mixed_float16_that_overflows_forever_is_diverged_exit_3(tmp_path):
  """The learning rate jumps to 1e6 at step 30: from then on every step
  overflows and is skipped. It used to halve the loss scale to 1e-4, save
  those states and exit 0."""
  proc = run_module("launch.train", "--config=configs/digits.py",
                    f"--workdir={tmp_path}", *SPIKE,
                    "--config.precision.policy=mixed_float16", timeout=300)
  assert proc.returncode == 3, proc.stderr[-3000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("error: training diverged: the loss scale fell to")
  assert "below precision.min_loss_scale=1" in last
  # No checkpoint of a state whose loss is not finite.
  reader = lambda s: tf.train.load_checkpoint(
      str(tmp_path / "checkpoints" / f"ckpt-{s}"))
  assert _steps(tmp_path) and max(_steps(tmp_path)) <= 40
  for step in _steps(tmp_path):
    scale = reader(step).get_tensor(
        "loss_scale/dynamic_scale/.ATTRIBUTES/VARIABLE_VALUE")
    assert scale >= 1.0, (step, scale)


def test_a_second_nan_recovery_skips_further_than_the_first(tmp_path, caplog):
  """Both attempts diverge after step 50 and go back to step 30: the second
  must not replay the first attempt's batches (offset 30, then 60)."""
  caplog.set_level(logging.INFO, logger="absl")
  config = _config(steps=120, steps_per_loop=10, checkpoint_every=30,
                   nan_recovery=2)
  result = run(config, str(tmp_path), callbacks=[PoisonWeights(50, times=2)])
  assert "recovery 1 of 2: restored step 30" in caplog.text
  assert "(input offset now 30)" in caplog.text
  assert "recovery 2 of 2: restored step 30" in caplog.text
  assert "(input offset now 60)" in caplog.text
  assert result.steps == 120 and _input_offset(tmp_path) == 60


@pytest.mark.slow  # in-process, but over 5 s: CI runs it
def test_resume_under_another_precision_policy(tmp_path, caplog):
  """Variables are float32 under every policy: a run continues under
  another one. It used to say 'no checkpoint ... can be read'."""
  caplog.set_level(logging.INFO, logger="absl")
  scales = {}
  for steps, policy in ((20, "float32"), (40, "mixed_float16"),
                        (60, "mixed_float16"), (80, "mixed_bfloat16"),
                        (100, "float32")):
    config = _config(steps=steps, steps_per_loop=10)
    config.precision.policy = policy
    result = run(config, str(tmp_path))
    assert result.steps == steps, policy
    assert result.logs["eval/accuracy"] > 0.5
    scales[steps] = result.logs.get("loss_scale")
  # float32 -> mixed_float16 starts from the initial scale; the second
  # mixed_float16 run continues with the scale the first one saved.
  assert "ckpt-20 has no loss scale" in caplog.text
  assert "ckpt-40 has no loss scale" not in caplog.text
  assert scales[40] == 32768.0 and scales[60] is not None
  assert scales[80] is None and scales[100] is None


def test_resuming_with_fewer_steps_than_done_reports_the_model(tmp_path):
  """It printed 'eval accuracy nan'."""
  run(_config(steps=40, steps_per_loop=20), str(tmp_path))
  result = run(_config(steps=20, steps_per_loop=20), str(tmp_path))
  assert result.steps == 40
  assert result.logs["eval/accuracy"] > 0.8
  assert result.logs["eval/num_examples"] == 300


def test_pruning_schedule_is_fixed_when_the_run_starts(tmp_path):
  """`pruning.end_step=0` is three quarters of the run as it started:
  extending the run on resume does not move it (sparsity went 0.5 ->
  0.4988)."""
  def config(steps):
    c = _config(steps=steps, steps_per_loop=10)
    c.pruning.target_sparsity, c.pruning.frequency = 0.5, 10
    return c
  first = run(config(40), str(tmp_path))
  assert first.logs["sparsity"] == pytest.approx(0.5, abs=1e-3)
  longer = run(config(80), str(tmp_path))
  assert longer.steps == 80
  # At step 50 the schedule of the run as it started (end 30) is at its
  # target; one moved to the extended run's 60 would still be below it.
  sparsity = {r["step"]: r["train/sparsity"] for r in read_metrics(tmp_path)
              if "train/sparsity" in r}
  assert sparsity[50] == pytest.approx(0.5, abs=1e-3)
  saved = (tmp_path / "config.json").read_text()
  assert '"end_step": 30' in saved


def test_csv_log_has_one_row_per_epoch_after_a_resume(tmp_path):
  """Killed after an epoch ended but before its checkpoint: the resumed run
  trains that epoch again, and the CSV must not hold it twice."""
  def config(steps):
    c = _config(steps=steps, steps_per_loop=10, steps_per_epoch=20,
                checkpoint_every=10)
    c.callbacks.csv_log = True
    return c
  run(config(40), str(tmp_path))  # epochs 0 and 1, checkpoints 10..40
  # As if killed between epoch 1's end and its checkpoint: drop ckpt-40.
  manager_dir = tmp_path / "checkpoints"
  state = tf.train.get_checkpoint_state(str(manager_dir))
  paths = list(state.all_model_checkpoint_paths)[:-1]
  tf.compat.v1.train.update_checkpoint_state(str(manager_dir), paths[-1],
                                            paths)
  result = run(config(60), str(tmp_path))
  assert result.steps == 60
  with open(tmp_path / "log.csv", encoding="utf-8") as f:
    epochs = [row["epoch"] for row in csv.DictReader(f)]
  assert epochs == ["0", "1", "2"]
