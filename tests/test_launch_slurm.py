"""launch/slurm/train.sbatch on a real SLURM cluster: 2 workers, requeue.

Needs `sbatch` on PATH and a cluster with a node of 2 free CPUs: on this kind
of machine `bash launch/slurm/local_cluster.sh` (as .ci/run does) starts one.
Jobs are polled with `scontrol show job` (sbatch --wait polls with a backoff
that adds up to ~30 s per job) and cancelled in a `finally`.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import time
import types

import pytest
import tensorflow as tf

from trainer.distribute import strategy as strategy_lib
from trainer.errors import ConfigError

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("sbatch") is None,
                       reason="sbatch is not on PATH: no SLURM cluster "
                       "(bash launch/slurm/local_cluster.sh starts one)"),
]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SBATCH = os.path.join(ROOT, "launch", "slurm", "train.sbatch")
ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL",
         "PREEMPTED", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE")


# -- the SLURM environment -> cluster, in-process (no job needed) ------------

STEP = {  # rank 2 of `srun -N 2 --ntasks-per-node=2` on node9 and node10
    "SLURM_JOB_ID": "123456", "SLURM_STEP_ID": "0", "SLURM_PROCID": "2",
    "SLURM_LOCALID": "0", "SLURM_STEP_NUM_TASKS": "4",
    "SLURM_STEP_NODELIST": "node[9-10]", "SLURM_STEP_TASKS_PER_NODE": "2(x2)"}


@pytest.fixture
def slurm_env(monkeypatch):
  for key in list(os.environ):
    if key.startswith("SLURM_") or key in ("TF_CONFIG",
                                           strategy_lib.PORT_BASE_ENV):
      monkeypatch.delenv(key)
  for key, value in STEP.items():
    monkeypatch.setenv(key, value)
  return monkeypatch


def test_step_environment_gives_workers_in_slurm_order(slurm_env):
  del slurm_env
  resolver = strategy_lib._slurm_resolver()  # pylint: disable=protected-access
  # SLURM's order (node9 before node10, not string order), one port per task
  # on a node from 15000 + job id % 10000.
  assert resolver.cluster_spec().as_dict() == {"worker": [
      "node9:18456", "node9:18457", "node10:18456", "node10:18457"]}
  assert (resolver.task_type, resolver.task_id) == ("worker", 2)
  assert resolver.num_accelerators() == {"GPU": 0}  # CPU-only: no GPU
  fake = types.SimpleNamespace(cluster_resolver=resolver)
  assert not strategy_lib.is_chief(fake)
  assert strategy_lib.num_workers(fake) == 4
  resolver._rank = 0  # pylint: disable=protected-access
  resolver.task_id = 0
  assert strategy_lib.is_chief(fake)


def test_gpus_are_split_between_the_tasks_of_a_node(slurm_env):
  slurm_env.setenv("SLURM_GPUS_ON_NODE", "4")
  slurm_env.setenv("SLURM_LOCALID", "1")
  slurm_env.setenv(strategy_lib.PORT_BASE_ENV, "20000")
  gpus = [f"GPU:{i}" for i in range(4)]
  pinned = []
  slurm_env.setattr(tf.config, "list_physical_devices", lambda kind: (
      gpus if kind == "GPU" else []))
  slurm_env.setattr(tf.config, "set_visible_devices",
                    lambda devices, kind: pinned.append((devices, kind)))
  resolver = strategy_lib._slurm_resolver()  # pylint: disable=protected-access
  assert pinned == [(["GPU:2", "GPU:3"], "GPU")]
  assert resolver.num_accelerators() == {"GPU": 2}
  assert resolver.cluster_spec().as_dict()["worker"][0] == "node9:20000"


@pytest.mark.parametrize("env, message", [
    ({"SLURM_STEP_ID": None, "SLURM_STEP_NUM_TASKS": None,
      "SLURM_NTASKS": "4"}, "not a job step: start one process per task"),
    ({"SLURM_STEP_TASKS_PER_NODE": "3,2"}, "inconsistent SLURM step"),
    ({"SLURM_STEP_NODELIST": "node[9-"}, "SLURM environment is incomplete"),
    ({"SLURM_DISTRIBUTION": "cyclic"}, "use --distribution=block"),
    ({strategy_lib.PORT_BASE_ENV: "80"}, "is not a port number"),
    ({"SLURM_GPUS_ON_NODE": "1"}, "use at most one task per GPU"),
])
def test_bad_slurm_environment_is_one_clear_error(slurm_env, env, message):
  for key, value in env.items():
    if value is None:
      slurm_env.delenv(key)
    else:
      slurm_env.setenv(key, value)
  with pytest.raises(ConfigError, match=message):
    strategy_lib._slurm_resolver()  # pylint: disable=protected-access


def test_any_distribution_of_one_task_per_node_is_node_order(slurm_env):
  """SLURM sets SLURM_DISTRIBUTION=cyclic for one task per node, which is
  train.sbatch's default: that numbered node by node too, and was refused
  (the README's plain `sbatch launch/slurm/train.sbatch ...` exited 2)."""
  slurm_env.setenv("SLURM_DISTRIBUTION", "cyclic")
  slurm_env.setenv("SLURM_STEP_TASKS_PER_NODE", "1(x2)")
  slurm_env.setenv("SLURM_STEP_NUM_TASKS", "2")
  slurm_env.setenv("SLURM_PROCID", "1")
  resolver = strategy_lib._slurm_resolver()  # pylint: disable=protected-access
  assert resolver.cluster_spec().as_dict() == {"worker": [
      "node9:18456", "node10:18456"]}
  assert resolver.task_id == 1


def test_multi_worker_without_tf_config_or_slurm_names_both(slurm_env):
  for key in STEP:
    slurm_env.delenv(key)
  with pytest.raises(ConfigError, match="needs a cluster.*SLURM"):
    strategy_lib.build_strategy("multi_worker")


# -- real jobs ----------------------------------------------------------------


def _env(**extra) -> dict:
  env = {k: v for k, v in os.environ.items()
         if not k.startswith("SLURM_") and k != "TF_CONFIG"}
  env.update(PYTHON=sys.executable, TF_CPP_MIN_LOG_LEVEL="2", **extra)
  return env


def _submit(workdir, log, flags, env=None,
            config="configs/digits.py") -> str:
  """Submits train.sbatch as 2 tasks on one node; returns the job id."""
  cmd = ["sbatch", "--parsable", "--job-name=test_launch_slurm", "--nodes=1",
         "--ntasks-per-node=2", f"--output={log}", SBATCH,
         f"--config={config}", f"--workdir={workdir}",
         "--config.callbacks.progress_bar=False", *flags]
  out = subprocess.run(cmd, cwd=ROOT, env=env or _env(), capture_output=True,
                       text=True, timeout=30, check=False)
  assert out.returncode == 0, f"sbatch failed: {out.stderr}"
  return out.stdout.strip().split(";")[0]


def _job(job_id: str) -> dict:
  """`scontrol show job` as a dict ({} once SLURM has forgotten the job)."""
  out = subprocess.run(["scontrol", "-o", "show", "job", job_id],
                       capture_output=True, text=True, timeout=30,
                       check=False)
  return dict(re.findall(r"(\w+)=(\S*)", out.stdout))


def _tail(path, lines=40) -> str:
  text = path.read_text() if path.exists() else "(no log)"
  return "\n".join(text.splitlines()[-lines:])


def _wait(what: str, predicate, timeout: float, log) -> None:
  deadline = time.monotonic() + timeout
  while not predicate():
    if time.monotonic() > deadline:
      raise AssertionError(f"timed out after {timeout}s waiting for {what}; "
                           f"log tail:\n{_tail(log)}")
    time.sleep(0.5)


def _cancel(job_id: str) -> None:
  """Cancels the job if it is still there and waits (bounded) until gone."""
  subprocess.run(["scancel", job_id], capture_output=True, timeout=30,
                 check=False)
  deadline = time.monotonic() + 45  # KillWait=30 in local_cluster.sh
  while (_job(job_id).get("JobState") not in (None, *ENDED) and
         time.monotonic() < deadline):
    time.sleep(0.5)


def _metrics(workdir) -> list[dict]:
  path = workdir / "metrics.jsonl"
  if not path.exists():
    return []
  return [json.loads(l) for l in path.read_text().splitlines() if l.strip()]


def _run_to_completion(workdir, log, flags, **submit) -> tuple[str, str]:
  """Submits, waits for the job to end, asserts it COMPLETED with exit 0;
  returns (job id, its log)."""
  job = _submit(workdir, log, flags, **submit)
  try:
    _wait("the job to end", lambda: _job(job).get("JobState") in ENDED, 110,
          log)
  finally:
    _cancel(job)
  info = _job(job)
  assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), \
      _tail(log)
  return job, log.read_text()


def test_two_workers_train_digits_and_only_the_chief_writes(tmp_path):
  workdir, log = tmp_path / "run", tmp_path / "slurm.log"
  start = time.monotonic()
  job, text = _run_to_completion(workdir, log, ["--config.train.steps=300"])
  for task in (0, 1):  # both workers saw the same 2-worker cluster
    assert re.search(
        r"strategy MultiWorkerMirroredStrategy: 2 replica\(s\), cluster "
        r"\{'worker': \['[\w.-]+:\d+', '[\w.-]+:\d+'\]\}, this task worker "
        f"{task}", text), _tail(log)
  records = _metrics(workdir)
  evals = [r for r in records if "eval/accuracy" in r]
  # A one-host run with the same flags reaches 0.970 (same global batches).
  assert evals and evals[-1]["step"] == 300, records
  assert evals[-1]["eval/accuracy"] >= 0.95, evals
  # One copy of everything: the chief writes, the other worker does not.
  train_steps = [r["step"] for r in records if "train/loss" in r]
  assert train_steps == list(range(50, 301, 50)), train_steps
  assert len(evals) == 3, evals
  assert sorted(os.listdir(workdir)) == [
      "checkpoints", "config.json", "metrics.jsonl", "tensorboard"]
  saved = os.listdir(workdir / "checkpoints")  # no per-worker copies
  assert "ckpt-300.index" in saved and all(
      re.fullmatch(r"checkpoint|ckpt-\d+\.(index|data-\d+-of-\d+)", name)
      for name in saved), saved
  assert text.count("done: 300 steps") == 1, _tail(log)
  print(f"job {job}: {time.monotonic() - start:.0f}s from submit to end, "
        f"eval accuracy {evals[-1]['eval/accuracy']:.3f}")


def test_a_users_own_task_trains_on_two_workers(tmp_path):
  """configs/regression.py: a task with its own loss, metric and
  activation, as a SLURM job of 2 tasks."""
  workdir, log = tmp_path / "run", tmp_path / "slurm.log"
  _, text = _run_to_completion(workdir, log, ["--config.train.steps=100"],
                               config="configs/regression.py")
  assert "MultiWorkerMirroredStrategy: 2 replica(s)" in text, _tail(log)
  evals = [r for r in _metrics(workdir) if "eval/r2" in r]
  assert evals and evals[-1]["step"] == 100 and "eval/mae" in evals[-1]
  assert text.count("done: 100 steps") == 1, _tail(log)


def _requeued_run_completes(job: str, log) -> str:
  """Waits for SLURM to requeue `job`, starts it at once, waits for the
  second run to end; asserts it COMPLETED after one restart; its log."""
  _wait("the requeue", lambda: int(_job(job).get("Restarts", 0)) >= 1 and
        _job(job).get("JobState") == "PENDING", 60, log)
  # SLURM holds a requeued job for ~2 minutes (BeginTime); skip that, but
  # not within the second of the requeue: slurmd refuses a credential no
  # newer (in whole seconds) than the one it revoked ("Job credential
  # revoked") and the job then fails.
  time.sleep(2)
  subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"],
                 check=True, timeout=30)
  _wait("the resumed run to end",
        lambda: _job(job).get("JobState") in ENDED, 90, log)
  info = _job(job)
  assert (info["JobState"], info["ExitCode"], info["Restarts"]) == (
      "COMPLETED", "0:0", "1"), _tail(log)
  return log.read_text()


@pytest.mark.parametrize("preempt", [
    # What SLURM does on preemption (PreemptMode=REQUEUE) or an admin
    # requeue: SIGTERM to the batch script, srun and the tasks, SIGKILL
    # KillWait seconds later; SLURM requeues the job itself.
    ["scontrol", "requeue"],
    # What --signal=B:TERM@120 does before the time limit: SIGTERM to the
    # batch script alone; its trap forwards it to the tasks and, on their
    # exit status 75, it requeues the job.
    ["scancel", "--batch", "--signal=TERM"],
], ids=["scontrol_requeue", "batch_sigterm"])
def test_preempted_job_is_requeued_and_resumes(tmp_path, preempt):
  workdir, log = tmp_path / "run", tmp_path / "slurm.log"
  steps = 800  # >= 0.1 s per 20-step loop: >= 4 s of training per run
  env = _env(PYTHONPATH=os.path.join(ROOT, "tests", "helpers"),
             THROTTLE_SECONDS="0.1")
  start = time.monotonic()
  job = _submit(workdir, log, [
      f"--config.train.steps={steps}", "--config.train.steps_per_loop=20",
      f"--config.train.checkpoint_every={steps}",  # only the preemption one
      "--config.callbacks.custom=throttle:Throttle"], env=env)
  try:
    _wait("a few host loops", lambda: sum(
        "train/loss" in r for r in _metrics(workdir)) >= 2, 60, log)
    subprocess.run([*preempt, job], check=True, timeout=30)
    text = _requeued_run_completes(job, log)
  finally:
    _cancel(job)
  stopped = re.findall(r"preempted: stopped at step (\d+)", text)
  restored = re.findall(r"restored \S+ \(step (\d+)\)", text)
  assert len(stopped) == 1 and 0 < int(stopped[0]) < steps, _tail(log)
  assert restored == stopped, _tail(log)  # run 2 resumed where 1 stopped
  assert "run 2 on" in text and f"done: {steps} steps" in text, _tail(log)
  assert _metrics(workdir)[-1]["step"] == steps
  print(f"job {job}: stopped at step {stopped[0]}, resumed, "
        f"{time.monotonic() - start:.0f}s from submit to end")


def test_a_killed_task_requeues_the_job_up_to_trainer_max_restarts(tmp_path):
  """kill -9 of worker 1 (a lost task) at step 60 of the first run, with
  TRAINER_MAX_RESTARTS=1: the job requeues itself, resumes from its
  checkpoint at step 40 and completes; the restart is in metrics.jsonl with
  the job id. The worker kills itself (recorder:KillAt), so the kill lands
  mid-run every time (a kill from outside once came after the job ended)."""
  workdir, log = tmp_path / "run", tmp_path / "slurm.log"
  steps = 400
  env = _env(PYTHONPATH=os.path.join(ROOT, "tests", "helpers"),
             TRAINER_MAX_RESTARTS="1", KILL_AT_STEP="60", KILL_WORKER="1",
             KILL_ONCE_FILE=str(tmp_path / "killed"))
  job = _submit(workdir, log, [
      f"--config.train.steps={steps}", "--config.train.steps_per_loop=20",
      "--config.train.checkpoint_every=40",
      "--config.callbacks.custom=recorder:KillAt"], env=env)
  try:
    text = _requeued_run_completes(job, log)
  finally:
    _cancel(job)
  assert (tmp_path / "killed").exists(), _tail(log)
  assert re.search(r"train.sbatch: restart 1: a worker was killed by \w+; "
                   r"resuming from step 40", text), _tail(log)
  events = [r for r in _metrics(workdir) if r.get("event") == "restart"]
  assert len(events) == 1 and events[0]["job"] == job, events
  assert f"done: {steps} steps" in text and _metrics(workdir)[-1]["step"] == (
      steps)
