"""A worker program for launcher tests (`launch.local --module=exit_worker`):
what a worker does to the launcher, without training. Worker i (from
TF_CONFIG) exits with $EXIT_<i> at once when it is set; the others run for
$RUN_SECONDS (default 1) and exit 0, or 75 on SIGTERM (as launch.train
does when preempted). Each start appends "<index> <pid>" to $STARTS_FILE. With
$CHECKPOINT_AFTER=s, worker 0 writes a checkpoint state (10 steps past the
last, in --workdir's checkpoints/) after s seconds, as a training worker
saving one would."""

import json
import os
import signal
import sys
import time


def main() -> int:
  index = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
  if os.environ.get("STARTS_FILE"):
    with open(os.environ["STARTS_FILE"], "a", encoding="utf-8") as f:
      f.write(f"{index} {os.getpid()}\n")
  if f"EXIT_{index}" in os.environ:
    return int(os.environ[f"EXIT_{index}"])
  signal.signal(signal.SIGTERM, lambda *_: sys.exit(75))
  run = float(os.environ.get("RUN_SECONDS", "1"))
  after = float(os.environ.get("CHECKPOINT_AFTER", run + 1))
  if index == 0 and after < run:
    time.sleep(after)
    _checkpoint()
    run -= after
  time.sleep(run)
  return 0


def _checkpoint() -> None:
  """A checkpoint state file 10 steps past the last one."""
  workdir = next(a.split("=", 1)[1] for a in sys.argv
                 if a.startswith("--workdir="))
  folder = os.path.join(workdir, "checkpoints")
  os.makedirs(folder, exist_ok=True)
  path = os.path.join(folder, "checkpoint")
  step = 0
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      step = int(f.read().split("ckpt-")[1].split('"')[0])
  with open(path, "w", encoding="utf-8") as f:
    f.write(f'model_checkpoint_path: "ckpt-{step + 10}"\n')


if __name__ == "__main__":
  sys.exit(main())
