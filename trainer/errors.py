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
  """The training loss became NaN or inf (without a loss scale to absorb it).

  Attributes:
    step: the global step after the host loop in which it happened.
    loss: the non-finite loss value.
  """

  def __init__(self, step: int, loss: float):
    super().__init__(f"the training loss is {loss} after global step {step}")
    self.step, self.loss = step, loss
    self.checkpoint = None  # the last good checkpoint, if the run keeps any
