"""The processes `launch.local` starts besides the training workers' own
logic: free ports, TF_CONFIG, output pumps, and a tf.data service on
localhost. Imports nothing heavy: the launcher stays free of TensorFlow."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading


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


def pump(stream, prefix: str, out, quiet=lambda: False) -> None:
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

    for target in (pump_stdout, lambda: pump(proc.stderr, f"[{name}] ",
                                              sys.stderr)):
      thread = threading.Thread(target=target, daemon=True)
      thread.start()
      self.pumps.append(thread)
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
    for thread in self.pumps:
      thread.join(timeout=5)
