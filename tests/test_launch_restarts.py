"""A job that restarts itself after a worker dies (launch.local
--max_restarts, launch/restarts.py) and still ends where a fault-free job
would: real worker processes, real kills."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.helpers.checkpoints import variables as _variables
from conftest import ROOT
from launch import restarts
from tests.test_distribute_multiworker import _alive, _worker_pids
from trainer.callbacks.metrics_log import read_metrics


@pytest.mark.parametrize("code, restart", [
    (-9, True), (-15, True), (1, True), (4, True),
    (0, False), (2, False), (3, False), (5, False), (75, False)])
def test_which_statuses_restart(code, restart):
  assert restarts.restartable(code) == restart


def test_a_restart_is_recorded_at_the_checkpoint_step(tmp_path):
  assert restarts.checkpoint_step(str(tmp_path)) == 0  # none yet
  (tmp_path / "checkpoints").mkdir()
  (tmp_path / "checkpoints" / "checkpoint").write_text(
      'model_checkpoint_path: "ckpt-40"\nall_model_checkpoint_paths: '
      '"ckpt-20"\nall_model_checkpoint_paths: "ckpt-40"\n')
  (tmp_path / "metrics.jsonl").write_text(
      json.dumps({"step": 40, "train/loss": 1.0}) + "\n" +
      json.dumps({"step": 50, "train/loss": 0.9}) + "\n")
  line = restarts.record_restart(str(tmp_path), 1,
                                 "worker 1 was killed by SIGKILL")
  assert line == ("restart 1: worker 1 was killed by SIGKILL; resuming from "
                  "step 40 (failed after step 50: 10 steps redone)")
  assert read_metrics(str(tmp_path))[-1] == {
      "step": 40, "event": "restart", "restart": 1,
      "cause": "worker 1 was killed by SIGKILL", "failed_after_step": 50,
      "steps_redone": 10}
  assert restarts.shell_status(-9) == 137 and restarts.shell_status(4) == 4


def _start(workdir, log, *flags, custom="throttle:Throttle", env=None,
           train=()):
  """launch.local on a 2-worker deterministic digits job; output to `log`."""
  return subprocess.Popen(
      [sys.executable, "-m", "launch.local", "--num_workers=2",
       "--grace_seconds=5", *flags, "--", "--config=configs/digits.py",
       f"--workdir={workdir}", "--config.train.deterministic=True",
       "--config.train.steps=160", "--config.train.steps_per_loop=10",
       "--config.train.checkpoint_every=20",
       "--config.data.global_batch_size=32",
       "--config.callbacks.progress_bar=False",
       "--config.callbacks.tensorboard=False",
       f"--config.callbacks.custom={custom}", *train],
      cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, text=True,
      env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", THROTTLE_SECONDS="0.25",
               PYTHONPATH=os.path.join(ROOT, "tests", "helpers"),
               **(env or {})))


def _logged_step(workdir) -> int:
  try:
    return max(r["step"] for r in read_metrics(str(workdir))
               if "train/loss" in r)
  except (OSError, ValueError):
    return -1


def _kill_when(proc, workdir, step, worker, seen: set) -> int:
  """SIGKILLs `worker` of a worker generation not in `seen` once the
  chief has logged `step`; returns its pid."""
  deadline = time.monotonic() + 240
  while time.monotonic() < deadline and proc.poll() is None:
    pids = _worker_pids(proc.pid)
    if (sorted(pids) == [0, 1] and not set(pids.values()) & seen and
        _logged_step(workdir) >= step):
      seen.update(pids.values())
      os.kill(pids[worker], signal.SIGKILL)
      return pids[worker]
    time.sleep(0.1)
  raise AssertionError(f"never reached step {step} (launcher ended: "
                       f"{proc.poll()})")


@pytest.mark.slow
def test_a_job_killed_twice_restarts_itself_and_ends_bit_identical(tmp_path):
  """Chaos: kill -9 a random worker at two random points; the launcher
  restarts the job by itself and its final checkpoint equals the
  fault-free job's tensor for tensor."""
  chance = random.Random(os.environ.get("CHAOS_SEED", "7"))
  points = sorted(chance.sample(range(30, 130, 10), 2))
  victims = [chance.randrange(2) for _ in points]
  with open(tmp_path / "straight.log", "w") as straight_log, open(
      tmp_path / "chaos.log", "w") as chaos_log:
    straight = _start(tmp_path / "straight", straight_log)
    chaos = _start(tmp_path / "chaos", chaos_log, "--max_restarts=3")
    seen = set()
    try:
      for point, victim in zip(points, victims):
        _kill_when(chaos, tmp_path / "chaos", point, victim, seen)
      assert chaos.wait(timeout=300) == 0, (tmp_path / "chaos.log").read_text()[-4000:]
      assert straight.wait(timeout=300) == 0
    finally:
      for proc in (chaos, straight):
        proc.kill()
  out = (tmp_path / "chaos.log").read_text()
  lines = [l for l in out.splitlines() if l.startswith("restart ")]
  assert len(lines) == 2, out[-4000:]
  for k, (line, victim) in enumerate(zip(lines, victims), 1):
    assert line.startswith(f"restart {k}: worker {victim} was killed by "
                           "SIGKILL; resuming from step "), line
  events = [r for r in read_metrics(str(tmp_path / "chaos"))
            if r.get("event") == "restart"]
  assert [e["restart"] for e in events] == [1, 2]
  for event, point in zip(events, points):
    assert event["step"] % 20 == 0 and event["step"] <= point
    assert event["steps_redone"] == event["failed_after_step"] - event["step"]
  want, got = _variables(tmp_path / "straight"), _variables(tmp_path / "chaos")
  assert sorted(got) == sorted(want)
  for name, value in want.items():
    np.testing.assert_array_equal(got[name], value, err_msg=name)


def _run(tmp_path, *flags, **kwargs) -> tuple[int, str]:
  with open(tmp_path / "log", "w") as log:
    proc = _start(tmp_path / "run", log, *flags, **kwargs)
    try:
      code = proc.wait(timeout=400)
    finally:
      proc.kill()
  return code, (tmp_path / "log").read_text()


@pytest.mark.slow
def test_a_worker_that_fails_every_start_exhausts_the_restarts(tmp_path):
  """KillAt kills the workers at step 15 on every start (each resumes at
  10): 2 restarts, then the last kill's status (128 + 9)."""
  code, out = _run(tmp_path, "--max_restarts=2", custom="recorder:KillAt",
                   env={"KILL_AT_STEP": "15"},
                   train=["--config.train.checkpoint_every=10"])
  assert code == 137, out[-3000:]
  lines = [l for l in out.splitlines() if l.startswith("restart ")]
  assert len(lines) == 2, out[-3000:]
  assert "resuming from step 10 (failed after step 10: 0 steps redone)" in (
      lines[1])
  assert "restart(s) of 2:" in out


@pytest.mark.slow
def test_bad_input_is_not_restarted(tmp_path):
  """A worker's bad input (status 2) is never restarted, and the launcher
  keeps its status 2 (it was 1), so a job scheduler does not retry it
  either."""
  code, out = _run(tmp_path, "--max_restarts=3",
                   train=["--config.train.steps=0"])
  assert code == 2, out[-3000:]
  assert "exited with status 2" in out and "restart " not in out


@pytest.mark.slow
def test_sigterm_during_a_restart_leaves_nothing_running(tmp_path):
  with open(tmp_path / "log", "w") as log:
    proc = _start(tmp_path / "run", log, "--max_restarts=5",
                  custom="recorder:KillAt", env={"KILL_AT_STEP": "15"},
                  train=["--config.train.checkpoint_every=10"])
    try:
      deadline = time.monotonic() + 240
      while "restart 1:" not in (tmp_path / "log").read_text():
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.05)
      pids = set()
      for _ in range(20):  # the restarted workers, as they start
        pids.update(_worker_pids(proc.pid).values())
        time.sleep(0.05)
      proc.send_signal(signal.SIGTERM)
      code = proc.wait(timeout=60)
    finally:
      proc.kill()
  out = (tmp_path / "log").read_text()
  assert code in (1, 75), out[-3000:]
  assert "restart 2:" not in out
  assert not [p for p in pids if _alive(p)]
