"""Elastic jobs (launch.local --min_workers/--hosts, launch/elastic.py): a
worker slot that cannot start again is dropped and the job goes on with
fewer workers; it grows back when the hosts file offers more; the global
batches stay those of the fault-free job."""

import json
import os
import re
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import ROOT
from launch import elastic
from tests.helpers.checkpoints import variables
from trainer.callbacks import read_metrics

HELPERS = os.path.join(ROOT, "tests", "helpers")


def _launch(*flags, env=None, timeout=120) -> subprocess.CompletedProcess:
  """launch.local with the test worker program (tests/helpers/
  exit_worker.py): real processes, no training."""
  return subprocess.run(
      [sys.executable, "-m", "launch.local", "--module=exit_worker",
       "--grace_seconds=2", *flags, "--", "--workdir=/nonexistent"],
      cwd=ROOT, capture_output=True, text=True, timeout=timeout,
      env=dict(os.environ, PYTHONPATH=HELPERS, **(env or {})))


def _hosts(path, *lines) -> str:
  """Writes a hosts file as an agent should: a new file moved in place."""
  new = path.with_suffix(".new")
  new.write_text("".join(f"{line}\n" for line in lines))
  os.replace(new, path)
  return str(path)


def _start_on_two_of_three(tmp_path, hosts, starts, *, run_seconds):
  """launch.local of 3 test workers (at least 2) on `hosts`, each running
  `run_seconds`, worker 0 writing a checkpoint state after 0.5 s."""
  return subprocess.Popen(
      [sys.executable, "-m", "launch.local", "--module=exit_worker",
       "--num_workers=3", "--min_workers=2", "--max_restarts=1",
       "--grace_seconds=2", f"--hosts={hosts}", "--",
       f"--workdir={tmp_path}"],
      cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
      env=dict(os.environ, PYTHONPATH=HELPERS, RUN_SECONDS=str(run_seconds),
               CHECKPOINT_AFTER="0.5", STARTS_FILE=str(starts)))


def _indices(starts) -> list[str]:
  """The worker index of each start recorded by exit_worker."""
  return [line.split()[0] for line in starts.read_text().splitlines()]


def test_the_hosts_file_counts_slots_and_names_a_bad_line(tmp_path):
  path = _hosts(tmp_path / "hosts", "# two slots here", "localhost:2", "",
                "127.0.0.1")
  assert elastic.read_hosts(path) == 3
  for line, why in (("localhost:0", "is not host[:slots]"),
                    ("local host", "is not host[:slots]"),
                    ("gpu-node-7:8", "gpu-node-7 is not this machine")):
    with pytest.raises(ValueError, match=f"line 2: .*{re.escape(why)}"):
      elastic.read_hosts(_hosts(tmp_path / "bad", "localhost", line))


def test_a_slot_is_dropped_after_k_failed_starts_without_progress(tmp_path):
  slots = elastic.Slots(3, 2, None, slot_failures=2)
  assert slots.failed(2, progressed=False) is None
  assert slots.failed(2, progressed=True) is None  # progress: count anew
  assert slots.failed(2, False) == "worker 2 failed on 2 start(s) in a row"
  assert slots.available() == 2
  with pytest.raises(ValueError, match="--min_workers=4 must be between 1"):
    elastic.Slots(3, 4, None, 1)


@pytest.mark.parametrize("flags,message", [
    (["--num_workers=2", "--min_workers=3", "--max_restarts=1"],
     "--min_workers=3 must be between 1 and --num_workers=2"),
    (["--num_workers=3", "--min_workers=2"],
     "set --max_restarts >= 1"),
    (["--num_workers=3", "--min_workers=2", "--max_restarts=1",
      "--hosts=HOSTS"], "line 1: 'localhost:x' is not host[:slots]"),
    (["--num_workers=3", "--min_workers=2", "--max_restarts=1",
      "--hosts=/no/such/hosts"], "--hosts=/no/such/hosts cannot be read"),
], ids=["min above num", "no restarts", "bad hosts line", "no hosts file"])
def test_bad_elastic_flags_are_one_line_before_anything_starts(
    flags, message, tmp_path):
  hosts = _hosts(tmp_path / "hosts", "localhost:x")
  starts = tmp_path / "starts"
  proc = _launch(*[f.replace("HOSTS", hosts) for f in flags],
                 env={"STARTS_FILE": str(starts)})
  assert proc.returncode == 2, proc.stderr
  (line,) = proc.stderr.strip().splitlines()
  assert line.startswith("error: ") and message in line, line
  assert not starts.exists()


def test_a_slot_that_fails_every_start_is_dropped_and_the_job_goes_on(
    tmp_path):
  """Worker 2 of 3 exits 1 at every start: after 2 failed starts its slot
  is dropped and the job ends with exit 0 on 2 workers."""
  starts = tmp_path / "starts"
  proc = _launch("--num_workers=3", "--min_workers=2", "--max_restarts=3",
                 "--slot_failures=2",
                 env={"EXIT_2": "1", "STARTS_FILE": str(starts)})
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = [l for l in proc.stderr.splitlines()
           if l.startswith(("restart ", "resize:"))]
  assert lines == [
      "restart 1: worker 2 exited with status 1; resuming from step 0",
      "restart 2: worker 2 exited with status 1; resuming from step 0",
      "resize: 3 -> 2 workers at step 0 (worker 2 failed on 2 start(s) in "
      "a row)"], proc.stderr[-3000:]
  assert sorted(_indices(starts)) == sorted("012" "012" "01")


def test_fewer_workers_than_the_minimum_end_the_job_with_its_status(
    tmp_path):
  """Workers 1 and 2 of 3 fail every start, at most 2 wanted: after the
  first is dropped, the second leaves 1 worker: one line, the last
  failure's status."""
  proc = _launch("--num_workers=3", "--min_workers=2", "--max_restarts=5",
                 "--slot_failures=1", env={"EXIT_1": "4", "EXIT_2": "4"})
  assert proc.returncode == 4, proc.stderr[-3000:]
  assert proc.stderr.splitlines()[-1] == (
      "error: 1 worker(s) can start, fewer than --min_workers=2; the last "
      "failure: worker 1 exited with status 4"), proc.stderr[-3000:]


@pytest.mark.slow  # ~6 s: two starts of 4 s workers
def test_a_job_grows_when_the_hosts_file_offers_more(tmp_path):
  """2 slots of 3 at the start; a line added while it runs: once the
  workers have saved a checkpoint they are asked to save and stop
  (SIGTERM: exit 75) and the job starts again on 3."""
  hosts = _hosts(tmp_path / "hosts", "localhost:2")
  starts = tmp_path / "starts"
  proc = _start_on_two_of_three(tmp_path, hosts, starts, run_seconds=4)
  try:
    deadline = time.monotonic() + 30
    while not (starts.exists() and len(_indices(starts)) == 2):
      assert time.monotonic() < deadline
      time.sleep(0.1)
    _hosts(tmp_path / "hosts", "localhost:2", "localhost")
    out, err = proc.communicate(timeout=60)
  finally:
    proc.kill()
  assert proc.returncode == 0, err[-3000:]
  assert "elastic: starting on 2 of 3 workers (--hosts offers 2 slots)" in err
  assert "resize: 2 -> 3 workers at step 10 (--hosts offers 3 slot(s))" in err
  assert sorted(_indices(starts)) == sorted("01" "012")
  del out


@pytest.mark.slow
def test_a_job_that_loses_a_worker_goes_on_with_two_and_grows_back_exact(
    tmp_path):
  """digits, deterministic, 3 workers: worker 2 is killed at step 60 and
  its slot dropped (--slot_failures=1), the job resumes from step 40 on 2
  workers; a hosts line added grows it back to 3. Every logged loss and
  the final weights equal the fault-free job's (run on one device: the
  stream gives any worker count the same global batches) to float
  tolerance (the same examples, added in another order)."""
  hosts = _hosts(tmp_path / "hosts", "localhost:3")
  train = ["--config=configs/digits.py", "--config.train.deterministic=True",
           "--config.train.steps=160", "--config.train.steps_per_loop=10",
           "--config.train.checkpoint_every=40",
           "--config.data.global_batch_size=48",
           "--config.data.eval_batch_size=48",
           "--config.callbacks.progress_bar=False",
           "--config.callbacks.tensorboard=False",
           "--config.callbacks.custom=recorder:KillAt,throttle:Throttle"]
  # Each host loop of the elastic job sleeps 0.5 s: time for the launcher to
  # see the new hosts line and a checkpoint before the job ends.
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=HELPERS,
             THROTTLE_SECONDS="0")
  # The fault-free reference: the same job in one process on one device
  # (the in-memory stream gives every worker count the same global batches).
  procs = {"straight": subprocess.Popen(
      [sys.executable, "-m", "launch.train", *train,
       "--config.distribution.strategy=one_device",
       f"--workdir={tmp_path / 'straight'}"], cwd=ROOT, text=True,
      stdout=open(tmp_path / "straight.log", "w"), stderr=subprocess.STDOUT,
      env=env)}
  procs["elastic"] = subprocess.Popen(
      [sys.executable, "-m", "launch.local", "--num_workers=3",
       "--grace_seconds=5", "--min_workers=2", "--max_restarts=2",
       "--slot_failures=1", f"--hosts={hosts}", "--", *train,
       f"--workdir={tmp_path / 'elastic'}"], cwd=ROOT, text=True,
      stdout=open(tmp_path / "elastic.log", "w"), stderr=subprocess.STDOUT,
      env=dict(env, KILL_AT_STEP="60", KILL_WORKER="2",
               KILL_ONCE_FILE=str(tmp_path / "once"), THROTTLE_SECONDS="0.5"))
  try:
    log = tmp_path / "elastic.log"
    deadline = time.monotonic() + 300
    while "resize: 3 -> 2" not in log.read_text():
      assert time.monotonic() < deadline and procs["elastic"].poll() is None
      time.sleep(0.2)
    _hosts(tmp_path / "hosts", "localhost:3", "localhost")  # one more
    for proc in procs.values():
      proc.wait(timeout=300)
  finally:
    for proc in procs.values():
      proc.kill()
  out = log.read_text()
  assert procs["elastic"].returncode == 0, out[-4000:]
  assert procs["straight"].returncode == 0
  assert ("resize: 3 -> 2 workers at step 40 (worker 2 failed on 1 "
          "start(s) in a row)") in out
  assert "resize: 2 -> 3 workers at step" in out, out[-4000:]
  assert "(--hosts offers 4 slot(s), 1 dropped)" in out
  events = [r for r in read_metrics(tmp_path / "elastic")
            if r.get("event") == "resize"]
  assert [(e["from_workers"], e["to_workers"]) for e in events] == [
      (3, 2), (2, 3)]
  # What each cost: from the failure (the resize asked) to the next step.
  recovered = [r for r in read_metrics(tmp_path / "elastic")
               if r.get("event") == "recovered"]
  assert [r["after"] for r in recovered] == ["restart 1", "resize"], out[-3000:]
  assert all(0 < r["seconds"] < 120 for r in recovered)
  assert recovered[0]["step"] == 50 and (
      "recovered from restart 1: training again at step 50, ") in out
  losses = lambda d: {r["step"]: r["train/loss"] for r in read_metrics(d)
                      if "train/loss" in r}
  want, got = losses(tmp_path / "straight"), losses(tmp_path / "elastic")
  assert sorted(got) == sorted(want) == list(range(10, 161, 10))
  np.testing.assert_allclose([got[s] for s in sorted(got)],
                             [want[s] for s in sorted(want)], rtol=1e-5)
  want, got = variables(tmp_path / "straight"), variables(tmp_path / "elastic")
  assert sorted(got) == sorted(want) and len(want) > 5
  for name, value in want.items():  # measured: 6.1e-6 at most (Adam divides
    # a float difference in a near-zero gradient by its small second moment)
    np.testing.assert_allclose(got[name], value, rtol=1e-4, atol=2e-5,
                               err_msg=name)
  json.dumps(events)  # events are plain JSON
