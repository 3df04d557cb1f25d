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

Trust: each worker's TensorFlow gRPC server listens on all interfaces at its
TF_CONFIG port, with no authentication (TensorFlow 2.21 cannot bind it to
loopback); whoever reaches the port can run ops in the job. Use it only on a
machine and network you trust (docs/outputs.md, Trust boundary).
"""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

from absl import app, flags

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
_GRACE = flags.DEFINE_float(
    "grace_seconds", 10.0, "After a failure, how long the other workers get "
    "to exit after SIGTERM before SIGKILL.")



def free_ports(n: int) -> list[int]:
  """n distinct free TCP ports on localhost."""
  sockets = []
  for _ in range(n):
    s = socket.socket()
    s.bind(("localhost", 0))
    sockets.append(s)
  ports = [s.getsockname()[1] for s in sockets]
  for s in sockets:
    s.close()
  return ports


def tf_config(ports: list[int], index: int) -> str:
  return json.dumps({
      "cluster": {"worker": [f"localhost:{p}" for p in ports]},
      "task": {"type": "worker", "index": index}})


# What a worker that is being stopped after another's failure still shows:
# its own verdict lines. TensorFlow's lines about the lost peer (collective
# aborts from C++, a dozen lines each) say what the failed worker's line
# already said.
VERDICTS = ("error:", "warning:", "preempted", "interrupted", "done")


def _pump(stream, prefix: str, out, quiet=lambda: False) -> None:
  """Copies `stream` to `out` line by line, each after `prefix`; while
  `quiet()`, only VERDICTS lines."""
  for line in iter(stream.readline, ""):
    if quiet() and not line.startswith(VERDICTS):
      continue
    out.write(f"{prefix}{line}")
    out.flush()


class DataService:
  """A tf.data service on localhost: a dispatcher and N worker processes
  (launch.data_service), each a real TensorFlow server."""

  def __init__(self, num_workers: int, timeout: float = 120.0):
    self.procs = []
    self.pumps = []
    (port,) = free_ports(1)
    self.address = f"localhost:{port}"
    self._start("dispatcher", ["--role=dispatcher", f"--port={port}"],
                timeout)
    for i in range(num_workers):
      self._start(f"data worker {i}",
                  ["--role=worker", f"--dispatcher={self.address}"], timeout)

  def _start(self, name: str, flags_: list[str], timeout: float) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-u", "-m", "launch.data_service", *flags_],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True)
    self.procs.append(proc)
    ready = threading.Event()

    def pump_stdout():
      for line in iter(proc.stdout.readline, ""):
        if line.startswith("serving "):
          ready.set()
        sys.stdout.write(f"[{name}] {line}")
        sys.stdout.flush()
      ready.set()  # it ended: no longer waited for

    for target in (pump_stdout, lambda: _pump(proc.stderr, f"[{name}] ",
                                              sys.stderr)):
      pump = threading.Thread(target=target, daemon=True)
      pump.start()
      self.pumps.append(pump)
    if not ready.wait(timeout) or proc.poll() is not None:
      self.stop()
      raise RuntimeError(f"the tf.data service {name} did not start")

  def stop(self) -> None:
    for proc in self.procs:
      if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
    for proc in self.procs:
      try:
        proc.wait(timeout=10)
      except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    for pump in self.pumps:
      pump.join(timeout=5)


class Workers:
  """The worker processes of one job, their output pumps and their fate."""

  def __init__(self, argv: list[str], num_workers: int, module: str):
    ports = free_ports(num_workers)
    self.procs = []
    self.pumps = []
    self.failed = None  # the first worker that failed: the others go quiet
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
        pump = threading.Thread(target=_pump, args=(stream, f"[worker {i}] ",
                                                    out, quiet), daemon=True)
        pump.start()
        self.pumps.append(pump)

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

  def wait(self, grace: float) -> tuple[int, int | None]:
    """Waits for all; on the first failure stops the rest. Returns the exit
    code of the first worker that failed (0 or ExitStatus.PREEMPTED if none did)
    and its index (None if none did)."""
    failed = None
    while failed is None and any(p.poll() is None for p in self.procs):
      for i, proc in enumerate(self.procs):
        if proc.poll() not in (None, 0, ExitStatus.PREEMPTED,
                               ExitStatus.INTERRUPTED):
          failed = i
          break
      time.sleep(0.1)
    if failed is None:  # all have exited; one may have failed last
      failed = next((i for i, p in enumerate(self.procs)
                     if p.returncode not in (0, ExitStatus.PREEMPTED,
                                             ExitStatus.INTERRUPTED)), None)
    if failed is not None:
      self.failed = failed
      code = self.procs[failed].returncode
      print(f"error: worker {failed} {describe_exit(code)}; stopping the "
            "other workers", file=sys.stderr, flush=True)
      self.stop(grace)
    for pump in self.pumps:
      pump.join(timeout=5)
    if failed is not None:
      return self.procs[failed].returncode, failed
    for status in (ExitStatus.INTERRUPTED, ExitStatus.PREEMPTED):
      if any(p.returncode == status for p in self.procs):
        return status, None
    return 0, None


class Job:
  """The workers, started again after a restartable failure (launch/
  restarts.py) at most `max_restarts` times; SIGINT/SIGTERM stop it."""

  def __init__(self, argv: list[str], num_workers: int, module: str,
               max_restarts: int):
    self.argv, self.num_workers, self.module = argv, num_workers, module
    self.max_restarts = max_restarts
    self.workers = None
    self.stopping = False  # a signal arrived: never start workers again
    self.lock = threading.Lock()

  def signal(self, signum: int) -> None:
    with self.lock:
      self.stopping = True
      if self.workers:
        self.workers.signal_all(signum)

  def run(self, grace: float) -> int:
    """Runs until success, preemption, a failure that is not restartable
    or the last allowed restart's failure; returns the exit status."""
    restarts, reports = 0, []
    workdir = restarts_lib.workdir_of(self.argv)
    while True:
      with self.lock:
        if self.stopping:
          return ExitStatus.PREEMPTED
        self.workers = Workers(self.argv, self.num_workers, self.module)
      code, failed = self.workers.wait(grace)
      if failed is None:
        if code == ExitStatus.PREEMPTED:
          print("preempted: the workers saved a checkpoint and stopped; run "
                "the same command to resume", file=sys.stderr, flush=True)
        elif code == ExitStatus.INTERRUPTED:
          print("interrupted: the workers stopped at once, not saved; run "
                "the same command to resume from the last checkpoint",
                file=sys.stderr, flush=True)
        return code
      cause = f"worker {failed} {describe_exit(code)}"
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
      restarts += 1
      reports.append(restarts_lib.record_restart(workdir, restarts, cause))
      print(reports[-1], file=sys.stderr, flush=True)


def main(argv: list[str]) -> None:
  worker_argv = argv[1:]
  if not worker_argv:
    print("error: no worker flags; usage: python -m launch.local "
          "--num_workers=N -- --config=configs/digits.py --workdir=DIR",
          file=sys.stderr)
    sys.exit(ExitStatus.BAD_INPUT)
  service = None
  if _DATA_SERVICE_WORKERS.value:
    try:
      service = DataService(_DATA_SERVICE_WORKERS.value)
    except RuntimeError as e:
      print(f"error: {e}", file=sys.stderr)
      sys.exit(ExitStatus.FAILED)
    worker_argv = [*worker_argv, f"--config.data.service={service.address}"]
  try:
    job = Job(worker_argv, _NUM_WORKERS.value, _MODULE.value,
              _MAX_RESTARTS.value)
    for signum in (signal.SIGINT, signal.SIGTERM):
      signal.signal(signum, lambda s, _: job.signal(s))
    code = job.run(_GRACE.value)
  finally:
    if service:
      service.stop()
  sys.exit(code)


if __name__ == "__main__":
  app.run(main)
