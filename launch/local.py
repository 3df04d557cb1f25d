r"""Runs a multi-worker job on this machine: N processes, TF_CONFIG on free ports.

  python -m launch.local --num_workers=2 -- --config=configs/digits.py \
      --workdir=runs/digits_2w [--config.KEY=VALUE ...]

Everything after `--` goes to `python -m launch.train` (or `--module`), with
`--config.distribution.strategy=multi_worker` appended. With
`--data_service_workers=N` a tf.data service (a dispatcher and N workers,
`launch.data_service`) starts first on localhost and the workers train
through it (`--config.data.service=localhost:PORT` appended); it stops
when they end. Each worker's output lines are prefixed `[worker i]`.
SIGINT and SIGTERM are forwarded to every worker. If a worker fails, the
others are stopped, showing only their `error:`-style lines from then on
(TensorFlow's own about the lost peer are a dozen lines each; `-v` shows
them), and the launcher exits with status 1, naming the worker
(2 when the worker's input was bad: never restarted);
with `--max_restarts=N` a worker that was killed, crashed (1) or was ended
by its watchdog (4) instead restarts the whole job (fresh ports, resuming
from the latest checkpoint, one `restart k: ...` line and a metrics.jsonl
event each; launch/restarts.py), and after N restarts the launcher exits
with the last failure's status (128 + signal for a kill). It exits 0 when
every worker succeeds, and 75 when the workers were preempted (SIGTERM or
Ctrl-C: they agreed on a step, saved a checkpoint and exited 75; rerun the
same command to resume); a second Ctrl-C stops them at once (130).
Elastic (`--min_workers=M`, `--hosts=FILE`; launch/elastic.py): a worker
slot that cannot start again is dropped and the job goes on with fewer
workers, down to M, and grows back when --hosts offers more.

Trust: each worker's TensorFlow gRPC server listens on all interfaces at its
TF_CONFIG port, with no authentication (TensorFlow 2.21 cannot bind it to
loopback); whoever reaches the port can run ops in the job. Use it only on a
machine and network you trust (docs/outputs.md, Trust boundary).
"""

import os
import signal
import subprocess
import sys
import threading
import time

from absl import app, flags

from launch import elastic
from launch.processes import DataService, free_ports, pump, tf_config
from launch import quiet as quiet_lib
from launch import restarts as restarts_lib
from launch.restarts import describe_exit
from launch.status import ExitStatus

_NUM_WORKERS = flags.DEFINE_integer("num_workers", 2, "Worker processes.",
                                    lower_bound=1)
_MODULE = flags.DEFINE_string("module", "launch.train",
                              "Python module each worker runs with -m.")
_DATA_SERVICE_WORKERS = flags.DEFINE_integer(
    "data_service_workers", 0, "Also start a tf.data service dispatcher and "
    "this many tf.data service workers on localhost (launch.data_service) "
    "and train through them (--config.data.service); 0: no service.",
    lower_bound=0)
_MAX_RESTARTS = flags.DEFINE_integer(
    "max_restarts", 0, "Restart the whole job (fresh ports, resuming from "
    "the latest checkpoint) at most this many times when a worker is "
    "killed, crashes (status 1) or is ended by its watchdog (4); bad input "
    "(2), divergence (3), a full disk (5) and preemption (75) never restart.",
    lower_bound=0)
_MIN_WORKERS = flags.DEFINE_integer(
    "min_workers", 0, "Elastic: go on with fewer workers, down to this many, "
    "when a worker slot cannot start again (its host left --hosts, or it "
    "failed --slot_failures starts in a row); grow back up to --num_workers "
    "when --hosts offers more. 0: --num_workers (not elastic).",
    lower_bound=0)
_HOSTS = flags.DEFINE_string(
    "hosts", "", "Elastic: a file of `host[:slots]` lines (localhost here), "
    "read at every start and watched while the job runs: the slots it may "
    "use. '': --num_workers slots.")
_SLOT_FAILURES = flags.DEFINE_integer(
    "slot_failures", 3, "Elastic: failed starts in a row (no progress past "
    "the checkpoint) after which a worker slot is dropped.", lower_bound=1)
_GRACE = flags.DEFINE_float(
    "grace_seconds", 10.0, "After a failure, how long the other workers get "
    "to exit after SIGTERM before SIGKILL.")



class Workers:
  """The worker processes of one job, their output pumps and their fate."""

  def __init__(self, argv: list[str], num_workers: int, module: str):
    ports = free_ports(num_workers)
    self.procs = []
    self.pumps = []
    self.failed = None  # the first worker that failed: the others go quiet
    self.asked = False  # asked to save and stop for a resize
    self.asked_at = self.failed_at = None  # time.monotonic() of either
    verbose = quiet_lib.verbose(argv)
    for i in range(num_workers):
      env = dict(os.environ, TF_CONFIG=tf_config(ports, i))
      proc = subprocess.Popen(
          [sys.executable, "-u", "-m", module, *argv,
           "--config.distribution.strategy=multi_worker"],
          env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
          start_new_session=True)  # signals reach workers only through us
      self.procs.append(proc)
      for stream, out in ((proc.stdout, sys.stdout), (proc.stderr, sys.stderr)):
        quiet = lambda i=i: (not verbose and self.failed is not None and
                             self.failed != i)
        thread = threading.Thread(target=pump, args=(
            stream, f"[worker {i}] ", out, quiet), daemon=True)
        thread.start()
        self.pumps.append(thread)

  def signal_all(self, signum: int) -> None:
    for proc in self.procs:
      if proc.poll() is None:
        os.killpg(proc.pid, signum)

  def stop(self, grace: float) -> None:
    """SIGTERM to the live workers; SIGKILL whoever is left after `grace`."""
    self.signal_all(signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(
        p.poll() is None for p in self.procs):
      time.sleep(0.1)
    self.signal_all(signal.SIGKILL)
    for proc in self.procs:
      proc.wait()

  def wait(self, grace: float, resize=lambda: False) -> tuple[int, int | None]:
    """Waits for all; on the first failure stops the rest. Returns the exit
    code of the first worker that failed (0 or ExitStatus.PREEMPTED if none did)
    and its index (None if none did). When `resize()` (polled every second)
    turns true, asks every worker to save and stop (SIGTERM) once; a worker
    it ends then is not a failure."""
    failed, polled = None, time.monotonic()
    while failed is None and any(p.poll() is None for p in self.procs):
      for i, proc in enumerate(self.procs):
        if proc.poll() not in (None, *self._fine):
          failed = i
          break
      if not self.asked and time.monotonic() - polled > 1.0:
        polled = time.monotonic()
        if resize():
          self.asked, self.asked_at = True, time.monotonic()
          self.signal_all(signal.SIGTERM)
      time.sleep(0.1)
    if failed is None:  # all have exited; one may have failed last
      failed = next((i for i, p in enumerate(self.procs)
                     if p.returncode not in self._fine), None)
    if failed is not None:
      self.failed, self.failed_at = failed, time.monotonic()
      code = self.procs[failed].returncode
      print(f"error: worker {failed} {describe_exit(code)}; stopping the "
            "other workers", file=sys.stderr, flush=True)
      self.stop(grace)
    for thread in self.pumps:
      thread.join(timeout=5)
    if failed is not None:
      return self.procs[failed].returncode, failed
    for status in (ExitStatus.INTERRUPTED, ExitStatus.PREEMPTED):
      if any(p.returncode == status for p in self.procs):
        return status, None
    if self.asked and any(p.returncode == -signal.SIGTERM
                          for p in self.procs):
      return ExitStatus.PREEMPTED, None  # ended by our SIGTERM unsaved
    return 0, None

  @property
  def _fine(self) -> tuple:
    """Exit statuses that are not a failure: success, preemption, a second
    Ctrl-C; and SIGTERM itself once the launcher asked for a resize."""
    return (0, ExitStatus.PREEMPTED, ExitStatus.INTERRUPTED,
            *((-signal.SIGTERM,) if self.asked else ()))


class Job:
  """The workers, started again after a restartable failure (launch/
  restarts.py) at most `max_restarts` times, on as many as `slots` allows
  (launch/elastic.py); SIGINT/SIGTERM stop it."""

  def __init__(self, argv: list[str], slots: elastic.Slots, module: str,
               max_restarts: int):
    self.argv, self.slots, self.module = argv, slots, module
    self.max_restarts = max_restarts
    self.workers = None
    self.stopping = False  # a signal arrived: never start workers again
    self.lock = threading.Lock()
    self._last_seen = None  # the slots the last resize poll saw

  def signal(self, signum: int) -> None:
    with self.lock:
      self.stopping = True
      if self.workers:
        self.workers.signal_all(signum)

  def _available(self, count: int | None) -> int:
    """Workers that can start now; a hosts file that no longer reads keeps
    the current count (one warning)."""
    try:
      return self.slots.available()
    except ValueError as e:
      if count is None:
        raise
      print(f"warning: {e}; keeping {count} workers", file=sys.stderr,
            flush=True)
      return count

  def _resize_due(self, count: int, workdir: str | None,
                  started_at: int) -> bool:
    """The hosts file offers another count than `count`, the same at two
    polls in a row (not a file caught mid-write), and the workers have
    written a checkpoint since they started (not in their start-up)."""
    seen = self._available(count)
    due = seen != count and seen == self._last_seen and (
        restarts_lib.checkpoint_step(workdir) > started_at)
    self._last_seen = seen
    return due

  def run(self, grace: float) -> int:
    """Runs until success, preemption, a failure that is not restartable
    or the last allowed restart's failure; returns the exit status."""
    restarts, reports = 0, []
    workdir = restarts_lib.workdir_of(self.argv)
    count, why, last = None, "", None  # workers, why they change, a failure
    clock = None  # the time to recover from the last failure or resize
    while True:
      with self.lock:
        if self.stopping:
          return ExitStatus.PREEMPTED
        available = self._available(count)
        if available < self.slots.min_workers:
          print(f"error: {available} worker(s) can start, fewer than "
                f"--min_workers={self.slots.min_workers}"
                + (f"; the last failure: {last[0]}" if last else ""),
                file=sys.stderr, flush=True)
          return restarts_lib.shell_status(last[1]) if last else (
              ExitStatus.FAILED)
        if count is not None and available != count:
          print(elastic.record_resize(workdir, count, available, why),
                file=sys.stderr, flush=True)
        elif count is None and available < self.slots.num_workers:
          print(f"elastic: starting on {available} of "
                f"{self.slots.num_workers} workers (--hosts offers "
                f"{self.slots.read()} slots)", file=sys.stderr, flush=True)
        count, started_at = available, restarts_lib.checkpoint_step(workdir)
        if clock is not None:
          clock = restarts_lib.RecoveryClock(workdir, clock[0], clock[1],
                                             started_at)
        self.workers = Workers(self.argv, count, self.module)
      code, failed = self.workers.wait(
          grace, lambda: self._resize_due(count, workdir, started_at))
      if isinstance(clock, restarts_lib.RecoveryClock):
        clock.stop()
      clock = None
      if failed is None:
        if (code == ExitStatus.PREEMPTED and self.workers.asked and
            not self.stopping):
          why = f"--hosts offers {self.slots.read()} slot(s)" + (
              f", {self.slots.dropped} dropped" if self.slots.dropped else "")
          clock = ("resize", self.workers.asked_at)
          continue  # saved for the resize: start again on the new count
        if code == ExitStatus.PREEMPTED:
          print("preempted: the workers saved a checkpoint and stopped; run "
                "the same command to resume", file=sys.stderr, flush=True)
        elif code == ExitStatus.INTERRUPTED:
          print("interrupted: the workers stopped at once, not saved; run "
                "the same command to resume from the last checkpoint",
                file=sys.stderr, flush=True)
        return code
      cause = f"worker {failed} {describe_exit(code)}"
      last = (cause, code)
      if self.stopping and code in (-signal.SIGTERM, -signal.SIGINT):
        print("stopped by a signal before the workers could save; run the "
              "same command to resume", file=sys.stderr, flush=True)
        return ExitStatus.PREEMPTED
      if (self.stopping or not restarts_lib.restartable(code) or
          restarts >= self.max_restarts):
        if restarts:
          print(f"error: {cause} after {restarts} restart(s) of "
                f"{self.max_restarts}:", *reports, sep="\n  ",
                file=sys.stderr, flush=True)
          return restarts_lib.shell_status(code)
        # Bad input (a bad record met mid-run) keeps its status: a job
        # scheduler must not retry it either.
        return (ExitStatus.BAD_INPUT if code == ExitStatus.BAD_INPUT
                else ExitStatus.FAILED)
      progressed = restarts_lib.checkpoint_step(workdir) > started_at
      why = (self.slots.failed(failed, progressed)
             if self.slots.min_workers < self.slots.num_workers else None
            ) or cause
      restarts += 1
      reports.append(restarts_lib.record_restart(workdir, restarts, cause))
      print(reports[-1], file=sys.stderr, flush=True)
      clock = (f"restart {restarts}", self.workers.failed_at)


def _slots() -> elastic.Slots:
  """The job's worker slots from the flags; bad ones: one error line,
  exit 2, before anything starts."""
  minimum = _MIN_WORKERS.value or _NUM_WORKERS.value
  try:
    if minimum < _NUM_WORKERS.value and not _MAX_RESTARTS.value:
      raise ValueError(f"--min_workers={minimum} below --num_workers="
                       f"{_NUM_WORKERS.value} goes on after a failure by "
                       "restarting: set --max_restarts >= 1")
    slots = elastic.Slots(_NUM_WORKERS.value, minimum, _HOSTS.value or None,
                          _SLOT_FAILURES.value)
    if slots.available() < minimum:
      raise ValueError(f"--hosts={_HOSTS.value} offers {slots.read()} "
                       f"slot(s), fewer than --min_workers={minimum}")
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(ExitStatus.BAD_INPUT)
  return slots


def main(argv: list[str]) -> None:
  worker_argv = argv[1:]
  if not worker_argv:
    print("error: no worker flags; usage: python -m launch.local "
          "--num_workers=N -- --config=configs/digits.py --workdir=DIR",
          file=sys.stderr)
    sys.exit(ExitStatus.BAD_INPUT)
  slots = _slots()
  service = None
  if _DATA_SERVICE_WORKERS.value:
    try:
      service = DataService(_DATA_SERVICE_WORKERS.value)
    except RuntimeError as e:
      print(f"error: {e}", file=sys.stderr)
      sys.exit(ExitStatus.FAILED)
    worker_argv = [*worker_argv, f"--config.data.service={service.address}"]
  try:
    job = Job(worker_argv, slots, _MODULE.value, _MAX_RESTARTS.value)
    for signum in (signal.SIGINT, signal.SIGTERM):
      signal.signal(signum, lambda s, _: job.signal(s))
    code = job.run(_GRACE.value)
  finally:
    if service:
      service.stop()
  sys.exit(code)


if __name__ == "__main__":
  app.run(main)
