"""The epoch window (trainer/fit/epoch_window.py): metrics.jsonl's train
means are over the epoch so far, continued across a resume."""

import pytest

from trainer.callbacks import read_metrics
from trainer.run import run


@pytest.mark.slow  # in-process, three runs: ~5 s alone, 13 s in the suite
def test_a_resumed_run_continues_the_epoch_means_it_stopped_in(tmp_path):
  """metrics.jsonl's train means (the loss, the train metrics, a task's own
  step values) are over the epoch so far, also across a resume: a run
  stopped at step 8 of a 12-step epoch and resumed logs exactly what the
  run that never stopped logs (before, the resumed run's means started
  again at step 8: one window on the line, another after a resume)."""
  from configs import distillation
  def config(steps):
    c = distillation.get_config()
    c.user.teacher_epochs = 1
    c.train.update(steps=steps, steps_per_loop=4, steps_per_epoch=12,
                   checkpoint_every=8, deterministic=True)
    c.callbacks.progress_bar = c.callbacks.tensorboard = False
    return c
  run(config(20), str(tmp_path / "straight"))
  run(config(8), str(tmp_path / "resumed"))
  run(config(20), str(tmp_path / "resumed"))
  lines = lambda d: [r for r in read_metrics(tmp_path / d)
                     if "train/loss" in r]
  straight, resumed = lines("straight"), lines("resumed")
  assert [r["step"] for r in straight] == [4, 8, 12, 16, 20]
  assert [r["epoch"] for r in straight] == [1, 1, 1, 2, 2]
  keys = ("step", "epoch", "train/loss", "train/accuracy", "train/soft_loss",
          "train/label_loss")
  assert ([[r[k] for k in keys] for r in resumed] ==
          [[r[k] for k in keys] for r in straight])
  # One window per line: the epoch's mean over its loops, not the last one's.
  assert "train/loop_loss" not in straight[0]
  loops = [r["train/examples"] for r in straight[:3]]
  assert straight[2]["train/loss"] != straight[1]["train/loss"]
  assert loops == [256.0] * 3
