r"""Trains one config.

  python -m launch.train --config=configs/digits.py --workdir=runs/digits \
      [--config.KEY=VALUE ...] [--testing]

Writes WORKDIR/config.json, WORKDIR/metrics.jsonl and WORKDIR/checkpoints/.
`--testing` is the single-device testing mode: one device, a few train steps
and a short eval, no checkpoints; it prints one verdict line and exits 0 on
PASS, 1 on FAIL. The same command on the same workdir resumes.

Exit status (launch/status.py): 0 done; 1 --testing FAIL; 2 bad input (one `error: ...` line);
3 training diverged (NaN/inf loss without a loss scale, or a mixed_float16
loss scale below precision.min_loss_scale; checkpoints kept intact);
4 stalled (multi-worker: no host-loop progress for
distribution.collective_timeout seconds; trainer/distribute/watchdog.py);
5 a checkpoint could not be written (disk full; the last complete one is
intact and the same command resumes from it);
75 preempted by SIGTERM or Ctrl-C (checkpoint saved at the next step boundary);
130 a second Ctrl-C (stopped at once, not saved).
"""

import os
import re
import signal
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# pylint: disable=wrong-import-position
from absl import app, flags, logging
from ml_collections import config_flags

from launch import quiet
from launch.status import ExitStatus

# New keys are accepted here so that `--config.user.KEY=VALUE` can add one;
# every key outside `user` is then checked by trainer.config.validate (a typo
# is an error there, with the closest known key).
_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file (ml_collections), e.g. configs/digits.py. "
    "Override any key with --config.KEY=VALUE; your own code's settings go "
    "under --config.user.KEY=VALUE.", lock_config=False,
    accept_new_attributes=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Run directory: config.json, metrics.jsonl, checkpoints/."
    " The same command on the same workdir resumes from the last checkpoint."
    " Optional with --testing (then it must not hold a run).")
_ALLOW_CONFIG_CHANGE = flags.DEFINE_bool(
    "allow_config_change", False, "Resume a workdir even though the config "
    "changes the model, the data or the seed (refused by default).")
_TESTING = flags.DEFINE_bool(
    "testing", False, "Single-device testing mode: one device, a few steps, "
    "no checkpoints, a one-line PASS/FAIL verdict.")



def fail(message: str) -> None:
  """Prints one error line and exits with status 2."""
  print(f"error: {message}", file=sys.stderr)
  sys.exit(ExitStatus.BAD_INPUT)


def _config_path(argv: list[str]) -> str | None:
  for i, arg in enumerate(argv):
    if arg.startswith("--config="):
      return arg.split("=", 1)[1].split(":", 1)[0]
    if arg == "--config" and i + 1 < len(argv):
      return argv[i + 1].split(":", 1)[0]
  return None


def _missing_section(argv: list[str], error: str) -> str:
  """The message for a --config.A.B... flag whose section A does not exist
  (`error` names A in quotes)."""
  from trainer import config as config_lib  # pylint: disable=import-outside-toplevel
  names = re.findall(r"'(\w+)", error)
  for arg in (a for a in argv if a.startswith("--config.")):
    parts = arg[len("--config."):].split("=", 1)[0].split(".")
    name = next((n for n in names if n in parts[:-1]), None)
    if name:
      section = ".".join(parts[:parts.index(name) + 1])
      if section.startswith(config_lib.USER_SECTION + "."):
        return (f"{arg}: there is no section {section!r} to add a key to; "
                f"declare it in the config file (c.{section} = "
                "ml_collections.ConfigDict()) or set it whole, e.g. "
                f"--config.{section}=\"{{'key': 1}}\"")
      return str(config_lib.unknown_key(section))
  return (f"cannot apply a --config.* flag: {error.splitlines()[0]}; every "
          "key is listed with its default in trainer/config.py")


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing with one-line errors instead of a usage dump."""
  path = _config_path(argv)
  if path is not None and not os.path.isfile(path):
    fail(f"config file {path!r} does not exist; pass a file such as "
         "--config=configs/digits.py")
  try:
    with quiet.startup_lines_hidden(argv):  # the config file may import TF
      return flags.FLAGS(argv)
  except flags.Error as e:
    fail(str(e).splitlines()[0] if str(e) else type(e).__name__)
  except (AttributeError, KeyError) as e:  # --config.A.B whose A is not in it
    fail(_missing_section(argv, str(e.args[0]) if e.args else str(e)))
  except Exception as e:  # pylint: disable=broad-except
    first = str(e).strip().splitlines()
    fail(f"cannot load the config {path!r}: {type(e).__name__}: "
         f"{first[-1] if first else ''}")


def _eval_summary(logs: dict) -> str:
  """`eval <metric> V, ..., eval loss V`: the task's metrics first."""
  if not any(k.startswith("eval/") for k in logs):
    return "no evaluation (the task has no eval_data)"
  names = [k[5:] for k in logs if k.startswith("eval/") and k not in (
      "eval/loss", "eval/num_examples", "eval/bad_records")] + ["loss"]
  summary = ", ".join(
      f"eval {name} {logs.get('eval/' + name, float('nan')):.4f}"
      for name in names)
  skipped = [f"{int(logs[key])} bad {what} records skipped" for key, what in
             (("bad_records", "training"), ("eval/bad_records", "eval"))
             if logs.get(key)]
  return "; ".join([summary, *skipped])


def _lost_peer(error: Exception) -> bool:
  """Whether `error` is a collective that failed because another worker of
  a multi-worker job died or stopped (TensorFlow's coordination service
  and collective ops report it as UnavailableError, or AbortedError)."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  return isinstance(error, (tf.errors.UnavailableError,
                            tf.errors.AbortedError))


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    fail(f"unexpected arguments {argv[1:]}; flags look like --name=value")
  if _CONFIG.value is None:
    fail("--config is required, e.g. --config=configs/digits.py")
  if not _WORKDIR.value and not _TESTING.value:
    fail("--workdir is required (it may be omitted with --testing)")
  from trainer import config as config_lib  # pylint: disable=import-outside-toplevel
  from trainer.errors import ConfigError  # pylint: disable=import-outside-toplevel
  try:  # what needs no TensorFlow: an error line without the 5 s import
    config_lib.validate(_CONFIG.value)
  except ConfigError as e:
    fail(str(e))
  quiet.import_tensorflow(sys.argv)
  quiet.hide_library_info(sys.argv)
  from trainer import run as run_lib  # pylint: disable=import-outside-toplevel
  from trainer.checkpoint.checkpointer import CheckpointWriteError  # pylint: disable=import-outside-toplevel
  from trainer.errors import TrainingDiverged, UserError, first_line  # pylint: disable=import-outside-toplevel
  from trainer.distribute import stop_signals  # pylint: disable=import-outside-toplevel
  stop_signals.exit_on_second_interrupt()  # this process is the launcher's
  config_path = flags.FLAGS["config"].config_filename
  try:
    result = run_lib.run(_CONFIG.value, _WORKDIR.value, testing=_TESTING.value,
                         allow_config_change=_ALLOW_CONFIG_CHANGE.value)
  except UserError as e:
    fail(str(e))
  except TrainingDiverged as e:
    if _TESTING.value:
      print(f"testing: FAIL {config_path}: training diverged: {e}")
      sys.exit(ExitStatus.FAILED)
    kept = (f"the last good checkpoint, {e.checkpoint}, is intact"
            if e.checkpoint else "no checkpoint was written")
    print(f"error: training diverged: {e}; {kept}. Lower "
          "optimizer.learning_rate or set optimizer.global_clipnorm",
          file=sys.stderr)
    sys.exit(ExitStatus.DIVERGED)
  except CheckpointWriteError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(ExitStatus.DISK_FULL)
  except KeyboardInterrupt:
    print("interrupted: stopped by Ctrl-C before training started; the "
          "same command resumes from the last checkpoint", file=sys.stderr)
    sys.exit(ExitStatus.INTERRUPTED)
  except Exception as e:  # pylint: disable=broad-except
    if not _TESTING.value and _lost_peer(e):
      # A worker that died or hung ended this one's collectives: the dead
      # one's status says why; this one says so in a line, and the job is
      # restartable (launch.local --max_restarts, train.sbatch).
      print(f"error: another worker of the job was lost ({first_line(e)}); "
            "this worker stops too", file=sys.stderr)
      sys.exit(ExitStatus.FAILED)
    if not _TESTING.value:
      raise
    logging.exception("testing run failed")
    print(f"testing: FAIL {config_path}: {type(e).__name__}: "
          f"{str(e).splitlines()[0] if str(e) else ''}")
    sys.exit(ExitStatus.FAILED)
  # The run is over (saved, if it was to): a Ctrl-C now would only cut the
  # report short.
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  logs = result.logs
  if _TESTING.value:
    import math  # pylint: disable=import-outside-toplevel
    ok = math.isfinite(logs.get("loss", float("nan"))) and (
        math.isfinite(logs.get("eval/loss", float("nan")))
        or not result.evaluates) and result.steps > 0
    verdict = "PASS" if ok else "FAIL"
    evaluated = (f"{_eval_summary(logs)} on "
                 f"{logs.get('eval/num_examples', 0)} examples"
                 if result.evaluates else _eval_summary({}))
    print(f"testing: {verdict} {config_path}: {result.steps} steps on "
          f"{result.device} in {result.seconds:.1f}s, loss "
          f"{logs.get('loss', float('nan')):.4f}, {evaluated}")
    sys.exit(ExitStatus.DONE if ok else ExitStatus.FAILED)
  if result.preempted:
    cause = result.stop_signal or "another worker's signal"
    if result.is_chief and (result.checkpoint or "").endswith(
        f"ckpt-{result.steps}"):
      print(f"preempted: stopped at step {result.steps} on {cause}, "
            "checkpoint saved; run the same command to resume")
    elif result.is_chief:
      print(f"preempted: stopped at step {result.steps} on {cause}, not "
            "checkpointed (the last loss was not finite); the same command "
            f"resumes from {result.checkpoint or 'the start'}")
    sys.exit(ExitStatus.PREEMPTED)
  if not result.is_chief:
    return  # the chief reports for the job
  if result.already_done:
    print(f"already at step {result.steps}: nothing to train, nothing "
          f"written; {_eval_summary(logs)} (raise --config.train.steps to "
          "train on)")
    return
  logging.info("done: step %d, %s", result.steps,
               {k: round(v, 4) for k, v in logs.items()
                if isinstance(v, float)})
  print(f"done: {result.steps} steps in {result.seconds:.1f}s, "
        f"{_eval_summary(logs)}")


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
