"""The exit statuses of every entry point, in one place.

`launch.train` exits with them, `launch.local` and `launch/slurm/train.sbatch`
pass them on and decide restarts by them (launch/restarts.py), and the
stuck-worker watchdog ends a worker with STALLED
(trainer.distribute.watchdog.EXIT_STALLED, pinned equal by
tests/test_layout.py: the library does not import the launchers). Imports
nothing heavy: the launcher processes stay free of TensorFlow.
"""

import enum


class ExitStatus(enum.IntEnum):
  """What a process's exit status means, and whether a restart may fix it."""
  DONE = 0
  FAILED = 1  # a crash (a bug, with its traceback), a --testing FAIL, an export format that failed
  BAD_INPUT = 2  # one `error: ...` line naming the problem and the fix
  DIVERGED = 3  # NaN/inf loss, or the loss scale below its floor
  STALLED = 4  # the watchdog ended a worker without host-loop progress
  DISK_FULL = 5  # a checkpoint could not be written; the last one is intact
  PREEMPTED = 75  # SIGTERM/SIGINT: checkpoint saved; rerun to resume
  INTERRUPTED = 130  # a second Ctrl-C: stopped at once, not saved (128 + SIGINT)

  @property
  def restartable(self) -> bool:
    """A restart from the latest checkpoint may fix it (a crash, a stall);
    never bad input, divergence, a full disk, preemption or success."""
    return self in (ExitStatus.FAILED, ExitStatus.STALLED)
