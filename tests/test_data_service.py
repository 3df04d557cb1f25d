"""Training input through the tf.data service (trainer/data/service.py,
launch/data_service.py, launch.local --data_service_workers): real
dispatcher and worker servers on localhost."""

import collections
import itertools
import os
import re
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

from conftest import ROOT, run_module
from launch.local import free_ports
from tests.helpers import tfrecord_task
from trainer import config as config_lib
from trainer.data import Files
from trainer.data import service
from trainer.errors import ConfigError, DataError
from trainer.task import examples


@pytest.fixture(name="dispatcher", scope="module")
def _dispatcher():
  """A dispatcher and two workers, each a launch.data_service process; the
  dispatcher's target. In this process, a worker's stop held the GIL for
  50 s at the end of a full suite run (gRPC waiting on a reader's pending
  request); a process is killed at once."""
  port = free_ports(1)[0]
  roles = [["--role=dispatcher", f"--port={port}"]] + [
      ["--role=worker", f"--dispatcher=localhost:{port}"]] * 2
  procs = []
  start = lambda role: subprocess.Popen(
      [sys.executable, "-m", "launch.data_service", *role], cwd=ROOT,
      stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
      env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
  def serving(proc):
    line = proc.stdout.readline()  # "serving <role> at <address>"
    assert line.startswith("serving "), line

  try:
    procs.append(start(roles[0]))  # the dispatcher, then both workers
    serving(procs[0])
    procs += [start(role) for role in roles[1:]]
    for proc in procs[1:]:
      serving(proc)
    target = f"grpc://localhost:{port}"
    _wait_for_workers(target, 2)
    yield target
  finally:
    for proc in procs:
      proc.kill()
      proc.wait()


def _wait_for_workers(target: str, count: int, timeout: float = 60) -> None:
  """Returns when `count` workers have registered with the dispatcher: a
  job in parallel_epochs mode then yields `count` copies of its dataset (a
  worker registers some time after it starts serving)."""
  deadline = time.monotonic() + timeout
  for attempt in itertools.count():
    got = len(list(tf.data.Dataset.range(4).apply(
        tf.data.experimental.service.distribute(
            "parallel_epochs", target, job_name=f"probe-{attempt}"))))
    if got >= 4 * count:
      return
    assert time.monotonic() < deadline, f"{got // 4} of {count} workers"
    time.sleep(0.2)


def _ids(record):
  parsed = tf.io.parse_single_example(
      record, {"id": tf.io.FixedLenFeature([], tf.int64)})
  return tf.cast(parsed["id"], tf.float32)[None], parsed["id"]


def _taken(train, dispatcher, run_id, steps, batch=8):
  fn = service.train_fn(examples(train, "train_data"), service=dispatcher,
                        run_id=run_id, global_batch_size=batch, seed=1,
                        window=16)
  return [int(v) for _, y in fn(tf.distribute.InputContext()).take(steps)
          for v in y.numpy()]


def test_an_epoch_of_files_through_two_service_workers_holds_each_once(
    tmp_path, dispatcher):
  """8 files of 16 records: an epoch's worth of examples holds more than
  half the 128 records (two workers each reading every file would give
  exactly half: 64, each twice; a worker done with its files starts the
  next epoch while a slower one is still reading, measured 88 to 128
  distinct under load), two epochs' worth cover every record. That the
  workers split the files is pinned by the end-to-end test below, which
  sees what each one decodes."""
  files = Files(tfrecord_task.write_shards(str(tmp_path), 8, 16), _ids)
  ids = _taken(files, dispatcher, str(tmp_path), steps=32)
  assert len(set(ids[:128])) > 64, sorted(ids[:128])
  counts = collections.Counter(ids)
  assert set(counts) == set(range(128)) and max(counts.values()) <= 3


def test_a_task_pipeline_through_the_service_is_split_by_element(
    tmp_path, dispatcher):
  """4 files of 16 records, read 2 at a time by each service worker: an
  epoch's worth holds more than half the 64 records (two workers each
  reading every file in the same seeded order give 32, each twice, when
  they take turns; a worker done with its 2 files starts the next epoch
  while the slower one is still reading: measured 47 to 64 distinct under
  load), two epochs' worth cover every record."""
  pattern = tfrecord_task.write_shards(str(tmp_path), 4, 16)
  pipeline = tf.data.Dataset.list_files(pattern, shuffle=False).interleave(
      tf.data.TFRecordDataset, cycle_length=2).map(_ids)
  ids = _taken(pipeline, dispatcher, str(tmp_path), steps=16)
  assert len(set(ids[:64])) > 32, sorted(ids[:64])
  assert set(ids) == set(range(64))


def test_jobs_are_shared_by_run_and_start_step():
  assert service.job_name("/w", 0) == service.job_name("/w", 0)
  assert len({service.job_name("/w", 0), service.job_name("/w", 10),
              service.job_name("/v", 0)}) == 3


def _py_pipeline():
  return tf.data.Dataset.range(8).map(lambda i: (
      tf.py_function(lambda v: v * 2, [i], tf.int64), i))


def _zipped():
  return tf.data.Dataset.zip(tf.data.Dataset.range(8),
                             tf.data.Dataset.range(8))


@pytest.mark.parametrize("train, message", [
    (lambda: _py_pipeline(), "calls Python (EagerPyFunc"),
    (lambda: _zipped(), "reads 2 source datasets (RangeDataset, RangeDataset"),
    (lambda: (np.zeros((8, 2), "float32"), np.zeros(8, "int64")),
     "the training data are arrays in memory"),
])
def test_a_pipeline_the_service_cannot_run_is_one_data_error(
    dispatcher, train, message):
  with pytest.raises(DataError, match=re.escape(message)) as info:
    service.check(examples(train(), "train_data"), dispatcher, window=4)
  assert "\n" not in str(info.value)


@pytest.mark.parametrize("address, message", [
    ("localhost", "is not a dispatcher address; give host:port"),
    ("http://localhost:80", "is not a dispatcher address"),
    ("localhost:{free}", "no tf.data service dispatcher answers at "
     "localhost:{free} (Connection refused)"),
])
def test_a_bad_dispatcher_address_is_one_config_error(address, message):
  (free,) = free_ports(1)
  with pytest.raises(ConfigError, match=re.escape(message.format(free=free))):
    service.dispatcher_target(address.format(free=free))


def test_the_service_with_deterministic_training_is_refused():
  config = config_lib.default_config()
  config.data.service = "localhost:5050"
  config.train.deterministic = True
  with pytest.raises(ConfigError, match="train.deterministic=True cannot"):
    config_lib.validate(config)


def test_a_second_server_on_a_taken_port_is_refused():
  with socket.socket() as taken:
    taken.bind(("", 0))
    taken.listen()
    port = taken.getsockname()[1]
    result = run_module("launch.data_service", "--role=dispatcher",
                        f"--port={port}")
  assert result.returncode == 2
  assert result.stderr.strip().splitlines()[-1] == (
      f"error: dispatcher: port {port} is in use (Address already in use); "
      "pick another --port")


@pytest.mark.slow
def test_two_workers_train_through_two_local_service_workers(tmp_path):
  """launch.local starts a dispatcher and 2 data workers; 2 training workers
  take 8 global batches of 16 from 512 records in 8 files. The data workers
  decode (both of them); the training workers only the few examples the
  trainer checks the model on before training; the service reads ahead a
  bounded amount (measured: 568 decoded for 128 trained); when the job ends
  the servers are gone."""
  pattern = tfrecord_task.write_shards(str(tmp_path), 8, 64)
  workdir = tmp_path / "run"
  result = run_module(
      "launch.local", "--num_workers=2", "--data_service_workers=2", "--",
      "--config=configs/digits.py", f"--workdir={workdir}",
      "--config.task=tests/helpers/tfrecord_task.py:TFRecordTask",
      f"--config.user.files={pattern}", "--config.user.as_files=True",
      "--config.user.print_decoded=True", f"--config.user.count_dir={tmp_path}",
      "--config.data.global_batch_size=16", "--config.data.shuffle_buffer=32",
      "--config.train.steps=8", "--config.train.steps_per_loop=4",
      "--config.callbacks.progress_bar=False",
      "--config.callbacks.tensorboard=False", timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  decoded = collections.defaultdict(list)
  for line in result.stderr.splitlines():
    found = re.match(r"\[(data worker \d|worker \d)\] decoded (\d+)$", line)
    if found:
      decoded[found[1]].append(int(found[2]))
  on_service = decoded.pop("data worker 0", []) + decoded.pop(
      "data worker 1", [])
  assert all(len(ids) <= 8 for ids in decoded.values()), decoded
  assert 128 <= len(on_service) <= 128 + 1024, len(on_service)
  assert set(on_service) <= set(range(512))
  assert "[data worker 1] decoded" in result.stderr
  assert "[data worker 0] decoded" in result.stderr
  port = int(re.search(r"\[dispatcher\] serving dispatcher at localhost:(\d+)",
                       result.stdout)[1])
  with pytest.raises(ConnectionRefusedError):
    socket.create_connection(("localhost", port), timeout=5).close()
  logs = (workdir / "metrics.jsonl").read_text()
  assert '"step": 8' in logs and "train/loss" in logs
