"""A record that cannot be decoded or parsed, found while training: bad
input (one `error:` line, exit 2, never restarted), not a crash.

tf.data reports an error raised inside the input pipeline's functions as
the pipeline's own (`... transformation with iterator: Iterator::...: <the
cause>` and `[[IteratorGetNext]]`), as InvalidArgumentError (an image that
does not decode, a failed label check, a feature that is missing) or
DataLossError (a TFRecord whose checksum fails). Other errors there (a file
gone from a network filesystem) may be transient and stay crashes, which a
restart may fix.

The error does not say which record: `name_the_record` finds it afterwards
by decoding the failing host loop's records once more, one by one
(trainer/data/files.py `first_bad`). With `data.skip_bad_records=N`,
`Skipping` decodes each record so that a failure is caught, counted and
skipped instead.
"""

import contextlib
import re
import sys
from typing import Callable

import tensorflow as tf
from absl import logging

from trainer.errors import DataError, message_line

_IN_PIPELINE = re.compile(r"transformation with iterator: [^:]*(?::: ?\S+)*:"
                          r" (.*)")


def cause(error: BaseException) -> str | None:
  """The cause line of an input-pipeline error about a bad record, or None
  when `error` is something else."""
  if not isinstance(error, (tf.errors.InvalidArgumentError,
                            tf.errors.DataLossError)):
    return None
  text = str(error)
  # A distributed iterator's next (IteratorGetNext), or a `for` over a
  # dataset inside tf.function (ReduceDataset: evaluation on one device).
  if not any(mark in text for mark in ("IteratorGetNext", "ReduceDataset",
                                       "transformation with iterator")):
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
def reported(where: Callable[[], str], *,
             steps: tuple[int, int] | None = None, evaluation: bool = False):
  """Turns a bad record met inside the block into `as_data_error`'s
  DataError; `where()` says where (called only then). The error keeps
  `steps` (the global step before the host loop, its steps) or
  `evaluation`, for `name_the_record` to find the record."""
  try:
    yield
  except (tf.errors.InvalidArgumentError, tf.errors.DataLossError) as e:
    bad = as_data_error(e, where())
    if bad is None:
      raise
    bad.steps, bad.evaluation = steps, evaluation
    raise bad from None


def name_the_record(error: DataError, train_input, eval_input,
                    input_offset: int = 0) -> DataError:
  """`error` (from `reported`) with the file and record index of the bad
  record, found by decoding the records of the failing host loop (or of
  the evaluation pass) one by one, where the input can say
  (trainer.data.files.TrainInput, EvalInput); `input_offset` is the input
  position minus the global step (train.nan_recovery moves it)."""
  steps = getattr(error, "steps", None)
  found = None
  if steps is not None and hasattr(train_input, "first_bad"):
    found = train_input.first_bad(steps[0] + input_offset, steps[1])
  elif getattr(error, "evaluation", False) and hasattr(eval_input,
                                                       "first_bad"):
    found = eval_input.first_bad()
  if found is None:
    return error
  path, index, reason = found
  record = path if index is None else f"{path} (record {index})"
  named = _bad_record_error(error.where, f"{record}: {reason}")
  named.steps, named.evaluation = steps, getattr(error, "evaluation", False)
  return named


def as_data_error(error: BaseException, where: str) -> DataError | None:
  """A DataError for a bad record met at `where` (e.g. "training steps
  41-60"), or None when `error` is not one."""
  found = cause(error)
  if found is None:
    return None
  return _bad_record_error(where, re.sub(r"\s*\[\[.*$", "", found))


def _bad_record_error(where: str, what: str) -> DataError:
  error = DataError(
      f"a bad record in the input at {where}: {what[:300]}; fix or remove "
      "it (a corrupt file, an image that does not decode, a label outside "
      "[0, data.num_classes)) or set data.skip_bad_records=N to skip up to "
      "N, then run the same command: it resumes from the latest checkpoint")
  error.where = where
  return error


# Bad records named on stderr while skipping, the first this many per run.
NAMED_WHILE_SKIPPING = 10


def _tried(raw, decode) -> tf.data.Dataset:
  """`decode(raw)` as a dataset of one element (the example, in a 1-tuple),
  or of none when it raises. tf.data cannot catch an op's error inside a
  map; a one-element dataset with `ignore_errors` can (~0.1 ms per record,
  measured on 64x64 JPEGs: paid only while skipping or diagnosing)."""
  return tf.data.Dataset.from_tensors(raw).map(
      lambda r: (decode(r),)).ignore_errors()


def _decodes(raw, decode) -> tf.Tensor:
  """bool: `decode(raw)` does not raise."""
  return _tried(raw, decode).map(lambda example: True).concatenate(
      tf.data.Dataset.from_tensors(False)).take(1).get_single_element()


class Skipping:
  """`data.skip_bad_records=limit`: records that do not decode are skipped
  and counted instead of ending the run.

  Training keeps each bad record's place (the dataset's first example takes
  it), so batches keep their size and positions stay a function of the step:
  a resume is as exact as without bad records. Evaluation drops them.
  Training counts distinct records (a bad record met again in the next
  epoch counts once; workers read different files), evaluation the records
  of one pass; both per process, as tf.data decodes them (a few batches
  ahead of the step). The Trainer sums them over workers, logs them
  (`train/bad_records`, `eval/bad_records`) and refuses once one passes
  `limit`.
  """

  def __init__(self, limit: int):
    self.limit = int(limit)
    self._said: dict[str, int] = {}
    with tf.init_scope():  # plain resources, whatever strategy is in scope
      self._seen = tf.lookup.experimental.MutableHashTable(
          tf.string, tf.int64, default_value=0)
      self.eval_count = tf.Variable(0, dtype=tf.int64, trainable=False)

  def train_count(self) -> int:
    """Distinct bad training records met by this process."""
    return int(self._seen.size())

  def decoded(self, records: tf.data.Dataset, decode, substitute, *,
              training: bool, indexed: bool = True) -> tf.data.Dataset:
    """Examples of tagged `records` ((path, index in file, raw)), each bad
    one counted, named on stderr (the first few; with its index when
    `indexed`), and replaced by `substitute` (training) or dropped (eval)."""

    def count(path, index) -> tf.Tensor:
      """The count after this bad record; 0 when it was met before."""
      if not training:
        return self.eval_count.assign_add(1)
      key = tf.strings.join([path, tf.strings.as_string(index)], "\0")
      new = tf.equal(self._seen.lookup(key), 0)
      def insert():
        with tf.control_dependencies([self._seen.insert(key, 1)]):
          return self._seen.size()
      return tf.cond(new, insert, lambda: tf.constant(0, tf.int64))

    def counted(path, index, raw):
      example, ok = _tried(raw, decode).map(
          lambda example: (example, True)).concatenate(
              tf.data.Dataset.from_tensors((substitute, False))).take(
                  1).get_single_element()

      def name():
        n = count(path, index)
        where = tf.strings.join([path, " (record ", tf.strings.as_string(
            index), ")"]) if indexed else path
        def say():
          tf.print(tf.strings.join([
              "warning: skipping a bad record (data.skip_bad_records): ",
              where]), output_stream=sys.stderr)
          return tf.constant(True)

        return tf.cond((n > 0) & (n <= NAMED_WHILE_SKIPPING), say,
                       lambda: tf.constant(False))

      named = tf.cond(ok, lambda: tf.constant(False), name)
      with tf.control_dependencies([named]):
        return tf.nest.map_structure(tf.identity, (example, ok))

    examples = records.map(counted, num_parallel_calls=tf.data.AUTOTUNE,
                           deterministic=True)
    if not training:
      examples = examples.filter(lambda example, ok: ok)
    return examples.map(lambda example, ok: example)

  def observe(self, count: int, where: str, *, say: bool) -> None:
    """Takes a new total of bad records met in `where`; logs it when it
    grew (`say`: this process reports), raises DataError past the limit."""
    if say and count > self._said.get(where, 0):
      logging.warning("%d bad records skipped in %s (at most "
                      "data.skip_bad_records=%d)", count, where, self.limit)
    self._said[where] = max(count, self._said.get(where, 0))
    if count > self.limit:
      raise DataError(
          f"{count} bad records in {where}, more than "
          f"data.skip_bad_records={self.limit}: the data is more broken than "
          "allowed; fix or remove the files named on stderr (warning: "
          "skipping a bad record), or raise the limit")


class Unreadable(Exception):
  """A file's raw records end in a read error (a TFRecord whose checksum
  fails: bytes corrupt in the middle)."""


def _readable(records: tf.data.Dataset):
  """Iterates `records`; a read error (DataLossError: a TFRecord file whose
  checksum fails) raises Unreadable, to be looked for file by file."""
  try:
    yield from records
  except tf.errors.DataLossError as e:
    raise Unreadable(message_line(e)) from None


def unreadable_file(paths: list[str], reader) -> tuple[str, int, str] | None:
  """The first of `paths` whose raw records `reader` cannot read through:
  (path, records read before the error, the error's first line), or None.
  Reads raw records only."""
  for path in paths:
    read = 0
    try:
      for _ in reader(tf.constant(path)):
        read += 1
    except tf.errors.DataLossError as e:
      return path, read, message_line(e)
  return None


def first_bad(records: tf.data.Dataset, decode, *, indexed: bool = True
             ) -> tuple[str, int | None, str] | None:
  """The first record of tagged `records` ((path, index in file, raw)) that
  does not decode: (path, index or None when not `indexed` (a file is one
  record), the decode error's first line), or None.
  Decodes each record once: a diagnosis after a failure, not a hot path."""
  checked = records.map(lambda path, index, raw: (
      path, index, raw, _decodes(raw, decode)))
  for path, index, raw, ok in _readable(checked):
    if not bool(ok):
      try:
        decode(raw)
        reason = "it did not decode inside tf.data"
      except Exception as e:  # pylint: disable=broad-except
        reason = re.sub(r"\s*\[Op:\w+\]$", "", message_line(e))
      return (path.numpy().decode(), int(index) if indexed else None,
              reason)
  return None
