"""Which worker failures restart a job, and what a restart records.

Shared by `launch.local --max_restarts` and `launch/slurm/train.sbatch`
(`python -m launch.restarts`, `TRAINER_MAX_RESTARTS`): a worker that was killed by a signal, crashed
(status 1) or was ended by its watchdog (status 4) is restarted; bad input
(2), divergence (3, see `train.nan_recovery`), a full disk (5: it needs room
first, the user's call), preemption (75) and success (0) are not.

A restart resumes from the latest checkpoint in the workdir (step 0 if
none) and appends one event to `metrics.jsonl`:
  {"step": <resumed step>, "event": "restart", "restart": <k>,
   "cause": "worker 1 was killed by SIGKILL", "failed_after_step": <last
   step logged>, "steps_redone": <failed_after_step - resumed step>}
The restarted chief keeps it (it drops only lines past the restored step).
`RecoveryClock` then measures the seconds from the failure (or a resize,
launch/elastic.py) to the first train step after it, prints them and appends
  {"step": <first new step>, "event": "recovered", "after": "restart 1",
   "seconds": <from the failure>}
"""

import json
import os
import re
import signal
import sys
import threading
import time

from launch.status import ExitStatus



def restartable(code: int) -> bool:
  """Whether a worker's exit status (negative: killed by that signal) is
  one a restart can fix."""
  if code < 0:
    return True
  try:
    return ExitStatus(code).restartable
  except ValueError:
    return False  # not one of ours (e.g. a shell's 127): not a crash we know


def shell_status(code: int) -> int:
  """A process exit status as a shell reports it (killed by signal s:
  128 + s)."""
  return 128 - code if code < 0 else code


def describe_exit(code: int) -> str:
  if code < 0:
    return f"was killed by {signal.Signals(-code).name}"
  return f"exited with status {code}"


def workdir_of(argv: list[str]) -> str | None:
  """The `--workdir` among launch.train flags, if any."""
  for i, arg in enumerate(argv):
    if arg.startswith("--workdir="):
      return arg.split("=", 1)[1]
    if arg == "--workdir" and i + 1 < len(argv):
      return argv[i + 1]
  return None


def checkpoint_step(workdir: str | None) -> int:
  """The global step of the latest checkpoint in `workdir` (0 if none):
  checkpoints are named ckpt-<step> (trainer/checkpoint/checkpointer.py)."""
  if not workdir:
    return 0
  try:
    with open(os.path.join(workdir, "checkpoints", "checkpoint"),
              encoding="utf-8") as f:
      found = re.search(r'^model_checkpoint_path: "(?:.*/)?ckpt-(\d+)"',
                        f.read(), re.M)
  except OSError:
    return 0
  return int(found[1]) if found else 0


def last_logged_step(workdir: str | None) -> int | None:
  """The step of the last line of `workdir/metrics.jsonl`, if any."""
  try:
    with open(os.path.join(workdir or "", "metrics.jsonl"),
              encoding="utf-8") as f:
      lines = [l for l in f if l.strip()]
    return int(json.loads(lines[-1])["step"]) if lines else None
  except (OSError, ValueError, KeyError):
    return None


def record_restart(workdir: str | None, restart: int, cause: str,
                   job: str | None = None) -> str:
  """Appends the restart event to metrics.jsonl (when there is a workdir)
  and returns its one-line report."""
  step = checkpoint_step(workdir)
  failed_after = last_logged_step(workdir)
  redone = max(failed_after - step, 0) if failed_after is not None else 0
  event = {"step": step, "event": "restart", "restart": restart,
           "cause": cause, "failed_after_step": failed_after,
           "steps_redone": redone, **({"job": job} if job else {})}
  if workdir and os.path.isdir(workdir):
    with open(os.path.join(workdir, "metrics.jsonl"), "a",
              encoding="utf-8") as f:
      f.write(json.dumps(event) + "\n")
  return (f"restart {restart}: {cause}; resuming from step {step}"
          + (f" (failed after step {failed_after}: {redone} steps redone)"
             if failed_after is not None else ""))


class RecoveryClock:
  """Watches `workdir/metrics.jsonl` (from a thread, every 0.2 s) for the
  first train line past `resumed_step`; then prints how long it took from
  `since` (a `time.monotonic()`: when the failure was seen, or the resize
  asked for) and appends a "recovered" event. `stop()` ends the watch."""

  def __init__(self, workdir: str | None, label: str, since: float,
               resumed_step: int):
    self.workdir, self.label = workdir, label
    self.since, self.resumed_step = since, resumed_step
    self._done = threading.Event()
    # Lines written before the restart (past the resumed step, which the
    # resumed chief drops) are not the new steps: read from the end.
    try:
      self._offset = os.path.getsize(os.path.join(workdir or "",
                                                  "metrics.jsonl"))
    except OSError:
      self._offset = 0
    self._thread = threading.Thread(target=self._watch, daemon=True)
    if workdir:
      self._thread.start()

  def stop(self) -> None:
    self._done.set()
    if self._thread.is_alive():
      self._thread.join(timeout=5)

  def _first_new_step(self, offset: int) -> tuple[int | None, int]:
    """(the first train step past the resumed one, or None; the offset to
    read from next time)."""
    path = os.path.join(self.workdir, "metrics.jsonl")
    try:
      if os.path.getsize(path) < offset:
        offset = 0  # rewritten shorter by the resumed chief
      with open(path, encoding="utf-8") as f:
        f.seek(offset)
        text = f.read()
    except OSError:
      return None, offset
    complete = text[:text.rfind("\n") + 1]
    for line in complete.splitlines():
      try:
        record = json.loads(line)
      except ValueError:
        continue
      if "train/loss" in record and record["step"] > self.resumed_step:
        return record["step"], offset
    return None, offset + len(complete.encode("utf-8"))

  def _watch(self) -> None:
    offset = self._offset
    while not self._done.wait(0.2):
      step, offset = self._first_new_step(offset)
      if step is None:
        continue
      seconds = time.monotonic() - self.since
      with open(os.path.join(self.workdir, "metrics.jsonl"), "a",
                encoding="utf-8") as f:
        f.write(json.dumps({"step": step, "event": "recovered",
                            "after": self.label,
                            "seconds": round(seconds, 2)}) + "\n")
      print(f"recovered from {self.label}: training again at step {step}, "
            f"{seconds:.1f} s after the job stopped", file=sys.stderr,
            flush=True)
      return


def restarts_recorded(workdir: str | None, job: str) -> int:
  """The restart events of job `job` in `workdir/metrics.jsonl`."""
  try:
    with open(os.path.join(workdir or "", "metrics.jsonl"),
              encoding="utf-8") as f:
      events = [json.loads(l) for l in f if '"event": "restart"' in l]
  except (OSError, ValueError):
    return 0
  return sum(1 for e in events if e.get("job") == job)


def main(argv: list[str]) -> int:
  """For job scripts (launch/slurm/train.sbatch): decides whether a
  finished run restarts, and records the restart.

    python -m launch.restarts STATUS JOB MAX -- <launch.train flags>

  STATUS: the run's exit status as the shell saw it (128 + s: killed by
  signal s); JOB: the job's id (restarts are counted per job); MAX: the
  restarts allowed. Exits 0 and prints the restart line when the run
  should restart; 1 when it should not (and prints why, when it was a
  failure); 2 on bad arguments.
  """
  try:
    split = argv.index("--")
    status, job, allowed = int(argv[1]), argv[2], int(argv[3])
  except (ValueError, IndexError):
    print("usage: python -m launch.restarts STATUS JOB MAX -- <launch.train "
          "flags>", file=sys.stderr)
    return 2
  workdir = workdir_of(argv[split + 1:])
  code = -(status - 128) if status > 128 else status
  if not restartable(code):
    return 1
  done = restarts_recorded(workdir, job)
  cause = f"a worker {describe_exit(code)}"
  if done >= allowed:
    print(f"{cause}; not restarting: {done} restart(s) of {allowed} "
          "(TRAINER_MAX_RESTARTS) done", file=sys.stderr)
    return 1
  print(record_restart(workdir, done + 1, cause, job=job))
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
