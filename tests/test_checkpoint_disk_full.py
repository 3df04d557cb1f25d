"""A disk that fills up during a checkpoint save: one `error:` line, exit 5,
the half-written checkpoint removed, and the next run resumes from the last
complete one. The full disk is a small tmpfs (needs root, as CI runs)."""

import os
import re
import subprocess

import pytest

from conftest import run_module

pytestmark = pytest.mark.slow


@pytest.fixture
def small_disk(tmp_path):
  """A 1 MiB tmpfs: room for 3 digits checkpoints (~318 KB each)."""
  mountpoint = tmp_path / "disk"
  mountpoint.mkdir()
  proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs",
                         str(mountpoint)], capture_output=True, text=True,
                        check=False)
  if proc.returncode != 0:
    pytest.skip(f"cannot mount a tmpfs (needs root): {proc.stderr.strip()}")
  try:
    yield mountpoint
  finally:
    subprocess.run(["umount", "-l", str(mountpoint)], check=False)


@pytest.mark.parametrize("async_save", [False, True])
def test_a_full_disk_keeps_the_last_checkpoint_and_the_next_run_resumes(
    small_disk, async_save):
  workdir = small_disk / "run"
  args = ("launch.train", "--config=configs/digits.py", f"--workdir={workdir}",
          "--config.train.checkpoint_every=100",
          "--config.train.max_checkpoints=10",
          "--config.callbacks.tensorboard=False",
          f"--config.train.async_checkpoint={async_save}")
  proc = run_module(*args, timeout=120)
  assert proc.returncode == 5, proc.stderr[-2000:]
  errors = [l for l in proc.stderr.splitlines() if l.startswith("error: ")]
  assert len(errors) == 1 and "Traceback" not in proc.stderr
  if not async_save:  # an async save leaves TF's thread-join log after it
    assert proc.stderr.strip().splitlines()[-1] == errors[0]
  ckpts = workdir / "checkpoints"
  failed = int(re.search(r"ckpt-(\d+) could not", errors[0]).group(1))
  intact = failed - 100
  assert errors[0] == (
      f"error: the disk is full: checkpoint {ckpts}/ckpt-{failed} could not "
      f"be written; the last complete checkpoint, {ckpts}/ckpt-{intact}, is "
      "intact and the same command resumes from it: free some space (or "
      "lower train.max_checkpoints) and rerun")
  # Nothing of the failed checkpoint is left; the state file names the last.
  assert not [n for n in os.listdir(ckpts) if n.startswith(f"ckpt-{failed}")]
  assert (ckpts / "checkpoint").read_text().startswith(
      f'model_checkpoint_path: "ckpt-{intact}"')

  subprocess.run(["mount", "-o", "remount,size=4m", str(small_disk)],
                 check=True)
  again = run_module(*args, timeout=120)
  assert again.returncode == 0, again.stderr[-2000:]
  assert f"restored {ckpts}/ckpt-{intact} (step {intact})" in again.stderr
  assert "done: 600 steps" in again.stdout


def test_a_failed_final_async_save_is_an_error_not_done(small_disk):
  """The last save is asynchronous and nothing saves after it, so its
  failure surfaced nowhere: the run printed `done:` and exited 0."""
  (small_disk / "filler").write_bytes(b"\0" * (800 << 10))  # 224 KiB left
  workdir = small_disk / "run"
  proc = run_module("launch.train", "--config=configs/digits.py",
                    f"--workdir={workdir}", "--config.train.steps=100",
                    "--config.train.checkpoint_every=0",
                    "--config.callbacks.tensorboard=False",
                    "--config.callbacks.progress_bar=False",
                    "--config.train.async_checkpoint=True", timeout=120)
  assert proc.returncode == 5, proc.stderr[-2000:]
  assert "done:" not in proc.stdout and "Traceback" not in proc.stderr
  errors = [l for l in proc.stderr.splitlines() if l.startswith("error: ")]
  assert errors == [
      f"error: the disk is full: checkpoint {workdir}/checkpoints/ckpt-100 "
      "could not be written; there is no earlier checkpoint, the same "
      "command starts over: free some space (or lower "
      "train.max_checkpoints) and rerun"], proc.stderr[-2000:]
  assert not [n for n in os.listdir(workdir / "checkpoints")
              if n.startswith("ckpt-100")]
