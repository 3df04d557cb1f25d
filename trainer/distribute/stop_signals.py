"""SIGTERM and Ctrl-C during a run: a preemption, and a second Ctrl-C that
stops at once (trainer/run/train.py installs them around training).

At once means: in a process the launcher owns, exit with status 130 at
once, whatever TensorFlow is doing (`exit_on_second_interrupt()`); in a
notebook or any other caller of `trainer.run.run`, a KeyboardInterrupt
when the current host loop returns, so the kernel and its state live on.
"""

import os
import signal
import sys
import threading
from typing import Callable

from absl import logging

INTERRUPTED = 130  # launch.status.ExitStatus.INTERRUPTED (128 + SIGINT)
SECOND_INTERRUPT = ("stopped at once by a second Ctrl-C, not saved; the same "
                    "command resumes from the last checkpoint")
_EXIT_AT_ONCE = [False]


def exit_on_second_interrupt() -> None:
  """A second Ctrl-C ends the process (status 130) instead of raising
  KeyboardInterrupt: for launchers, which own the process."""
  _EXIT_AT_ONCE[0] = True


class StopSignals:
  """SIGTERM and SIGINT (Ctrl-C) stop the run at the next host-loop
  boundary, where every worker saves (a preemption); a second Ctrl-C stops
  without saving (see the module docstring for how).

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
    self._interrupts = 0  # SIGINTs counted as they arrive (the thread)
    self._handled = 0  # SIGINTs whose handler ran
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
    if signum == signal.SIGINT:
      self._handled += 1
      if max(self._handled, self._interrupts) >= 2 and not _EXIT_AT_ONCE[0]:
        raise KeyboardInterrupt(SECOND_INTERRUPT)
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
    """Counts SIGINTs as they arrive; a launcher's process ends on the
    second, whatever the main thread is doing. The first of each signal is
    the handler's."""
    while True:
      got = os.read(read, 64)
      if not got:  # restore() closed the write end
        os.close(read)
        return
      for signum in (signal.SIGTERM, signal.SIGINT):
        if signum in got:
          self._first(signum)
      self._interrupts += got.count(signal.SIGINT)
      if self._interrupts >= 2 and _EXIT_AT_ONCE[0]:
        print(f"interrupted: {SECOND_INTERRUPT}", file=sys.stderr,
              flush=True)
        os._exit(INTERRUPTED)  # pylint: disable=protected-access

  def restore(self) -> None:
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
    if self._wakeup:
      _, write, previous = self._wakeup
      signal.set_wakeup_fd(previous)
      os.close(write)  # the thread reads EOF, closes its end and ends
