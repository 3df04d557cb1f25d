"""Examples in files (trainer/data/files.py) and the on-disk sources
(image_folder, tfrecord, TFDS in data_dir): each pipeline decodes its own
files, and a resume at any step decodes only what it trains on."""

import glob
import json
import os

import numpy as np
import pytest
import tensorflow as tf

from tests.helpers.checkpoints import variables as _variables
from conftest import run_modules
from tests.helpers import image_files, tfrecord_task
from trainer import data as data_lib
from trainer.config import default_config
from trainer.data import files as files_lib
from trainer.errors import DataError

_decoded = [0]


def _count(y):
  _decoded[0] += 1
  return y


def _counted_parse(record):
  parsed = tf.io.parse_single_example(record, {
      "x": tf.io.FixedLenFeature([16], tf.float32),
      "y": tf.io.FixedLenFeature([], tf.int64)})
  y = tf.py_function(_count, [parsed["y"]], tf.int64)
  y.set_shape([])
  return parsed["x"], y


def _batches(files, start, steps, *, pipelines=1, index=0, replicas=1,
             batch=8, window=10):
  """The first feature of each example, per-replica batches of pipeline
  `index`, from step `start` on."""
  fn = files_lib.train_fn(files, global_batch_size=batch, seed=3,
                          window=window, start_step=start)
  ctx = tf.distribute.InputContext(num_input_pipelines=pipelines,
                                   input_pipeline_id=index,
                                   num_replicas_in_sync=replicas * pipelines)
  return [x.numpy()[:, 0].tolist() for x, _ in fn(ctx).take(steps * replicas)]


@pytest.fixture(name="records")
def _records(tmp_path):
  """8 files of 16 records (one epoch: 16 steps of 8)."""
  return files_lib.Files(tfrecord_task.write_shards(str(tmp_path), 8, 16),
                         _counted_parse)


def test_a_resume_early_or_late_continues_the_stream_and_decodes_only_it(
    records):
  straight = _batches(records, 0, 60)
  costs = {}
  for start in (3, 50):  # epoch 0, and epoch 3 after 2 whole epochs
    _decoded[0] = 0
    assert _batches(records, start, 4) == straight[start:start + 4]
    costs[start] = _decoded[0]
  # 4 steps = 32 examples, plus what the parallel map and the prefetch of
  # batches ran ahead (by timing, up to a few batches); at step 50 as at
  # step 3 (a replay decodes 400 more at step 50).
  assert all(32 <= cost < 72 for cost in costs.values()), costs


def test_an_epoch_holds_every_record_once_reshuffled_each_epoch(records):
  every = sorted(x.numpy()[0] for x, _ in files_lib.ordered(records))
  stream = [v for b in _batches(records, 0, 32) for v in b]
  assert sorted(stream[:128]) == sorted(stream[128:]) == every
  assert stream[:128] != stream[128:]


def test_two_pipelines_read_their_own_files_and_cover_the_epoch(records):
  shares = [_batches(records, 0, 16, pipelines=2, index=i) for i in range(2)]
  seen = [v for share in shares for b in share for v in b]
  assert sorted(seen) == sorted(x.numpy()[0]
                                for x, _ in files_lib.ordered(records))
  assert _batches(records, 5, 3, pipelines=2, index=1) == shares[1][5:8]


def test_two_replicas_take_the_global_batches_of_one(records):
  one = _batches(records, 0, 6)
  two = _batches(records, 0, 6, replicas=2)
  assert [a + b for a, b in zip(two[::2], two[1::2])] == one


def test_fewer_files_than_pipelines_split_records_before_decoding(tmp_path):
  files = files_lib.Files(tfrecord_task.write_shards(str(tmp_path), 1, 32),
                          _counted_parse)
  _decoded[0] = 0
  shares = [_batches(files, 0, 4, pipelines=2, index=i) for i in range(2)]
  assert sorted(v for s in shares for b in s for v in b) == sorted(
      x.numpy()[0] for x, _ in files_lib.ordered(files))
  assert _batches(files, 1, 3, pipelines=2, index=1) == shares[1][1:]


def _config(**data):
  config = default_config()
  config.data.update(data)
  return config.data


def test_image_folder_labels_by_folder_and_resizes(tmp_path):
  root = image_files.write_image_folder(str(tmp_path), per_class=3)
  source = data_lib.load_source(_config(name="image_folder", data_dir=root,
                                        image_size=6), seed=0)
  assert source.info.input_shape == (6, 6, 3)
  assert source.info.num_classes == 2 and source.info.num_train == 6
  examples = list(files_lib.ordered(source.eval).as_numpy_iterator())
  assert [int(y) for _, y in examples] == [0, 0, 0, 1, 1, 1]
  assert examples[0][0].shape == (6, 6, 3) and examples[0][0].max() <= 1.0


def test_tfrecord_source_decodes_the_keys_it_is_told(tmp_path):
  pattern = image_files.write_image_records(str(tmp_path), num_files=2,
                                            per_file=4)
  source = data_lib.load_source(_config(
      name="tfrecord", train_files=pattern, eval_files=pattern,
      image_size=5, num_classes=2), seed=0)
  assert source.info.input_shape == (5, 5, 3)
  labels = [int(y) for _, y in files_lib.ordered(source.train)
            .as_numpy_iterator()]
  assert labels == [0, 1, 1, 0, 0, 1, 1, 0]  # the 2 files interleaved


def test_tfds_on_disk_is_read_as_files_with_its_counts(tmp_path):
  name = image_files.write_tfds(str(tmp_path), num_train=40, num_test=10)
  source = data_lib.load_source(_config(name=name, data_dir=str(tmp_path)),
                                seed=0)
  assert isinstance(source.train, files_lib.Files)
  assert sum(source.train.record_counts) == 40
  fn = files_lib.train_fn(source.train, global_batch_size=8, seed=0,
                          window=16, start_step=7)  # epoch 1: seeks by count
  images, labels = next(iter(fn(tf.distribute.InputContext())))
  assert images.shape == (8, 8, 8, 3) and labels.dtype == tf.int32


@pytest.mark.parametrize("data, message", [
    (dict(name="image_folder", image_size=4), "set it to the folder"),
    (dict(name="image_folder", data_dir="/nonexistent", image_size=4),
     "no folder '/nonexistent/train' .data.train_split='train'."),
    (dict(name="image_folder", data_dir="ROOT"), "set --config.data.image_size"),
    (dict(name="tfrecord", image_size=4), "set both"),
    (dict(name="tfrecord", train_files="/nonexistent/*.tfrecord",
          eval_files="/nonexistent/*.tfrecord", image_size=4),
     "no file matches '/nonexistent/*.tfrecord'"),
    (dict(name="tfrecord", train_files="RECORDS", eval_files="RECORDS",
          image_key="jpeg", image_size=4), "Feature: jpeg"),
    (dict(name="image_folder", data_dir="BROKEN", image_size=4),
     "does not decode"),
])
def test_bad_on_disk_input_is_one_data_error(tmp_path, data, message):
  root = image_files.write_image_folder(str(tmp_path / "root"), per_class=1)
  broken = image_files.write_image_folder(str(tmp_path / "broken"),
                                          per_class=1)
  for path in glob.glob(f"{broken}/train/cat/*.png"):
    with open(path, "wb") as f:
      f.write(b"not an image")
  records = image_files.write_image_records(str(tmp_path / "rec"),
                                            num_files=1, per_file=2)
  swap = {"ROOT": root, "BROKEN": broken, "RECORDS": records}
  data = {k: swap.get(v, v) for k, v in data.items()}
  with pytest.raises(DataError, match=message.replace("*", r"\*")) as info:
    data_lib.load_source(_config(**data), seed=0)
  assert "\n" not in str(info.value)


def _run_args(workdir, *extra):
  return ["--config=configs/digits.py", f"--workdir={workdir}",
          "--config.train.deterministic=True", "--config.train.steps=60",
          "--config.train.steps_per_loop=10",
          "--config.train.checkpoint_every=20",
          "--config.data.global_batch_size=8",
          "--config.data.shuffle_buffer=16", "--config.data.image_size=8",
          "--config.model.name=cnn", "--config.model.width=4",
          "--config.callbacks.progress_bar=False",
          "--config.callbacks.tensorboard=False",
          "--config.callbacks.custom=recorder:KillAt", *extra]


@pytest.mark.slow
def test_sigkill_then_resume_on_disk_sources_is_bit_identical(tmp_path):
  """image_folder and tfrecord, killed at step 47 (saved at 40), resumed;
  the final checkpoint equals the uninterrupted run's tensor for tensor."""
  root = image_files.write_image_folder(str(tmp_path / "folder"),
                                        per_class=20)
  records = image_files.write_image_records(str(tmp_path / "rec"),
                                            num_files=4, per_file=10)
  sources = {
      "folder": [f"--config.data.name=image_folder",
                 f"--config.data.data_dir={root}"],
      "tfrecord": ["--config.data.name=tfrecord", "--config.data.num_classes=2",
                   f"--config.data.train_files={records}",
                   f"--config.data.eval_files={records}"]}
  helpers = {"PYTHONPATH": os.path.join(os.path.dirname(__file__),
                                        "helpers")}
  jobs = {}
  for name, flags in sources.items():
    for kind in ("straight", "killed"):
      env = dict(helpers, **({"KILL_AT_STEP": "47"} if kind == "killed"
                             else {}))
      jobs[(name, kind)] = (("launch.train", *_run_args(
          tmp_path / f"{name}_{kind}", *flags)), {"env": env})
  first = run_modules(jobs, processes=4)
  for (name, kind), result in first.items():
    assert result.returncode == (-9 if kind == "killed" else 0), (
        name, kind, result.stderr[-3000:])
  again = run_modules({name: (("launch.train", *_run_args(
      tmp_path / f"{name}_killed", *flags)), {"env": helpers})
                       for name, flags in sources.items()}, processes=2)
  for name, result in again.items():
    assert result.returncode == 0, (name, result.stderr[-3000:])
    assert "(step 40)" in result.stderr, result.stderr[-2000:]
    want = _variables(tmp_path / f"{name}_straight" / "checkpoints")
    got = _variables(tmp_path / f"{name}_killed" / "checkpoints")
    assert sorted(got) == sorted(want)
    for key, value in want.items():
      np.testing.assert_array_equal(got[key], value, err_msg=f"{name} {key}")


def test_image_folder_classes_come_from_its_folders(tmp_path, caplog):
  """3 class folders with data.num_classes=2 (it trained a 2-class model
  that could not be right, and config.json said 2): 3 classes, logged, in
  config.json with their names in label order."""
  root = image_files.write_image_folder(str(tmp_path / "images"),
                                        per_class=4,
                                        classes=("ant", "bee", "cat"))
  with caplog.at_level("WARNING"):
    image_files.on_disk_run(tmp_path / "run", name="image_folder",
                            data_dir=root, num_classes=2)
  assert "data.num_classes=3 from the 3 class folders" in caplog.text
  saved = json.loads((tmp_path / "run" / "config.json").read_text())
  assert saved["data"]["num_classes"] == 3
  # what output i means, for the export's report and the user
  assert saved["data"]["class_names"] == ["ant", "bee", "cat"]
