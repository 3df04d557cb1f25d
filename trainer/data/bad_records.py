"""A record that cannot be decoded or parsed, found while training: bad
input (one `error:` line, exit 2, never restarted), not a crash.

tf.data reports an error raised inside the input pipeline's functions as
the pipeline's own (`... transformation with iterator: Iterator::...: <the
cause>` and `[[IteratorGetNext]]`), as InvalidArgumentError (an image that
does not decode, a failed label check, a feature that is missing) or
DataLossError (a truncated or corrupt TFRecord). Other errors there (a file
gone from a network filesystem) may be transient and stay crashes, which a
restart may fix.
"""

import contextlib
import re
from typing import Callable

import tensorflow as tf

from trainer.errors import DataError

_IN_PIPELINE = re.compile(r"transformation with iterator: [^:]*(?::: ?\S+)*:"
                          r" (.*)")


def cause(error: BaseException) -> str | None:
  """The cause line of an input-pipeline error about a bad record, or None
  when `error` is something else."""
  if not isinstance(error, (tf.errors.InvalidArgumentError,
                            tf.errors.DataLossError)):
    return None
  text = str(error)
  if "IteratorGetNext" not in text and "transformation with iterator" not in (
      text):
    return None
  lines = [l.strip() for l in text.splitlines() if l.strip()]
  for line in lines:
    found = _IN_PIPELINE.search(line)
    if found:
      return found.group(1).strip()
  meaningful = [l for l in lines if not l.startswith(("[[", "Graph execution",
                                                      "Detected at node",
                                                      "<stack traces"))]
  return (meaningful[0] if meaningful else lines[0] if lines else
          type(error).__name__)


@contextlib.contextmanager
def reported(where: Callable[[], str]):
  """Turns a bad record met inside the block into `as_data_error`'s
  DataError; `where()` says where (called only then)."""
  try:
    yield
  except (tf.errors.InvalidArgumentError, tf.errors.DataLossError) as e:
    bad = as_data_error(e, where())
    if bad is None:
      raise
    raise bad from None


def as_data_error(error: BaseException, where: str) -> DataError | None:
  """A DataError for a bad record met at `where` (e.g. "training steps
  41-60"), or None when `error` is not one."""
  found = cause(error)
  if found is None:
    return None
  found = re.sub(r"\s*\[\[.*$", "", found)
  return DataError(
      f"a bad record in the input at {where}: {found[:300]}; fix or remove "
      "it (a corrupt file, an image that does not decode, a label outside "
      "[0, data.num_classes)), then run the same command: it resumes from "
      "the latest checkpoint")
