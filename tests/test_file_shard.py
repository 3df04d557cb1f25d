"""On-disk training data: each worker decodes its own files (trainer/file_shard.py).

Counted with a record-counting map in a task reading TFRecord shards: before
the change each of 2 workers decoded everything (2.08x one process)."""

import glob
import os

import pytest
import tensorflow as tf

from tests.conftest import run_modules
from tests.helpers import tfrecord_task
from trainer import file_shard

STEPS, BATCH, BUFFER = 32, 32, 32


def _records(ds):
  return sorted(float(x[0]) for x, _ in ds.as_numpy_iterator())


def test_shares_by_file_cover_every_record_once(tmp_path):
  pattern = tfrecord_task.write_shards(str(tmp_path), 4, 8)
  task = tfrecord_task.TFRecordTask.__new__(tfrecord_task.TFRecordTask)
  task.files = pattern
  whole = task.train_data()
  shares = [file_shard.shard_by_file(whole, 2, i) for i in range(2)]
  assert file_shard.every_share_has_files(whole, 2)
  assert sorted(_records(shares[0]) + _records(shares[1])) == _records(whole)
  assert len(_records(shares[0])) == len(_records(shares[1])) == 16


def test_fewer_files_than_pipelines_falls_back_to_records(tmp_path):
  """The FILE rewrite would give pipeline 1 nothing, silently."""
  pattern = tfrecord_task.write_shards(str(tmp_path), 1, 8)
  task = tfrecord_task.TFRecordTask.__new__(tfrecord_task.TFRecordTask)
  task.files = pattern
  whole = task.train_data()
  assert not file_shard.every_share_has_files(whole, 2)
  shares = [_records(file_shard.shard_by_file(whole, 2, i)) for i in range(2)]
  assert len(shares[0]) == len(shares[1]) == 4
  assert sorted(shares[0] + shares[1]) == _records(whole)


def test_no_files_falls_back_to_records():
  ds = tf.data.Dataset.range(6).map(lambda i: (i, i))
  assert not file_shard.every_share_has_files(ds, 2)
  got = [list(file_shard.shard_by_file(ds, 2, i).as_numpy_iterator())
         for i in range(2)]
  assert [int(x) for x, _ in got[1]] == [1, 3, 5]


def _args(workdir, files, count_dir):
  return ["--config=configs/digits.py", f"--workdir={workdir}",
          "--config.task=tests/helpers/tfrecord_task.py:TFRecordTask",
          f"--config.user.files={files}", f"--config.user.count_dir={count_dir}",
          f"--config.train.steps={STEPS}", "--config.train.steps_per_loop=8",
          f"--config.data.global_batch_size={BATCH}",
          f"--config.data.shuffle_buffer={BUFFER}",
          "--config.callbacks.progress_bar=False"]


def _decoded(count_dir):
  return [int(open(p).read()) for p in glob.glob(f"{count_dir}/decoded-*")]


@pytest.mark.slow
def test_two_workers_decode_about_what_one_process_does(tmp_path):
  jobs, dirs = {}, {}
  for name, num_files, workers in (("one", 8, 1), ("two", 8, 2),
                                   ("two_one_file", 1, 2)):
    data = tmp_path / f"data_{name}"
    counts = tmp_path / f"counts_{name}"
    data.mkdir(), counts.mkdir()
    files = tfrecord_task.write_shards(str(data), num_files, 4096 // num_files)
    dirs[name] = counts
    args = _args(tmp_path / f"run_{name}", files, counts)
    jobs[name] = ((["launch.train", *args] if workers == 1 else
                   ["launch.local", f"--num_workers={workers}", "--", *args]),
                  {"timeout": 300})
  results = run_modules(jobs)
  for name, result in results.items():
    assert result.returncode == 0, (name, result.stderr[-3000:])
  one, two = _decoded(dirs["one"]), _decoded(dirs["two"])
  assert len(one) == 1 and len(two) == 2
  trained = STEPS * BATCH
  assert trained <= one[0] < trained + 4 * BUFFER + 8 * BATCH
  # Each worker trains on half and decodes about half (plus its buffers);
  # before: each decoded as much as one process (2x in all).
  assert sum(two) <= 1.3 * one[0], (two, one)
  for count in two:
    assert count < 0.7 * one[0], (two, one)
  # One file for 2 workers: each keeps every 2nd record (all decoded).
  assert "cannot be split by file" in results["two_one_file"].stderr
  assert len(_decoded(dirs["two_one_file"])) == 2
