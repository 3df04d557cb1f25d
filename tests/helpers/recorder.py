"""A user callback for multi-worker tests, loaded with `callbacks.custom`.

`recorder:EpochRecorder` appends one JSON line per hook to
$RECORD_DIR/worker-<task index>.jsonl: the hook, epoch, global step and logs.
With $STOP_WORKER=i and $STOP_AFTER_EPOCH=e, worker i alone sets
`stop_training` at the end of epoch e (the trainer must make every worker
stop there).
"""

import json
import os
import time

from trainer.callbacks import TrainerCallback


def _task_index() -> int:
  """This worker's index: from TF_CONFIG, else SLURM's task rank."""
  if os.environ.get("TF_CONFIG"):
    return json.loads(os.environ["TF_CONFIG"]).get("task", {}).get("index", 0)
  return int(os.environ.get("SLURM_PROCID", "0"))


class EpochRecorder(TrainerCallback):
  """Records epoch ends and train end, on every worker."""

  def __init__(self):
    super().__init__()
    self.path = os.path.join(os.environ["RECORD_DIR"],
                             f"worker-{_task_index()}.jsonl")

  def _record(self, hook, epoch=None, logs=None):
    with open(self.path, "a", encoding="utf-8") as f:
      f.write(json.dumps({"hook": hook, "epoch": epoch,
                          "step": self.global_step, "logs": logs or {}}) + "\n")

  def on_epoch_end(self, epoch, logs=None):
    self._record("epoch_end", epoch, logs)
    if (str(_task_index()) == os.environ.get("STOP_WORKER") and
        str(epoch) == os.environ.get("STOP_AFTER_EPOCH")):
      self.model.stop_training = True

  def on_train_end(self, logs=None):
    self._record("train_end")


class KillAt(TrainerCallback):
  """SIGKILLs its own process at the first host-loop end at or after global
  step $KILL_AT_STEP: a crash at an arbitrary step, as a real kill. With
  $KILL_WORKER only that worker dies; with $KILL_ONCE_FILE only the first
  time (the file records it), so a restarted job runs through."""

  def on_train_batch_end(self, batch, logs=None):
    if not self.global_step >= int(os.environ.get("KILL_AT_STEP", "-1")) >= 0:
      return
    if os.environ.get("KILL_WORKER", str(_task_index())) != str(
        _task_index()):
      return
    once = os.environ.get("KILL_ONCE_FILE")
    if once:
      if os.path.exists(once):
        return
      with open(once, "w", encoding="utf-8"):
        pass
    os.kill(os.getpid(), 9)


class HangAt(TrainerCallback):
  """Worker $HANG_WORKER blocks forever at the first host-loop end at or
  after global step $HANG_AT_STEP: a hung peer that is still alive (its
  process, threads and heartbeats go on; it just never reaches the next
  collective)."""

  def on_train_batch_end(self, batch, logs=None):
    if (str(_task_index()) == os.environ.get("HANG_WORKER") and
        self.global_step >= int(os.environ.get("HANG_AT_STEP", "-1")) >= 0):
      while True:
        time.sleep(1)
