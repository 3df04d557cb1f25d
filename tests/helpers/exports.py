"""A short run of a config through the launcher, then its export."""

import json

from conftest import run_module

TRAIN_FLAGS = ("--config.train.steps=20", "--config.train.steps_per_loop=10",
               "--config.train.checkpoint_every=0",
               "--config.callbacks.progress_bar=False",
               "--config.callbacks.tensorboard=False")


def train_and_export(config: str, workdir, *export_flags):
  """Trains `config` for 20 steps and exports it; returns the export's
  CompletedProcess and report.json (None if it wrote none)."""
  proc = run_module("launch.train", f"--config={config}",
                    f"--workdir={workdir}", *TRAIN_FLAGS, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  proc = run_module("launch.export", f"--workdir={workdir}",
                    "--representative_batches=2", *export_flags, timeout=600)
  report = workdir / "export" / "report.json"
  return proc, json.loads(report.read_text()) if report.exists() else None
