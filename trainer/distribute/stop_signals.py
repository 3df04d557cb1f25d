"""SIGTERM and Ctrl-C during a run: a preemption, and a second Ctrl-C that
stops at once (trainer/run.py installs them around training)."""

import os
import signal
import sys
import threading
from typing import Callable

from absl import logging

INTERRUPTED = 130  # launch.status.ExitStatus.INTERRUPTED (128 + SIGINT)


class StopSignals:
  """SIGTERM and SIGINT (Ctrl-C) stop the run at the next host-loop
  boundary, where every worker saves (a preemption); a second Ctrl-C ends
  the process at once with status 130, without saving.

  Python runs a signal handler only between bytecodes of the main thread,
  which spends a host loop inside one TensorFlow call, and two signals that
  arrive during it run the handler once. So the signals are also counted as
  they arrive: each one writes a byte to a wakeup fd that a thread reads.
  Installed from the main thread only (signal handlers can be set nowhere
  else); `restore()` puts back what was there.
  """

  def __init__(self, request_stop: Callable[[], None]):
    self.received = None  # the name of the first stop signal
    self._request_stop, self._previous, self._wakeup = request_stop, {}, None
    self._lock = threading.RLock()  # a handler may interrupt a handler
    if threading.current_thread() is not threading.main_thread():
      return
    for signum in (signal.SIGTERM, signal.SIGINT):
      self._previous[signum] = signal.getsignal(signum)
      signal.signal(signum, self._handle)
    read, write = os.pipe()
    os.set_blocking(write, False)
    self._wakeup = (read, write, signal.set_wakeup_fd(write))
    threading.Thread(target=self._count, args=(read,), daemon=True,
                     name="stop-signals").start()

  def _handle(self, signum, frame) -> None:  # pylint: disable=unused-argument
    self._first(signum)
    self._request_stop()

  def _first(self, signum: int) -> None:
    """Says once, as the first stop signal arrives, what happens now."""
    with self._lock:
      if self.received is not None:
        return
      self.received = signal.Signals(signum).name
      logging.warning("%s: stopping at the next step boundary and saving a "
                      "checkpoint%s", self.received,
                      "; press Ctrl-C again to stop at once"
                      if signum == signal.SIGINT else "")

  def _count(self, read: int) -> None:
    """Ends the process on the second SIGINT, whatever the main thread is
    doing; the first of each is the handler's."""
    interrupts = 0
    while True:
      got = os.read(read, 64)
      if not got:  # restore() closed the write end
        os.close(read)
        return
      for signum in (signal.SIGTERM, signal.SIGINT):
        if signum in got:
          self._first(signum)
      interrupts += got.count(signal.SIGINT)
      if interrupts >= 2:
        print("interrupted: stopped at once by a second Ctrl-C, not saved; "
              "the same command resumes from the last checkpoint",
              file=sys.stderr, flush=True)
        os._exit(INTERRUPTED)  # pylint: disable=protected-access

  def restore(self) -> None:
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
    if self._wakeup:
      _, write, previous = self._wakeup
      signal.set_wakeup_fd(previous)
      os.close(write)  # the thread reads EOF, closes its end and ends
