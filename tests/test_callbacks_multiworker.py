"""Callbacks in a real 2-worker MultiWorkerMirroredStrategy job on localhost
(`launch.local`): the same decisions at the same step on every worker, the
same global logs, and files written once, by the chief."""

import csv
import json
import os
import time

import pytest

from conftest import ROOT, run_module
from trainer.callbacks import read_metrics

pytestmark = pytest.mark.slow

JOB_SECONDS = 240  # bound on a 2-worker digits job of a few hundred steps


def _launch(workdir, record_dir, *overrides, env=None):
  start = time.monotonic()
  proc = run_module(
      "launch.local", "--num_workers=2", "--",
      "--config=configs/digits.py", f"--workdir={workdir}",
      "--config.callbacks.progress_bar=False", "--config.callbacks.csv_log=True",
      "--config.callbacks.custom=recorder:EpochRecorder", *overrides,
      env={"PYTHONPATH": os.path.join(ROOT, "tests", "helpers"),
           "RECORD_DIR": str(record_dir), **(env or {})},
      timeout=JOB_SECONDS)
  return proc, time.monotonic() - start


def _records(record_dir, worker):
  with open(record_dir / f"worker-{worker}.jsonl", encoding="utf-8") as f:
    return [json.loads(line) for line in f]


def test_early_stopping_stops_both_workers_at_the_same_step(tmp_path):
  workdir, record_dir = tmp_path / "run", tmp_path / "records"
  record_dir.mkdir()
  proc, seconds = _launch(
      workdir, record_dir,
      "--config.callbacks.early_stopping.monitor=val_loss",
      "--config.callbacks.early_stopping.min_delta=100",
      "--config.callbacks.early_stopping.patience=1")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert seconds < JOB_SECONDS
  chief, other = _records(record_dir, 0), _records(record_dir, 1)
  # Epoch 0 sets the best, epoch 1 cannot improve by 100: both stop at 200.
  assert [r["step"] for r in chief] == [100, 200, 200]
  assert [(r["hook"], r["epoch"], r["step"]) for r in chief] == [
      (r["hook"], r["epoch"], r["step"]) for r in other]
  for mine, theirs in zip(chief, other):  # global logs: bit-identical
    assert mine["logs"] == theirs["logs"]
  assert chief[0]["logs"]["val_loss"] > 0 and "accuracy" in chief[0]["logs"]
  # Files from the chief only: one CSV row per epoch, one metrics line per
  # event, one done line.
  with open(workdir / "log.csv", encoding="utf-8") as f:
    assert [r["epoch"] for r in csv.DictReader(f)] == ["0", "1"]
  steps = [r["step"] for r in read_metrics(workdir) if "train/loss" in r]
  assert steps == [50, 100, 150, 200]
  assert sum("done: 200 steps" in l for l in proc.stdout.splitlines()) == 1
  assert "[worker 0] done: 200 steps" in proc.stdout


def test_a_stop_decided_on_one_worker_stops_every_worker(tmp_path):
  workdir, record_dir = tmp_path / "run", tmp_path / "records"
  record_dir.mkdir()
  proc, seconds = _launch(workdir, record_dir,
                          env={"STOP_WORKER": "1", "STOP_AFTER_EPOCH": "0"})
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert seconds < JOB_SECONDS
  for worker in (0, 1):
    assert [r["step"] for r in _records(record_dir, worker)] == [100, 100]
