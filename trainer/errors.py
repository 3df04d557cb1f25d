"""User-facing errors: bad config, flags, paths or data.

The launcher prints these as one line (`error: <message>`) and exits with
status 2; every other exception is a bug and keeps its traceback.
"""


class UserError(Exception):
  """Bad input from the user; the message names the problem and the fix."""


class ConfigError(UserError):
  """A config value that cannot work."""


class DataError(UserError):
  """A dataset that cannot be found or read."""


class TrainingDiverged(RuntimeError):
  """Training can no longer make progress: the loss became NaN or inf
  (without a loss scale to absorb it), or under mixed_float16 the loss scale
  fell below its floor (every step overflows, none is applied).

  Attributes:
    step: the global step after the host loop in which it happened.
    loss: the loss of that host loop.
  """

  def __init__(self, step: int, loss: float, reason: str = ""):
    super().__init__(reason or
                     f"the training loss is {loss} after global step {step}")
    self.step, self.loss = step, loss
    self.checkpoint = None  # the last good checkpoint, if the run keeps any


def first_line(error: Exception) -> str:
  """`Type: first non-blank line of the message`, for one-line reports."""
  lines = [l for l in str(error).strip().splitlines() if l.strip()]
  return f"{type(error).__name__}: {lines[0].strip() if lines else ''}"


def untraced_message(error: Exception) -> str:
  """The message an error was raised with inside a traced tf.function,
  without the "in user code: File ..." frames AutoGraph puts before it."""
  text = str(error)
  marker = f"{type(error).__name__}: "
  if not text.startswith("in user code:") or marker not in text:
    return text
  return " ".join(text.rsplit(marker, 1)[1].split())
