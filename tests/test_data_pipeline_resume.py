"""A task's own tf.data pipeline (trainer/data/pipeline.py): epochs shuffled
by (seed, epoch), and a resume that reads at most the epoch it starts in,
whatever the step; counted with a map that counts what it decodes."""

import os

import numpy as np
import pytest
import tensorflow as tf

from conftest import ROOT, run_modules
from tests.helpers import tfrecord_task
from tests.helpers.checkpoints import variables
from trainer.data import pipeline
from trainer.errors import DataError

_decoded = [0]
HELPERS = {"PYTHONPATH": os.path.join(ROOT, "tests", "helpers")}


def _count(x):
  _decoded[0] += 1
  return x


def _parse(record):
  parsed = tf.io.parse_single_example(record, {
      "x": tf.io.FixedLenFeature([16], tf.float32),
      "id": tf.io.FixedLenFeature([], tf.int64)})
  ids = tf.py_function(_count, [parsed["id"]], tf.int64)  # stateful, counted
  ids.set_shape([])
  return parsed["x"], ids


@pytest.fixture(name="pattern", scope="module")
def _pattern(tmp_path_factory):
  """8 TFRecord files of 16 records (ids 0-127)."""
  return tfrecord_task.write_shards(str(tmp_path_factory.mktemp("shards")),
                                    8, 16)


def _pipeline(pattern, kind="tfrecord"):
  """A user's pipeline: files -> TFRecordDataset -> parse (its cardinality
  unknown to tf.data), or `filtered` (not one example per record)."""
  files = tf.data.Dataset.list_files(pattern, shuffle=False)
  ds = files.interleave(tf.data.TFRecordDataset, cycle_length=2)
  ds = ds.map(_parse, num_parallel_calls=2)
  if kind == "filtered":
    ds = ds.filter(lambda x, i: i % 8 != 7)  # 112 of the 128
  return ds


def _ids(pattern, start, steps, *, kind="tfrecord", pipelines=1, index=0,
         replicas=1, batch=8, buffer=32):
  """The ids in each per-replica batch of pipeline `index` from step
  `start` on, and the records its map decoded to make them."""
  fn = pipeline.input_fn(_pipeline(pattern, kind), global_batch_size=batch,
                         training=True, seed=5, shuffle_buffer=buffer,
                         start_step=start)
  ctx = tf.distribute.InputContext(num_input_pipelines=pipelines,
                                   input_pipeline_id=index,
                                   num_replicas_in_sync=replicas * pipelines)
  _decoded[0] = 0
  ds = fn(ctx).take(steps * replicas)
  ids = [i.numpy().tolist() for _, i in ds]
  return ids, _decoded[0]


def test_every_epoch_holds_every_example_once_reshuffled(pattern):
  ids, _ = _ids(pattern, 0, 48)  # 3 epochs of 16 steps
  flat = [i for b in ids for i in b]
  epochs = [flat[e * 128:(e + 1) * 128] for e in range(3)]
  assert all(sorted(e) == list(range(128)) for e in epochs)
  assert epochs[0] != epochs[1] != epochs[2]


@pytest.mark.parametrize("kind", ["tfrecord", "filtered"])
def test_a_resume_early_or_late_decodes_at_most_one_epoch(pattern, kind):
  """The same batches as the run that never stopped, at step 5 (epoch 0)
  and at step 45 (epoch 2 for 128 records, 3 for 112): decoding the
  examples before the step in its epoch only (a replay decoded all 360
  examples before step 45)."""
  per_epoch = 128 if kind == "tfrecord" else 112
  straight, _ = _ids(pattern, 0, 50, kind=kind)
  costs = {}
  for start in (5, 45):
    got, costs[start] = _ids(pattern, start, 4, kind=kind)
    assert got == straight[start:start + 4], (kind, start)
  # Decoded: the examples of the epoch before the step, the 32 trained, and
  # what the parallel map and the prefetch ran ahead (a few batches). The
  # filtered pipeline's size is counted by running it (up to the position),
  # the tfrecord one's from its raw records, without decoding.
  for start, cost in costs.items():
    dropped = start * 8 % per_epoch
    counted = 0 if kind == "tfrecord" else min(per_epoch, start * 8 + 1)
    low = counted + dropped + 32
    assert low <= cost < low + 40 + 2 * 32, (kind, costs)
    assert cost < 2 * per_epoch + 72 < 360


def test_two_pipelines_resume_their_own_share_across_an_epoch_end(pattern):
  """2 workers, 4 files each (64 records: 8 steps of 8 of a global batch
  of 16 per epoch): a resume at step 7 ends epoch 0 and crosses into epoch
  1, at step 20 starts in epoch 2; each continues its own stream exactly,
  decoding at most the 64 of one epoch besides the 24 it trains on."""
  two = dict(pipelines=2, batch=16)
  for index in (0, 1):
    straight, _ = _ids(pattern, 0, 24, index=index, **two)
    for start in (7, 20):
      got, cost = _ids(pattern, start, 3, index=index, **two)
      assert got == straight[start:start + 3], (index, start)
      assert cost < 64 + 24 + 72, (index, start, cost)
  shares = [{i for b in _ids(pattern, 0, 8, index=x, **two)[0] for i in b}
            for x in (0, 1)]
  assert shares[0].isdisjoint(shares[1])
  assert shares[0] | shares[1] == set(range(128))


def test_two_replicas_take_the_global_batches_of_one_device(pattern):
  one, _ = _ids(pattern, 9, 4)
  two, _ = _ids(pattern, 9, 4, replicas=2, batch=8)
  assert [a + b for a, b in zip(two[::2], two[1::2])] == one


def test_a_pipeline_that_never_ends_resumes_by_reading_up_to_the_step(
    pattern):
  """train_data() that repeats itself has no epochs: the resume reads what
  came before the step (as before), and says so."""
  fn = pipeline.input_fn(_pipeline(pattern).repeat(), global_batch_size=8,
                         training=True, seed=5, shuffle_buffer=32,
                         start_step=20)
  ctx = tf.distribute.InputContext()
  assert len([b for b in fn(ctx).take(2)]) == 2


def test_an_empty_share_is_one_error(tmp_path):
  pattern = tfrecord_task.write_shards(str(tmp_path), 1, 0)
  fn = pipeline.input_fn(_pipeline(pattern), global_batch_size=8,
                         training=True, seed=5, start_step=3)
  with pytest.raises(DataError, match="has no training example"):
    fn(tf.distribute.InputContext())


def test_the_raw_count_looks_through_maps_only(pattern):
  ds = _pipeline(pattern)
  raw = pipeline._raw(ds.prefetch(2))  # pylint: disable=protected-access
  assert type(raw).__name__ != "_ParallelMapDataset"
  assert pipeline.share_size(ds, 1, 0, at_least=1000)[0] == 128
  assert pipeline.share_size(ds, 2, 1, at_least=1000)[0] == 64
  assert pipeline.share_size(ds, 1, 0, at_least=10)[0] == 11  # stops early
  filtered = _pipeline(pattern, "filtered")
  assert pipeline.share_size(filtered, 1, 0, at_least=1000) == (
      112, "counted by running the pipeline")
  assert np.all(np.array([pipeline.epoch_seed(5, e).numpy()
                          for e in range(3)]) >= 0)


@pytest.mark.slow
def test_a_restarted_two_worker_job_decodes_one_epoch_at_most_and_ends_exact(
    tmp_path):
  """A task's own TFRecord pipeline with a tf.py_function in its map, 2
  workers, deterministic: worker 1 is killed (-9) at step 80, the launcher
  restarts the job from the checkpoint at step 70 (epoch 4 of each
  worker's 256 records, 96 into it). Each restarted worker decodes the 96
  it drops, the 480 it trains on and its read-ahead, not the 1,120 of the
  steps before (a replay); the final checkpoint equals the job that never
  stopped, tensor for tensor."""
  files = tfrecord_task.write_shards(str(tmp_path), 8, 64)  # 512 records
  jobs = {}
  for kind in ("straight", "killed"):
    counts = tmp_path / f"counts_{kind}"
    counts.mkdir()
    env = dict(HELPERS, **({"KILL_AT_STEP": "80", "KILL_WORKER": "1",
                            "KILL_ONCE_FILE": str(tmp_path / "killed_once")}
                           if kind == "killed" else {}))
    jobs[kind] = (("launch.local", "--num_workers=2", "--max_restarts=1",
                   "--grace_seconds=5", "--",
                   "--config=configs/digits.py",
                   f"--workdir={tmp_path / kind}",
                   "--config.task=tests/helpers/tfrecord_task.py:TFRecordTask",
                   f"--config.user.files={files}",
                   f"--config.user.count_dir={counts}",
                   "--config.train.deterministic=True",
                   "--config.train.steps=100", "--config.train.steps_per_loop=10",
                   "--config.train.checkpoint_every=35",
                   "--config.data.global_batch_size=32",
                   "--config.data.shuffle_buffer=64",
                   "--config.callbacks.progress_bar=False",
                   "--config.callbacks.tensorboard=False",
                   "--config.callbacks.custom=recorder:KillAt"),
                  {"env": env, "timeout": 300})
  runs = run_modules(jobs, processes=2)
  for kind, result in runs.items():
    assert result.returncode == 0, (kind, result.stderr[-3000:])
  log = runs["killed"].stdout + runs["killed"].stderr
  assert "restart 1: worker 1 was killed by SIGKILL; resuming from step 70" \
      in log, log[-3000:]
  assert "starts epoch 4 of its 256 examples" in log, log[-3000:]
  counts = sorted((tmp_path / "counts_killed").iterdir())
  restarted = [int(p.read_text()) for p in counts[-2:]]
  for count in restarted:  # 96 + 480 + the shuffle buffer and prefetch
    assert 96 + 480 <= count < 96 + 480 + 64 + 8 * 16, restarted
  want, got = variables(tmp_path / "straight"), variables(tmp_path / "killed")
  assert sorted(got) == sorted(want) and len(want) > 5
  for name, value in want.items():
    np.testing.assert_array_equal(got[name], value, err_msg=name)
