"""Checkpoints and resume: exact after SIGKILL, SIGTERM preemption, corrupt
checkpoints, config changes, a different replica count, NaN stops."""

import json
import logging
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import tensorflow as tf

from configs import digits
from tests.helpers.checkpoints import variables as _variables
from conftest import ROOT, run_module, run_modules
from trainer import data as data_lib
from trainer.callbacks import TrainerCallback, read_metrics
from trainer.distribute import stop_signals
from trainer.errors import ConfigError, TrainingDiverged
from trainer.run import run


def test_stream_resumed_at_any_step_continues_the_same_batches(mirrored):
  images = np.arange(50, dtype=np.float32)[:, None]
  labels = np.arange(50, dtype=np.int32)

  def batches(strategy, start, steps):
    fn = data_lib.stream_input_fn((images, labels), global_batch_size=8,
                                  seed=3, start_step=start)
    it = iter(strategy.distribute_datasets_from_function(fn))
    out = []
    for _ in range(steps):
      parts = strategy.experimental_local_results(next(it)[1])
      out.append(np.concatenate([p.numpy() for p in parts]).tolist())
    return out

  one = tf.distribute.OneDeviceStrategy("/cpu:0")
  straight = batches(one, 0, 20)
  assert batches(one, 0, 7) + batches(one, 7, 13) == straight
  assert batches(mirrored, 7, 13) == straight[7:]  # 2 replicas: same batches
  seen = [i for b in straight for i in b]  # 160 = 3 epochs of 50 + 10
  for epoch in range(3):  # each epoch: every example exactly once
    assert sorted(seen[epoch * 50:(epoch + 1) * 50]) == list(range(50))
  assert seen[:50] != seen[50:100]  # reshuffled each epoch


EXACT = ["--config=configs/digits.py", "--config.train.deterministic=True",
         "--config.train.steps=120", "--config.train.steps_per_loop=10",
         "--config.train.steps_per_epoch=40",
         "--config.train.checkpoint_every=30", "--config.model.dropout=0.2",
         "--config.callbacks.progress_bar=False",
         "--config.callbacks.tensorboard=False",
         "--config.callbacks.custom=recorder:KillAt"]
HELPERS = {"PYTHONPATH": os.path.join(ROOT, "tests", "helpers")}


@pytest.mark.slow
def test_sigkill_at_a_random_step_then_restart_is_bit_identical(tmp_path):
  kill_at = random.Random().choice([s for s in range(10, 111, 10)
                                    if s % 30])
  straight, killed = tmp_path / "straight", tmp_path / "killed"
  runs = run_modules({  # side by side
      "straight": (("launch.train", *EXACT, f"--workdir={straight}"),
                   {"env": HELPERS}),
      "killed": (("launch.train", *EXACT, f"--workdir={killed}"),
                 {"env": {**HELPERS, "KILL_AT_STEP": str(kill_at)}})},
                     processes=2)
  assert runs["straight"].returncode == 0, runs["straight"].stderr[-3000:]
  proc = runs["killed"]
  assert proc.returncode == -signal.SIGKILL, (kill_at, proc.stderr[-2000:])
  again = run_module("launch.train", *EXACT, f"--workdir={killed}",
                     env=HELPERS)
  assert again.returncode == 0, again.stderr[-3000:]
  assert f"(step {kill_at // 30 * 30})" in again.stderr or kill_at < 30
  want = _variables(straight / "checkpoints")
  got = _variables(killed / "checkpoints")
  assert sorted(got) == sorted(want) and len(want) > 10
  for name, value in want.items():
    np.testing.assert_array_equal(got[name], value, err_msg=name)
  # The same examples in the same order: every loop's loss is identical.
  losses = lambda d: [(r["step"], r["train/loss"])
                      for r in read_metrics(d) if "train/loss" in r]
  assert losses(killed) == losses(straight)


@pytest.mark.slow
@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT],
                         ids=["SIGTERM", "ctrl-c"])
def test_sigterm_saves_within_one_loop_and_the_rerun_continues(stop,
                                                               tmp_path):
  """SIGTERM (a scheduler) and Ctrl-C (SIGINT) alike: the run saves at the
  next host-loop boundary and exits 75 (Ctrl-C used to be a 100-line
  KeyboardInterrupt traceback, exit 130, nothing saved)."""
  args = ["launch.train", "--config=configs/digits.py",
          f"--workdir={tmp_path}", "--config.train.steps=100000",
          "--config.train.steps_per_loop=20",
          "--config.callbacks.progress_bar=False"]
  proc = subprocess.Popen([sys.executable, "-m", *args], cwd=ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, env=dict(os.environ,
                                              TF_CPP_MIN_LOG_LEVEL="2"))
  metrics = tmp_path / "metrics.jsonl"
  deadline = time.monotonic() + 120
  while time.monotonic() < deadline and not (
      metrics.exists() and len(metrics.read_text().splitlines()) >= 5):
    time.sleep(0.2)
  proc.send_signal(stop)
  sent = time.monotonic()
  out, err = proc.communicate(timeout=60)
  assert proc.returncode == 75, err[-3000:]
  assert time.monotonic() - sent < 10  # one loop of 20 steps is ~0.05 s
  step = read_metrics(tmp_path)[-1]["step"]
  assert f"preempted: stopped at step {step} on {stop.name}" in out
  assert "Traceback" not in err
  assert (tmp_path / "checkpoints" / f"ckpt-{step}.index").exists()
  again = run_module(*args[:3], f"--config.train.steps={step + 40}",
                     *args[4:])
  assert again.returncode == 0, again.stderr[-3000:]
  assert f"(step {step})" in again.stderr
  assert read_metrics(tmp_path)[-1]["step"] == step + 40


@pytest.mark.slow
def test_a_second_ctrl_c_stops_at_once_in_one_line(tmp_path):
  """Host loops of 10,000 steps (seconds each, one TensorFlow call): both
  Ctrl-Cs land inside one, and the second stops the run there, status 130,
  one line, no traceback; the first checkpoint stays."""
  proc = subprocess.Popen(
      [sys.executable, "-m", "launch.train", "--config=configs/digits.py",
       f"--workdir={tmp_path}", "--config.train.steps=10000000",
       "--config.train.steps_per_loop=10000",
       "--config.train.checkpoint_every=10000",
       "--config.train.steps_per_epoch=100000000",
       "--config.callbacks.progress_bar=False"], cwd=ROOT,
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
      env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
  checkpoint = tmp_path / "checkpoints" / "ckpt-10000.index"
  deadline = time.monotonic() + 120
  while time.monotonic() < deadline and not checkpoint.exists():
    time.sleep(0.1)
  time.sleep(1.0)  # into the next loop (~6 s), past the save of the last
  proc.send_signal(signal.SIGINT)
  time.sleep(0.5)
  proc.send_signal(signal.SIGINT)
  out, err = proc.communicate(timeout=60)
  assert proc.returncode == 130, err[-3000:]
  assert "Traceback" not in err and "preempted" not in out
  assert err.strip().splitlines()[-1].startswith(
      "interrupted: stopped at once by a second Ctrl-C, not saved")
  assert "SIGINT: stopping at the next step boundary and saving a " \
      "checkpoint; press Ctrl-C again to stop at once" in err
  assert checkpoint.exists()



@pytest.mark.slow
def test_sigterm_to_a_two_worker_job_saves_on_both_and_the_rerun_continues(
    tmp_path):
  flags = ["--config=configs/digits.py", f"--workdir={tmp_path}",
           "--config.train.steps_per_loop=20",
           "--config.callbacks.progress_bar=False"]
  proc = subprocess.Popen(
      [sys.executable, "-m", "launch.local", "--num_workers=2", "--", *flags,
       "--config.train.steps=100000"], cwd=ROOT, stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True,
      env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
  metrics = tmp_path / "metrics.jsonl"
  deadline = time.monotonic() + 180
  while time.monotonic() < deadline and proc.poll() is None and not (
      metrics.exists() and len(metrics.read_text().splitlines()) >= 5):
    time.sleep(0.2)
  # Ctrl-C; the launcher forwards it to both (SIGTERM takes the same path).
  proc.send_signal(signal.SIGINT)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 75, err[-3000:]
  step = read_metrics(tmp_path)[-1]["step"]
  assert f"[worker 0] preempted: stopped at step {step} on SIGINT" in out
  assert "error: worker" not in err and "preempted: the workers saved" in err
  assert (tmp_path / "checkpoints" / f"ckpt-{step}.index").exists()
  again = run_module("launch.local", "--num_workers=2", "--", *flags,
                     f"--config.train.steps={step + 40}", timeout=240)
  assert again.returncode == 0, again.stderr[-3000:]
  assert f"(step {step})" in again.stderr
  assert f"[worker 0] done: {step + 40} steps" in again.stdout


def _config(**train):
  config = digits.get_config()
  config.callbacks.progress_bar = False
  config.callbacks.tensorboard = False
  for key, value in train.items():
    config.train[key] = value
  return config


def test_corrupt_latest_checkpoint_falls_back_to_the_one_before(
    tmp_path, caplog):
  caplog.set_level(logging.INFO, logger="absl")
  run(_config(steps=60, checkpoint_every=20, steps_per_loop=20),
      str(tmp_path))
  data = tmp_path / "checkpoints" / "ckpt-60.data-00000-of-00001"
  data.write_bytes(data.read_bytes()[:100])  # truncated
  result = run(_config(steps=80, checkpoint_every=20, steps_per_loop=20),
               str(tmp_path))
  assert "ckpt-60 is unreadable" in caplog.text
  assert "restored" in caplog.text and "(step 40)" in caplog.text
  assert result.steps == 80


def test_resume_with_a_changed_model_is_refused_unless_allowed(tmp_path):
  run(_config(steps=20), str(tmp_path))
  config = _config(steps=40)
  config.model.dropout = 0.5
  with pytest.raises(ConfigError, match=r"model.dropout 0.0 -> 0.5.*"
                     "--allow_config_change"):
    run(config, str(tmp_path))
  assert run(config, str(tmp_path), allow_config_change=True).steps == 40


def test_two_replica_checkpoint_resumes_on_one_device(tmp_path):
  config = _config(steps=100)
  config.distribution.strategy = "mirrored"
  config.distribution.num_cpu_devices = 2
  run(config, str(tmp_path))
  config = _config(steps=300)
  config.distribution.strategy = "one_device"
  result = run(config, str(tmp_path))
  assert result.steps == 300 and "one_device" not in result.device
  records = [r for r in read_metrics(tmp_path) if "eval/accuracy" in r]
  assert [r["step"] for r in records] == [100, 200, 300]
  assert records[-1]["eval/accuracy"] > records[0]["eval/accuracy"] > 0.8


@pytest.mark.slow
def test_nan_in_float32_stops_with_the_step_and_keeps_the_checkpoint(
    tmp_path):
  base = ["launch.train", "--config=configs/digits.py", f"--workdir={tmp_path}",
          "--config.train.checkpoint_every=20",
          "--config.callbacks.progress_bar=False"]
  assert run_module(*base, "--config.train.steps=40").returncode == 0
  ckpt = tmp_path / "checkpoints"
  before = {p: (ckpt / p).read_bytes() for p in os.listdir(ckpt)}
  proc = run_module(*base, "--config.train.steps=200",
                    "--config.optimizer.learning_rate=1e30")
  assert proc.returncode == 3, proc.stderr[-3000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("error: training diverged: the training loss is")
  assert "after global step" in last and "ckpt-40, is intact" in last
  assert {p: (ckpt / p).read_bytes() for p in os.listdir(ckpt)} == before


class PoisonWeights(TrainerCallback):
  """A fault: at the first `times` host-loop ends at or after global step
  `step`, sets the output bias to NaN (as a bit flip in memory would; a NaN
  before a relu would be silently zeroed)."""

  def __init__(self, step: int, times: int):
    super().__init__()
    self.step, self.times = step, times

  def on_train_batch_end(self, batch, logs=None):
    if self.global_step >= self.step and self.times > 0:
      self.times -= 1
      bias = self.model.trainable_variables[-1]
      bias.assign(bias * float("nan"))


class StepsSeen(TrainerCallback):
  """Records the global step at every host-loop end; asks for a loop end at
  every multiple of `every`."""

  def __init__(self, every: int):
    super().__init__()
    self.ends_loops_every, self.steps = every, []

  def on_train_batch_end(self, batch, logs=None):
    self.steps.append(self.global_step)


def test_checkpoints_and_callbacks_get_the_exact_steps_they_ask_for(tmp_path):
  # Neither 5 nor 6 divides steps_per_loop=8: host loops (of at most 8
  # steps) end at every multiple of 5 (checkpoints) and 6 (the callback).
  seen = StepsSeen(every=6)
  run(_config(steps=30, steps_per_loop=8, checkpoint_every=5),
      str(tmp_path), callbacks=[seen])
  assert seen.steps == [5, 6, 10, 12, 15, 18, 20, 24, 25, 30]
  saved = sorted(int(name[5:-6]) for name in os.listdir(
      tmp_path / "checkpoints") if name.endswith(".index"))
  assert saved == [20, 25, 30]  # the newest 3 of 5, 10, ..., 30


def _input_offset(workdir) -> int:
  reader = tf.train.load_checkpoint(str(workdir / "checkpoints"))
  return int(reader.get_tensor("input_offset/.ATTRIBUTES/VARIABLE_VALUE"))


def test_nan_recovery_restores_skips_the_bad_window_and_finishes(
    tmp_path, caplog):
  caplog.set_level(logging.INFO, logger="absl")
  config = _config(steps=120, steps_per_loop=10, checkpoint_every=30,
                   nan_recovery=2)
  # Poisoned after step 50: the loop ending at 60 has a NaN loss; the latest
  # checkpoint is step 30, so batches 30..59 are skipped.
  result = run(config, str(tmp_path), callbacks=[PoisonWeights(50, times=1)])
  assert "recovery 1 of 2: restored step 30 and skipping the 30 batches" in (
      caplog.text)
  assert result.steps == 120 and np.isfinite(result.logs["loss"])
  assert result.logs["eval/accuracy"] > 0.8
  assert _input_offset(tmp_path) == 30
  train_steps = [r["step"] for r in read_metrics(tmp_path)
                 if "train/loss" in r]
  assert train_steps == list(range(10, 121, 10))  # the undone lines dropped
  # A resumed run keeps the offset: step k still reads batch k + 30.
  assert run(_config(steps=150, steps_per_loop=10, checkpoint_every=30,
                     nan_recovery=2), str(tmp_path)).steps == 150
  assert _input_offset(tmp_path) == 30


def test_nan_recovery_gives_up_after_its_bound(tmp_path):
  config = _config(steps=120, steps_per_loop=10, checkpoint_every=30,
                   nan_recovery=2)
  with pytest.raises(TrainingDiverged) as raised:
    run(config, str(tmp_path), callbacks=[PoisonWeights(50, times=3)])
  assert raised.value.step == 60
  assert raised.value.checkpoint.endswith("ckpt-30")
  assert _input_offset(tmp_path) == 0  # the checkpoint on disk is untouched


@pytest.mark.slow  # in-process, but over 5 s: CI runs it
def test_async_checkpoints_equal_sync_ones_and_resume(tmp_path, mirrored):
  del mirrored  # the 2 logical CPUs: the async path under MirroredStrategy
  saved = {}
  for mode in ("sync", "async"):
    config = _config(steps=60, steps_per_loop=20, checkpoint_every=20,
                     async_checkpoint=mode == "async")
    config.distribution.strategy = "mirrored"
    config.distribution.num_cpu_devices = 2
    run(config, str(tmp_path / mode))
    assert sorted(os.listdir(tmp_path / mode / "checkpoints")) == sorted(
        os.listdir(tmp_path / "sync" / "checkpoints"))
    saved[mode] = _variables(tmp_path / mode / "checkpoints")
  assert sorted(saved["async"]) == sorted(saved["sync"])
  for name, value in saved["sync"].items():
    if name != "_CHECKPOINTABLE_OBJECT_GRAPH":  # host copies' names differ
      np.testing.assert_array_equal(saved["async"][name], value, err_msg=name)
  config.train.steps = 80
  assert run(config, str(tmp_path / "async")).steps == 80


def test_a_run_saved_before_a_new_config_key_existed_still_resumes(tmp_path):
  run(_config(steps=20), str(tmp_path))
  path = tmp_path / "config.json"
  saved = json.loads(path.read_text())
  del saved["model"]["sync_batch_norm"]  # as written by an older version
  path.write_text(json.dumps(saved))
  assert run(_config(steps=40), str(tmp_path)).steps == 40


@pytest.mark.slow
def test_a_second_ctrl_c_in_a_notebook_raises_and_keeps_the_process(
    tmp_path):
  """`trainer.run.run` called in-process (a notebook): two Ctrl-Cs inside
  one host loop (one TensorFlow call of 5,000 steps, ~1 s, where Python
  runs the handler once for both) raise KeyboardInterrupt with the one-line
  reason when that loop returns, instead of ending the process (the
  launcher's os._exit killed a notebook's kernel); the signal handlers are
  the caller's again afterwards and the checkpoint before it stays."""
  config = digits.get_config()
  config.train.steps, config.train.steps_per_loop = 100_000, 5_000
  config.train.steps_per_epoch = 1_000_000
  config.train.checkpoint_every = 5_000
  config.callbacks.progress_bar = False

  def interrupt_twice():
    time.sleep(0.1)
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.1)
    os.kill(os.getpid(), signal.SIGINT)

  class InterruptTheSecondLoop(TrainerCallback):
    """Starts the two Ctrl-Cs as the second host loop begins."""

    def on_train_batch_begin(self, batch, logs=None):
      if self.global_step == 5_000:
        threading.Thread(target=interrupt_twice, daemon=True).start()

  before = signal.getsignal(signal.SIGINT)
  with pytest.raises(KeyboardInterrupt,
                     match=re.escape(stop_signals.SECOND_INTERRUPT)):
    run(config, str(tmp_path), callbacks=[InterruptTheSecondLoop()])
  assert signal.getsignal(signal.SIGINT) is before
  assert (tmp_path / "checkpoints" / "ckpt-5000.index").exists()

