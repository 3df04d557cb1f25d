"""A per-process watchdog on host-loop progress for multi-worker jobs.

A worker that is alive but stuck (blocked in Python, an input pipeline that
never yields) leaves the other workers waiting in their next all-reduce
forever: TensorFlow's coordination service only notices a process that died
or stopped heartbeating. A timeout on each collective would catch it, but
TensorFlow keeps one OS thread alive per collective for the whole timeout
(DESIGN.md fact 15: ~900 threads/s per worker, dead in 20 s). This costs one
thread per process instead: the train loop calls `beat()` at every host-loop
boundary; if no beat arrives for `timeout` seconds, the watchdog prints one
`error:` line and every thread's Python stack to stderr and ends the process
with EXIT_STALLED. The other workers then fail fast (a dead peer), or time
out the same way.
"""

import faulthandler
import os
import sys
import threading
import time

EXIT_STALLED = 4  # launch.train's status when the watchdog ends a worker


class Watchdog:
  """Ends this process when `beat()` is not called for `timeout` seconds.

  Args:
    timeout: seconds without progress; must exceed the longest host loop,
      evaluation or checkpoint save of the run.
    name: who this process is, for the error line (e.g. "worker 1").
  """

  def __init__(self, timeout: float, *, name: str = "this worker"):
    if timeout <= 0:
      raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
    self.timeout, self.name = float(timeout), name
    self._last = time.monotonic()
    self._what = "starting"
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._watch, daemon=True,
                                    name="trainer-watchdog")
    self._thread.start()

  def beat(self, what: str = "") -> None:
    """Records progress; `what` names the phase that follows (for the error
    message), e.g. "train steps 100-150"."""
    self._last = time.monotonic()
    if what:
      self._what = what

  def close(self) -> None:
    """Stops watching (the run is over); joins the thread."""
    self._stop.set()
    self._thread.join()

  def __enter__(self) -> "Watchdog":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def _watch(self) -> None:
    while not self._stop.wait(min(1.0, self.timeout / 4)):
      idle = time.monotonic() - self._last
      if idle >= self.timeout:
        self._fire(idle)

  def _fire(self, idle: float) -> None:
    sys.stderr.write(
        f"error: {self.name} made no progress for {idle:.0f} s (in "
        f"{self._what}): it or another worker is stuck, so it is ending the "
        "job (distribution.collective_timeout; raise it if a host loop, an "
        "evaluation or a checkpoint save can take longer). Python stacks "
        "follow.\n")
    sys.stderr.flush()
    faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
    sys.stderr.flush()
    os._exit(EXIT_STALLED)  # pylint: disable=protected-access
