"""What the launchers print by default: our lines, not TensorFlow's.

TensorFlow prints its start-up lines (oneDNN, `Could not find cuda
drivers`, `failed call to cuInit` on a machine without a GPU, each from C++
before absl logging is set up, so TF_CPP_MIN_LOG_LEVEL does not hide them;
DESIGN.md fact 25) while it is imported and while it looks for devices. The
launchers import it with stderr muted and look for devices once (which
does not fix the devices: logical CPU devices can still be set), then hide
the INFO lines of TensorFlow's and Keras' own Python modules (`Sharding
callback duration` at every checkpoint, `Reduce to ... then broadcast`
under MirroredStrategy). Warnings and errors always show. A launcher checks
its flags and config before it imports TensorFlow (a typo is an error line
in a fraction of a second), with the same lines hidden should the config
file import it.

`--verbosity=1` (or `-v 1`, absl's own flag) shows everything.
"""

import contextlib
import logging as std_logging
import os
import sys
import tempfile
import warnings


def verbose(argv: list[str]) -> bool:
  """Whether absl's --verbosity (-v) in `argv` is 1 or more."""
  for i, arg in enumerate(argv):
    name, _, value = arg.partition("=")
    if name in ("--verbosity", "-v", "--v"):
      if not value and i + 1 < len(argv):
        value = argv[i + 1]
      try:
        return int(value) >= 1
      except ValueError:
        return False
  return False


# TensorFlow's start-up lines (from C++, before absl logging is set up).
STARTUP_LINES = (
    "All log messages before absl::InitializeLog()",
    "oneDNN custom operations are on", "Could not find cuda drivers",
    "failed call to cuInit", "This TensorFlow binary is optimized",
    "To enable the following instructions", "Unable to register cu",
    "computation placer already registered", "TF-TRT Warning")


@contextlib.contextmanager
def startup_lines_hidden(argv: list[str]):
  """While the block runs (it may import TensorFlow: a config file that
  imports it), file descriptor 2 goes to a scratch file; after it, every
  line but TensorFlow's start-up lines is written to stderr. If TensorFlow
  was imported, its devices are listed inside (where `failed call to
  cuInit` is printed). Does nothing if `verbose(argv)` or TensorFlow is
  already imported."""
  if verbose(argv) or "tensorflow" in sys.modules:
    yield
    return
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile() as scratch:
    os.dup2(scratch.fileno(), 2)
    try:
      yield
      if "tensorflow" in sys.modules:  # its device lines come with the
        sys.modules["tensorflow"].config.list_physical_devices()  # first use
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
      scratch.seek(0)
      lines = scratch.read().decode(errors="replace").splitlines(True)
      sys.stderr.write("".join(l for l in lines
                               if not any(p in l for p in STARTUP_LINES)))
      sys.stderr.flush()


def import_tensorflow(argv: list[str]) -> None:
  """Imports TensorFlow (and lists the devices) with its start-up lines
  hidden (`startup_lines_hidden`)."""
  with startup_lines_hidden(argv):
    import tensorflow  # pylint: disable=import-outside-toplevel,unused-import


class _LibraryInfo(std_logging.Filter):
  """Drops INFO (and DEBUG) records logged by TensorFlow's or Keras' own
  modules (those under their installed package folders; a user's folder
  named `keras/` is not theirs)."""

  def __init__(self):
    super().__init__()
    import keras  # pylint: disable=import-outside-toplevel
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    self._folders = tuple(os.path.dirname(os.path.abspath(m.__file__)) + os.sep
                          for m in (tf, keras))

  def filter(self, record: std_logging.LogRecord) -> bool:
    if record.levelno >= std_logging.WARNING:
      return True
    return not os.path.abspath(record.pathname).startswith(self._folders)


def hide_library_info(argv: list[str]) -> None:
  """Unless `verbose(argv)`: the filter on absl's handler, TensorFlow's own
  Python logger (`INFO:tensorflow:...`) at WARNING, and tf.data's
  UserWarning about options in graph mode (raised by its own code) off."""
  if verbose(argv):
    return
  from absl import logging  # pylint: disable=import-outside-toplevel
  logging.get_absl_handler().addFilter(_LibraryInfo())
  std_logging.getLogger("tensorflow").setLevel(std_logging.WARNING)
  warnings.filterwarnings(
      "ignore", message="To make it possible to preserve tf.data options",
      category=UserWarning)
