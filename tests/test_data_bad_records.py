"""Records that do not decode, met while training (trainer/data/bad_records.py):
one error line naming the file (and the record's index in a TFRecord file),
or with data.skip_bad_records=N skipped, counted, named and still exact on
resume."""

import glob
import json
import os
import re

import numpy as np
import pytest
import tensorflow as tf

from conftest import run_module
from tests.helpers import image_files
from tests.helpers.checkpoints import variables
from trainer import data as data_lib
from trainer.errors import ConfigError, DataError
from trainer.task import Examples


def _cut(path: str, keep: int = 100) -> None:
  with open(path, "rb") as f:
    head = f.read(keep)
  with open(path, "wb") as f:
    f.write(head)


def _folder_with_a_bad_image(tmp_path, split="train") -> tuple[str, str]:
  """6 PNGs per class (cat, dog) per split; dog/0003.png of `split` cut to
  100 bytes (not the first image, which is checked before the run)."""
  root = image_files.write_image_folder(str(tmp_path / "images"),
                                        per_class=6)
  bad = os.path.join(root, split, "dog", "0003.png")
  _cut(bad)
  return root, bad


def _metrics(workdir) -> list[dict]:
  return [json.loads(line) for line in
          (workdir / "metrics.jsonl").read_text().splitlines()]


def test_a_corrupt_image_met_mid_run_is_one_data_error_naming_it(tmp_path):
  """One DataError line saying what and where, with the file (it said the
  steps and the decoder's complaint, not which of the images), not a
  traceback (exit 2 from the launcher, which a restart never repeats)."""
  root, bad = _folder_with_a_bad_image(tmp_path)
  with pytest.raises(DataError) as raised:
    image_files.on_disk_run(tmp_path / "run", name="image_folder",
                            data_dir=root)
  message = str(raised.value)
  assert message.startswith("a bad record in the input at training steps ")
  assert f": {bad}: " in message, message
  assert "(record" not in message  # an image file is one record
  assert "PNG" in message or "png" in message or "empty" in message, message
  assert "\n" not in message and "fix or remove it" in message
  assert "data.skip_bad_records=N" in message
  assert "[Op:" not in message


def test_a_corrupt_eval_image_is_named_too(tmp_path):
  """Met by the first evaluation (after step 4): the same line, naming the
  evaluation and the file."""
  root, bad = _folder_with_a_bad_image(tmp_path, split="test")
  with pytest.raises(DataError) as raised:
    image_files.on_disk_run(tmp_path / "run", name="image_folder",
                            data_dir=root, eval_every=4)
  message = str(raised.value)
  assert message.startswith("a bad record in the input at the evaluation "
                            f"after step 4: {bad}: "), message


def test_a_corrupt_record_in_a_tfrecord_file_is_named_with_its_index(
    tmp_path):
  """Record 5 of train-001 holds bytes that are not a PNG: the line names
  the file and the index (counted from 0), not only the decoder's words."""
  pattern = image_files.write_image_records(str(tmp_path / "rec"),
                                            num_files=2, per_file=8)
  path = sorted(glob.glob(pattern))[1]
  examples = [tf.train.Example.FromString(r.numpy())
              for r in tf.data.TFRecordDataset(path)]
  examples[5].features.feature["image/encoded"].bytes_list.value[:] = [
      b"\x89PNG not really"]
  with tf.io.TFRecordWriter(path) as writer:
    for example in examples:
      writer.write(example.SerializeToString())
  with pytest.raises(DataError) as raised:
    image_files.on_disk_run(tmp_path / "run", name="tfrecord", num_classes=2,
                            train_files=pattern, eval_files=pattern)
  assert f": {path} (record 5): " in str(raised.value), str(raised.value)


def test_a_corrupt_tfrecord_file_is_named(tmp_path):
  """Bytes overwritten in the middle of a TFRecord file fail its checksum in
  the reader, before any decode: the line names the file and the index of
  the first record it cannot read. (A file cut short reads as ending early:
  TensorFlow's reader reports nothing.)"""
  pattern = image_files.write_image_records(str(tmp_path / "rec"),
                                            num_files=2, per_file=8)
  path = sorted(glob.glob(pattern))[1]
  with open(path, "r+b") as f:
    f.seek(os.path.getsize(path) // 2)
    f.write(b"\0" * 64)
  with pytest.raises(DataError) as raised:
    image_files.on_disk_run(tmp_path / "run", name="tfrecord", num_classes=2,
                            train_files=pattern, eval_files=pattern)
  message = str(raised.value)
  assert f": {path} (record " in message, message
  assert "\n" not in message


def test_a_label_outside_num_classes_is_one_data_error(tmp_path):
  """TFRecord labels 0-2 with data.num_classes=2: the label check names the
  label, the key and the file with the record (it was a traceback from the
  loss: 'Received a label value of 2 which is outside the valid range')."""
  pattern = image_files.write_image_records(str(tmp_path / "rec"),
                                            num_files=2, per_file=8)
  folder = os.path.dirname(pattern)
  for path in glob.glob(pattern):  # relabel: (f + i) % 3
    examples = [tf.train.Example.FromString(r.numpy())
                for r in tf.data.TFRecordDataset(path)]
    with tf.io.TFRecordWriter(path) as writer:
      for i, example in enumerate(examples):
        example.features.feature["image/class/label"].int64_list.value[:] = [
            i % 3 if i else 0]
        writer.write(example.SerializeToString())
  with pytest.raises(DataError) as raised:
    image_files.on_disk_run(tmp_path / "run", name="tfrecord", num_classes=2,
                            train_files=pattern, eval_files=pattern)
  message = str(raised.value)
  assert "label outside [0, 2) (data.num_classes) in data.train_files" in (
      message) and folder in message, message
  assert "(record 2)" in message, message  # the first label 2: i=2


def test_skipped_records_are_counted_once_named_and_logged(tmp_path, capfd,
                                                          caplog):
  """data.skip_bad_records=1: the run finishes; the image met again in each
  of its 4 epochs counts once (train/bad_records 1 in metrics.jsonl), is
  named once on stderr, and a bad eval image is dropped from each pass
  (eval/bad_records 1, 11 of 12 examples evaluated)."""
  root, bad = _folder_with_a_bad_image(tmp_path)
  _cut(os.path.join(root, "test", "cat", "0002.png"))
  result = image_files.on_disk_run(tmp_path / "run", name="image_folder",
                                   data_dir=root, skip_bad_records=1)
  assert result.steps == 12
  rows = _metrics(tmp_path / "run")
  train = [r for r in rows if "train/bad_records" in r]
  assert [r["train/bad_records"] for r in train] == [1, 1, 1]
  evals = [r for r in rows if "eval/bad_records" in r]
  assert evals and all(r["eval/bad_records"] == 1 and
                       r["eval/num_examples"] == 11 for r in evals), evals
  err = capfd.readouterr().err
  named = [l for l in err.splitlines() if "skipping a bad record" in l]
  assert len(named) == 2 and any(l.endswith(bad) for l in named), named
  assert "1 bad records skipped in the training data so far" in caplog.text
  assert "1 bad records skipped in one pass over the eval data" in (
      caplog.text)


def test_more_bad_records_than_allowed_end_the_run(tmp_path):
  """Two bad training images with data.skip_bad_records=1: one DataError
  line with the count and the limit."""
  root, _ = _folder_with_a_bad_image(tmp_path)
  _cut(os.path.join(root, "train", "cat", "0004.png"))
  with pytest.raises(DataError, match=r"^2 bad records in the training data "
                     r"so far, "
                     r"more than data.skip_bad_records=1"):
    image_files.on_disk_run(tmp_path / "run", name="image_folder",
                            data_dir=root, skip_bad_records=1)


@pytest.mark.slow  # in-process, three runs (~10 s): CI runs it
def test_skipping_keeps_resume_exact(tmp_path):
  """With a bad image skipped, 8 steps then a resume to 12 end with the
  weights of 12 straight steps, tensor for tensor (a skipped record keeps
  its place, so the stream is still a function of the step)."""
  root, _ = _folder_with_a_bad_image(tmp_path)
  common = dict(name="image_folder", data_dir=root, skip_bad_records=2,
                deterministic=True)
  image_files.on_disk_run(tmp_path / "straight", steps=12, **common)
  image_files.on_disk_run(tmp_path / "resumed", steps=8, **common)
  image_files.on_disk_run(tmp_path / "resumed", steps=12, **common)
  want = variables(tmp_path / "straight" / "checkpoints")
  got = variables(tmp_path / "resumed" / "checkpoints")
  assert sorted(got) == sorted(want)
  for key, value in want.items():
    np.testing.assert_array_equal(got[key], value, err_msg=key)


def test_skipping_needs_records_the_trainer_decodes():
  """A task's own tf.data pipeline decodes on its own, and the tf.data
  service decodes elsewhere: one ConfigError line each."""
  own = Examples(dataset=tf.data.Dataset.range(3), arrays=None, size=None)
  with pytest.raises(ConfigError, match=r"needs train_data\(\) as "
                     r"trainer.data.Files .*\.ignore_errors\(\)"):
    data_lib.check_skipping(own, None, 2, service="")
  with pytest.raises(ConfigError, match="does not work with data.service"):
    data_lib.check_skipping(own, None, 2, service="localhost:5050")
  data_lib.check_skipping(own, None, 0, service="")  # off: anything goes


@pytest.mark.slow
def test_a_bad_record_in_a_two_worker_job_is_one_line_and_never_restarted(
    tmp_path):
  """launch.local --max_restarts=1: the worker that reads the bad image
  names it, the job exits 2 without a restart, and the other worker, being
  stopped, shows no TensorFlow lines about its lost peer (it printed a
  dozen E-lines of collective aborts)."""
  root, bad = _folder_with_a_bad_image(tmp_path)
  result = run_module(
      "launch.local", "--num_workers=2", "--max_restarts=1", "--",
      "--config=configs/digits.py", f"--workdir={tmp_path / 'run'}",
      "--config.data.name=image_folder", f"--config.data.data_dir={root}",
      "--config.data.image_size=6", "--config.data.global_batch_size=4",
      "--config.data.eval_batch_size=4", "--config.train.steps=12",
      "--config.train.steps_per_loop=4",
      "--config.callbacks.progress_bar=False", timeout=240)
  err = result.stderr
  assert result.returncode == 2, err[-3000:]
  assert re.search(rf"\[worker \d\] error: a bad record in the input at "
                   rf"training steps 1-4: {re.escape(bad)}: ", err), err[-3000:]
  assert "restart 1" not in err
  after = err.split("stopping the other workers", 1)[1].splitlines()
  assert not [l for l in after if re.match(r"\[worker \d\] [IWEF]\d{4} ", l)
             ], after
