"""How many workers an elastic job runs on: `launch.local --min_workers`.

A job of N workers (`--num_workers`) may go on with fewer, down to M
(`--min_workers`, default N: not elastic), when a worker slot cannot be
started again:
- its host left the hosts file (`--hosts=FILE`, one `host[:slots]` line
  each, read at every start: what a cluster agent or a user edits), or
- it failed `--slot_failures` starts in a row without the job getting past
  the checkpoint it restarted from (a bad node).
When the hosts file gains slots again, the job grows back (up to N) at its
next checkpoint: the launcher asks the workers to save (SIGTERM) and starts
them again on the larger set.

The global batch stays `data.global_batch_size` (each replica takes a larger
share on fewer workers), the step and the learning-rate schedule go on, and
the in-memory stream is addressed by step, so each global batch holds the
same examples as on N workers (trainer/data/stream.py). Each resize is one
line and a `metrics.jsonl` event:
  {"step": <checkpoint step>, "event": "resize", "from_workers": 3,
   "to_workers": 2, "cause": "..."}
"""

import json
import os
import re

from launch import restarts as restarts_lib

_HOST_LINE = re.compile(r"^([A-Za-z0-9_.\-]+)(?::(\d+))?$")
LOCAL_HOSTS = ("localhost", "127.0.0.1")


def read_hosts(path: str) -> int:
  """The worker slots of a hosts file: one `host[:slots]` per line (slots
  default 1; blank lines and `#` comments skipped).

  Raises:
    ValueError: it cannot be read, a line does not parse, or names a host
      other than this machine (launch.local starts every worker here).
  """
  try:
    with open(path, encoding="utf-8") as f:
      lines = f.read().splitlines()
  except OSError as e:
    raise ValueError(f"--hosts={path} cannot be read ({e.strerror})") from None
  slots = 0
  for number, line in enumerate(lines, 1):
    line = line.split("#", 1)[0].strip()
    if not line:
      continue
    found = _HOST_LINE.match(line)
    if not found or (found[2] is not None and int(found[2]) < 1):
      raise ValueError(f"--hosts={path} line {number}: {line!r} is not "
                       "host[:slots] (slots a positive number)")
    if found[1] not in LOCAL_HOSTS:
      raise ValueError(f"--hosts={path} line {number}: {found[1]} is not "
                       "this machine; launch.local starts every worker here "
                       "(use localhost lines)")
    slots += int(found[2] or 1)
  return slots


class Slots:
  """The worker slots of an elastic job and how many can run now.

  Args:
    num_workers: N, the most the job runs on.
    min_workers: M, the fewest it goes on with.
    hosts: the hosts file, or None (N slots, always).
    slot_failures: failed starts in a row that drop a slot.
  """

  def __init__(self, num_workers: int, min_workers: int, hosts: str | None,
               slot_failures: int):
    if not 1 <= min_workers <= num_workers:
      raise ValueError(f"--min_workers={min_workers} must be between 1 and "
                       f"--num_workers={num_workers}")
    self.num_workers, self.min_workers = num_workers, min_workers
    self.hosts, self.slot_failures = hosts, slot_failures
    self.dropped = 0  # slots given up after failing every start
    self.failures: dict[int, int] = {}  # slot -> failed starts in a row
    self.read()  # a bad hosts file fails before anything starts

  def read(self) -> int:
    """The slots the hosts file offers now (N without one)."""
    return read_hosts(self.hosts) if self.hosts else self.num_workers

  def available(self) -> int:
    """Workers the job can start now: at most N, minus dropped slots."""
    return min(self.num_workers, self.read() - self.dropped)

  def failed(self, slot: int, progressed: bool) -> str | None:
    """Records that worker `slot` failed; `progressed`: the job got past
    the checkpoint it had started from. Returns why the slot is dropped,
    or None."""
    if progressed:
      self.failures = {}
    self.failures[slot] = self.failures.get(slot, 0) + 1
    if self.failures[slot] < self.slot_failures:
      return None
    self.failures = {}
    self.dropped += 1
    return (f"worker {slot} failed on {self.slot_failures} start(s) in a "
            "row")


def record_resize(workdir: str | None, before: int, after: int,
                  cause: str) -> str:
  """Appends the resize event to metrics.jsonl (when there is a workdir)
  and returns its one-line report."""
  step = restarts_lib.checkpoint_step(workdir)
  event = {"step": step, "event": "resize", "from_workers": before,
           "to_workers": after, "cause": cause}
  if workdir and os.path.isdir(workdir):
    with open(os.path.join(workdir, "metrics.jsonl"), "a",
              encoding="utf-8") as f:
      f.write(json.dumps(event) + "\n")
  return f"resize: {before} -> {after} workers at step {step} ({cause})"
