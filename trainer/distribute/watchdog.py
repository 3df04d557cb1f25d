"""A per-process watchdog on host-loop progress for multi-worker jobs.

A worker that is alive but stuck (blocked in Python, an input pipeline that
never yields) leaves the other workers waiting in their next all-reduce
forever: TensorFlow's coordination service only notices a process that died
or stopped heartbeating. A timeout on each collective would catch it, but
TensorFlow keeps one OS thread alive per collective for the whole timeout
(DESIGN.md fact 15: ~900 threads/s per worker, dead in 20 s). This costs one
thread per process instead: the train loop calls `beat()` at every host-loop
boundary; if no beat arrives in time, the watchdog prints one `error:` line
and every thread's Python stack to stderr and ends the process with
EXIT_STALLED. The other workers then fail fast (a dead peer), or time out the
same way.

In time means: until the first host loop has finished (tracing, XLA
compiles, filling buffers, a resumed dataset skipping what it had read),
STARTUP_FACTOR x `timeout`; after that, `timeout` or 3 x the longest gap
between beats seen so far, whichever is longer, so slow but steady work
(long steps, a long evaluation) never trips it.
"""

import faulthandler
import os
import sys
import threading
import time

from absl import logging

# launch.status.ExitStatus.STALLED (the library does not import the
# launchers; tests/test_layout.py pins the two equal).
EXIT_STALLED = 4
STARTUP_FACTOR = 10  # the first host loop may take this many timeouts
SLACK = 3  # later gaps may take this many times the longest one seen


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
    self._armed = False
    self._longest = 0.0  # the longest gap between beats since armed
    self._warned = False
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._watch, daemon=True,
                                    name="trainer-watchdog")
    self._thread.start()

  @property
  def limit(self) -> float:
    """Seconds without a beat after which the process is ended."""
    if not self._armed:
      return STARTUP_FACTOR * self.timeout
    return max(self.timeout, SLACK * self._longest)

  def beat(self, what: str = "") -> None:
    """Records progress; `what` names the phase that follows (for the error
    message), e.g. "train steps 100-150"."""
    now = time.monotonic()
    if self._armed:
      self._longest = max(self._longest, now - self._last)
    self._last, self._warned = now, False
    if what:
      self._what = what

  def arm(self) -> None:
    """The first host loop is done: from now on the normal limit applies."""
    if not self._armed:
      self.beat()
      self._armed = True

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
      idle, limit = time.monotonic() - self._last, self.limit
      if idle >= limit:
        self._fire(idle)
      elif idle >= limit / 2 and not self._warned:
        self._warned = True
        logging.warning("%s: no progress for %.0f s (in %s); the watchdog "
                        "ends it at %.0f s", self.name, idle, self._what,
                        limit)

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
