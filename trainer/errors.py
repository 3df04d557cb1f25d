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
