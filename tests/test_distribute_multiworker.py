"""Multi-worker jobs on localhost (`launch.local`, real processes, real
MultiWorkerMirroredStrategy): the same numbers as one process with the same
replicas, a killed or hung worker ends the job within a bounded time with
nothing left running, and bad cluster input is one clear line."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.helpers.checkpoints import variables as _variables
from conftest import ROOT, run_module, run_modules
from trainer.callbacks import read_metrics

pytestmark = pytest.mark.slow

SMALL = ["--config=configs/digits.py", "--config.train.deterministic=True",
         "--config.train.steps=60", "--config.train.steps_per_loop=20",
         "--config.train.steps_per_epoch=30",
         "--config.train.checkpoint_every=0",
         "--config.callbacks.progress_bar=False",
         "--config.callbacks.tensorboard=False"]


def test_two_workers_train_like_two_mirrored_replicas_in_one_process(
    tmp_path):
  workers, mirrored = tmp_path / "workers", tmp_path / "mirrored"
  runs = run_modules({  # side by side
      "job": (("launch.local", "--num_workers=2", "--", *SMALL,
               f"--workdir={workers}"), {"timeout": 240}),
      "one": (("launch.train", *SMALL, f"--workdir={mirrored}",
               "--config.distribution.strategy=mirrored",
               "--config.distribution.num_cpu_devices=2"), {})}, processes=2)
  job, one = runs["job"], runs["one"]
  assert job.returncode == 0, job.stderr[-3000:]
  assert "MultiWorkerMirroredStrategy: 2 replica(s)" in job.stderr
  assert one.returncode == 0, one.stderr[-3000:]
  want, got = _variables(mirrored), _variables(workers)
  assert sorted(got) == sorted(want) and len(want) > 10
  for name, value in want.items():  # a sum of two is exact either way
    np.testing.assert_allclose(got[name], value, rtol=1e-6, atol=1e-7,
                               err_msg=name)
  losses = lambda d: [(r["step"], r["train/loss"])
                      for r in read_metrics(d) if "train/loss" in r]
  np.testing.assert_allclose(np.array(losses(workers)),
                             np.array(losses(mirrored)), rtol=1e-6)


def _start_job(workdir, *overrides, env=None):
  return subprocess.Popen(
      [sys.executable, "-m", "launch.local", "--num_workers=2",
       "--grace_seconds=5", "--", "--config=configs/digits.py",
       f"--workdir={workdir}", "--config.train.steps=1000000",
       "--config.train.steps_per_loop=20",
       "--config.callbacks.progress_bar=False", *overrides],
      cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
      env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2",
               PYTHONPATH=os.path.join(ROOT, "tests", "helpers"),
               **(env or {})))


def _worker_pids(launcher_pid: int) -> dict[int, int]:
  """{task index: pid} of the launcher's worker processes."""
  pids = {}
  for pid in map(int, filter(str.isdigit, os.listdir("/proc"))):
    try:
      with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
        parent = int(f.read().rsplit(")", 1)[1].split()[1])
      if parent != launcher_pid:
        continue
      with open(f"/proc/{pid}/environ", "rb") as f:
        env = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
    except (OSError, ValueError, IndexError):
      continue
    if b"TF_CONFIG" in env:
      pids[int(env[b"TF_CONFIG"].rsplit(b'"index": ', 1)[1].rstrip(b"}"))] = pid
  return pids


def _wait_for_training(proc, workdir, lines=3, seconds=180):
  metrics = workdir / "metrics.jsonl"
  deadline = time.monotonic() + seconds
  while time.monotonic() < deadline and proc.poll() is None and not (
      metrics.exists() and len(metrics.read_text().splitlines()) >= lines):
    time.sleep(0.2)
  assert proc.poll() is None, proc.communicate()[1][-3000:]


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  return True


def _disrupt(proc, workdir, action=lambda pids: None, timeout=180):
  """Waits until the job trains, calls `action({task: pid})`, waits for the
  launcher. Returns (pids, launcher stderr, seconds from the action to the
  launcher's exit, pids still alive then); kills whatever is left after."""
  pids = {}
  try:
    _wait_for_training(proc, workdir)
    pids = _worker_pids(proc.pid)
    assert sorted(pids) == [0, 1]
    action(pids)
    start = time.monotonic()
    _, err = proc.communicate(timeout=timeout)
    seconds = time.monotonic() - start
    return pids, err, seconds, [p for p in pids.values() if _alive(p)]
  finally:
    proc.kill()
    for pid in pids.values():  # a stopped worker ignores SIGTERM
      if _alive(pid):
        os.kill(pid, signal.SIGKILL)


def test_a_killed_worker_ends_the_job_naming_it_and_leaves_nothing_running(
    tmp_path):
  proc = _start_job(tmp_path)
  _, err, seconds, left = _disrupt(
      proc, tmp_path, lambda pids: os.kill(pids[1], signal.SIGKILL),
      timeout=120)
  assert proc.returncode == 1, err[-3000:]
  assert "error: worker 1 was killed by SIGKILL; stopping the other workers" in (
      err)
  assert seconds < 60, seconds  # worker 0 fails fast or is stopped (grace 5 s)
  assert not left


def test_a_stuck_worker_is_ended_by_its_watchdog_within_the_bound(tmp_path):
  """Worker 1 stays alive but never reaches the next all-reduce (a deadlock
  in user code): heartbeats go on, so only the per-process watchdog on
  host-loop progress (distribution.collective_timeout) can end the job."""
  proc = _start_job(tmp_path, "--config.distribution.collective_timeout=8",
                    "--config.callbacks.custom=recorder:HangAt",
                    env={"HANG_WORKER": "1", "HANG_AT_STEP": "60"})
  _, err, seconds, left = _disrupt(proc, tmp_path)
  assert proc.returncode == 1, err[-3000:]
  assert "exited with status 4; stopping the other workers" in err, (
      err[-3000:])
  assert re.search(r"made no progress for \d+", err), err[-3000:]  # 8 s, 9 s
  assert "in the callbacks after step" in err or "in train steps" in err
  assert "recorder.py" in err  # the stuck worker's Python stack is shown
  assert seconds < 8 + 40, seconds
  last = read_metrics(tmp_path)[-1]["step"]
  assert last <= 60 + 20  # nobody trained past the stuck step's next loop
  assert not left


def test_a_frozen_worker_ends_the_job_within_a_minute_by_default(tmp_path):
  """SIGSTOP with the default config: the process stops heartbeating and
  TensorFlow's coordination service ends the survivor's collective."""
  proc = _start_job(tmp_path)
  _, err, seconds, left = _disrupt(
      proc, tmp_path, lambda pids: os.kill(pids[1], signal.SIGSTOP))
  assert proc.returncode == 1, err[-3000:]
  assert "error: worker 0 exited with status" in err, err[-3000:]
  # The survivor says so in one line (it was a ~125-line traceback).
  assert "[worker 0] error: another worker of the job was lost" in err, (
      err[-3000:])
  assert "Traceback" not in err, err[-3000:]
  assert seconds < 60, seconds
  assert not left


def _listening(pid: int) -> set[tuple[str, int]]:
  """(address, port) of the TCP sockets process `pid` listens on."""
  inodes = set()
  for fd in os.listdir(f"/proc/{pid}/fd"):
    try:
      link = os.readlink(f"/proc/{pid}/fd/{fd}")
    except FileNotFoundError:  # closed since listdir: not a listening socket
      continue
    if link.startswith("socket:["):
      inodes.add(link[len("socket:["):-1])
  found = set()
  for table, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
    with open(f"/proc/{pid}/net/{table}", encoding="utf-8") as f:
      for row in f.read().splitlines()[1:]:
        fields = row.split()
        if fields[3] != "0A" or fields[9] not in inodes:  # 0A: LISTEN
          continue
        address, port = fields[1].split(":")
        raw = bytes.fromhex(address)  # 32-bit words in host (little) order
        raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
        found.add((socket.inet_ntop(family, raw), int(port, 16)))
  return found


def test_each_worker_listens_on_its_tf_config_port_on_every_interface(
    tmp_path):
  """What docs/outputs.md's trust boundary says: TensorFlow 2.21 binds a worker's
  gRPC server on all interfaces (`::`, dual-stack), at its TF_CONFIG port and
  nowhere else. If TensorFlow ever binds to the cluster spec's host, this
  fails: then bind launch.local to loopback and update the docs."""
  proc = _start_job(tmp_path)
  seen = {}

  def record_and_preempt(pids):
    for task, pid in pids.items():
      with open(f"/proc/{pid}/environ", "rb") as f:
        env = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0")
                   if b"=" in kv)
      cluster = json.loads(env[b"TF_CONFIG"])["cluster"]["worker"]
      seen[task] = (int(cluster[task].rsplit(":", 1)[1]), _listening(pid))
    proc.send_signal(signal.SIGTERM)

  _, err, _, left = _disrupt(proc, tmp_path, record_and_preempt)
  assert proc.returncode == 75, err[-3000:]
  assert not left
  for port, listening in seen.values():  # "::" is dual-stack: IPv4 too
    assert listening in ({("::", port)}, {("0.0.0.0", port)}), listening


BAD_CLUSTER = [
    ('{"cluster": {"worker": ["localhost:1"]}, "task": ', "TF_CONFIG is malformed"),
    ('{"cluster": {"worker": ["localhost:1", "localhost:2"]}, '
     '"task": {"type": "worker", "index": 2}}', "index 2 is out of range"),
]  # multi_worker without any cluster: tests/test_launch_train.py


@pytest.mark.parametrize("tf_config,message", BAD_CLUSTER,
                         ids=[m for _, m in BAD_CLUSTER])
def test_bad_cluster_input_is_one_line_and_never_a_hang(tf_config, message,
                                                        tmp_path):
  proc = run_module("launch.train", "--config=configs/digits.py",
                    f"--workdir={tmp_path / 'run'}",
                    "--config.distribution.strategy=multi_worker",
                    env={"TF_CONFIG": tf_config}, timeout=60)
  assert proc.returncode == 2, proc.stderr[-2000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("error: ") and message in last, last
  assert not (tmp_path / "run").exists()


def test_workers_that_resume_from_different_steps_stop_with_a_clear_error(
    tmp_path):
  """A workdir that is not shared (a node-local path): the chief finds its
  checkpoint, the other worker none. Every worker must refuse, not train."""
  from launch.local import free_ports, tf_config  # pylint: disable=import-outside-toplevel
  flags = ["--config=configs/digits.py", "--config.train.steps=40",
           "--config.callbacks.progress_bar=False",
           "--config.distribution.strategy=multi_worker"]
  ports = free_ports(2)
  first = run_module("launch.train", *flags[:-1], f"--workdir={tmp_path / 'a'}")
  assert first.returncode == 0, first.stderr[-2000:]
  procs = [subprocess.Popen(
      [sys.executable, "-m", "launch.train", *flags,
       "--config.train.steps=80", f"--workdir={tmp_path / name}"],
      cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
      env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2",
               TF_CONFIG=tf_config(ports, i)))
           for i, name in enumerate(("a", "b"))]
  try:
    errs = [p.communicate(timeout=180)[1] for p in procs]
  finally:
    for p in procs:
      p.kill()
  for proc, err in zip(procs, errs):
    assert proc.returncode == 2, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: the workers resumed from different steps")
    assert "the chief 40" in last
