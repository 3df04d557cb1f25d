"""What the launchers print by default: our lines, not TensorFlow's.

TensorFlow prints its start-up lines (oneDNN, `Could not find cuda
drivers`, `failed call to cuInit` on a machine without a GPU, each from C++
before absl logging is set up, so TF_CPP_MIN_LOG_LEVEL does not hide them;
DESIGN.md fact 25) while it is imported and while it looks for devices. The
launchers import it with stderr muted and look for devices once (which
does not fix the devices: logical CPU devices can still be set), then hide
the INFO lines of TensorFlow's and Keras' own Python modules (`Sharding
callback duration` at every checkpoint, `Reduce to ... then broadcast`
under MirroredStrategy). Warnings and errors always show.

`--verbosity=1` (or `-v 1`, absl's own flag) shows everything.
"""

import logging as std_logging
import os
import sys
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


def import_tensorflow(argv: list[str]) -> None:
  """Imports TensorFlow and lists the devices, with file descriptor 2
  pointed at /dev/null unless `verbose(argv)`. A Python error raised by the
  import still shows (it is raised after stderr is back)."""
  if verbose(argv) or "tensorflow" in sys.modules:
    return
  sys.stderr.flush()
  saved = os.dup(2)
  devnull = os.open(os.devnull, os.O_WRONLY)
  os.dup2(devnull, 2)
  try:
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    tf.config.list_physical_devices()
  finally:
    os.dup2(saved, 2)
    os.close(saved)
    os.close(devnull)


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
