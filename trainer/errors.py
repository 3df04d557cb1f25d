"""User-facing errors: bad config, flags, paths or data.

The launcher prints these as one line (`error: <message>`) and exits with
status 2; every other exception is a bug and keeps its traceback.
"""

import re


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


_KERAS_CALL = re.compile(r"Exception encountered when calling ([\w.]+\(\))")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_FUNCTION_NODE = re.compile(r"^\{\{function_node [^}]*\}\}\s*")
_LONGEST = 300  # characters of a message kept (a tensor's values can follow)


def _cut(line: str, longest: int = _LONGEST) -> str:
  return line if len(line) <= longest else line[:longest - 3] + "..."


def _where_and_message(error: BaseException) -> tuple[str | None, str]:
  """(the Keras layer call an error was raised in, or None; the first
  message line that says what is wrong), uncut."""
  text = _ANSI.sub("", untraced_message(error)).strip()
  lines = [l.strip() for l in text.splitlines() if l.strip()]
  where = _KERAS_CALL.match(lines[0]) if lines else None
  if where and len(lines) > 1 and not lines[1].startswith("Arguments "):
    where, line = where.group(1), lines[1]
  else:
    where, line = None, lines[0] if lines else ""
  line = _FUNCTION_NODE.sub("", line)  # TensorFlow's graph-node prefix
  return where, re.sub(r"\s*name:\s*$", "", line)  # its empty op name


def message_line(error: BaseException) -> str:
  """The first line of `error`'s message that says what is wrong, cut to
  300 characters: the cause for an error Keras wrapped inside a layer,
  without TensorFlow's `{{function_node ...}}` prefix."""
  return _cut(_where_and_message(error)[1])


def first_line(error: BaseException) -> str:
  """`Type: message_line(error)`, for one-line reports.

  Keras wraps an error inside a layer as "Exception encountered when calling
  Layer.call()." with the cause on a later line: then the cause's first line
  and the layer, e.g. `InvalidArgumentError in Activation.call(): cannot
  compute Sub as input #1(zero-based) was expected to be a half tensor ...`.
  """
  where, line = _where_and_message(error)
  where = f" in {where}" if where else ""
  return _cut(f"{type(error).__name__}{where}: {line}")


def untraced_message(error: Exception) -> str:
  """The message an error was raised with inside a traced tf.function,
  without the "in user code: File ..." frames AutoGraph puts before it."""
  text = str(error)
  marker = f"{type(error).__name__}: "
  if not text.startswith("in user code:") or marker not in text:
    return text
  return " ".join(text.rsplit(marker, 1)[1].split())
