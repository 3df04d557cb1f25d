r"""Exports a trained run of any task for inference, quantized and not, with
a report.

  python -m launch.export --workdir=runs/digits [--formats=all] \
      [--representative_batches=20]

Rebuilds the run's task (config key `task`, imported: its registered custom
layers and functions resolve), restores the latest checkpoint of WORKDIR into
its model in float32 and writes WORKDIR/export/: model.keras, saved_model/
(signature `serving_default` with the model's own input and output names,
dtypes and shapes), model_{int8,float8,int4}.keras (Keras `model.quantize`),
model_{float32,float16,dynamic_range,int8}.tflite and report.json (per
format: size, the task's metrics on its eval data, max |output difference|
from the float32 model and, for classification outputs, argmax agreement);
prints the report as a table. A format that cannot apply to the model (no
layer Keras quantizes, ops TFLite lacks) is reported as skipped, with the
reason. See trainer/export/exporter.py.

Exit status: 0 done (skipped formats included); 1 some format failed (the
others are written, the failure is in the table and report.json); 2 bad
input (one `error: ...` line, nothing written).
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# pylint: disable=wrong-import-position
from absl import app, flags, logging

from launch import quiet
from launch.status import ExitStatus

_WORKDIR = flags.DEFINE_string(
    "workdir", None, "The run directory of a `launch.train` run (config.json, "
    "checkpoints/); the export goes to WORKDIR/export.")
_FORMATS = flags.DEFINE_string(
    "formats", "all", "all, or a comma-separated list of: keras, "
    "saved_model, keras_int8, keras_float8, keras_int4, tflite_float32, "
    "tflite_float16, tflite_dynamic_range, tflite_int8.")
_REPRESENTATIVE_BATCHES = flags.DEFINE_integer(
    "representative_batches", 20, "Batches of 32 training examples (the "
    "task's train_data()) that calibrate the activation ranges of "
    "tflite_int8.")



def fail(message: str) -> None:
  """Prints one error line and exits with status 2."""
  print(f"error: {message}", file=sys.stderr)
  sys.exit(ExitStatus.BAD_INPUT)


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing with one-line errors instead of a usage dump."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    fail(str(e).splitlines()[0] if str(e) else type(e).__name__)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    fail(f"unexpected arguments {argv[1:]}; flags look like --name=value")
  if not _WORKDIR.value:
    fail("--workdir is required: the directory of a `launch.train` run")
  logging.set_verbosity(logging.WARNING)  # TF's SavedModel writer is chatty
  from trainer.export import exporter as export_lib  # pylint: disable=import-outside-toplevel
  from trainer.errors import UserError  # pylint: disable=import-outside-toplevel
  try:
    formats = export_lib.parse_formats(_FORMATS.value)
    report = export_lib.export(
        _WORKDIR.value, formats,
        representative_batches=_REPRESENTATIVE_BATCHES.value)
  except UserError as e:
    fail(str(e))
  print(export_lib.format_table(report))
  print(f"wrote {os.path.join(_WORKDIR.value, 'export')} "
        f"(from {report['checkpoint']})")
  if any("error" in row for row in report["formats"].values()):
    sys.exit(ExitStatus.FAILED)


if __name__ == "__main__":
  quiet.import_tensorflow(sys.argv)
  quiet.hide_library_info(sys.argv)
  app.run(main, flags_parser=parse_flags)
