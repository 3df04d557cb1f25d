"""Datasets and evaluation: splits, per-replica input, exact eval counts."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from trainer import data as data_lib
from trainer.config import default_config
from trainer.errors import ConfigError, DataError
from trainer.fit.trainer import Trainer


def test_digits_split_is_fixed_and_disjoint():
  a, b = data_lib.load_source(default_config().data, seed=0), \
      data_lib.load_source(default_config().data, seed=7)
  assert (a.info.num_train, a.info.num_eval) == (1497, 300)
  assert a.info.input_shape == (8, 8, 1) and a.info.num_classes == 10
  train = np.stack([x for x, _ in a.train.as_numpy_iterator()])
  evals = np.stack([x for x, _ in a.eval.as_numpy_iterator()])
  evals_b = np.stack([x for x, _ in b.eval.as_numpy_iterator()])
  np.testing.assert_array_equal(evals, evals_b)  # split ignores config.seed
  assert 0.0 <= train.min() and train.max() <= 1.0
  flat_train = {row.tobytes() for row in train.reshape(len(train), -1)}
  overlap = sum(row.tobytes() in flat_train
                for row in evals.reshape(len(evals), -1))
  assert overlap <= 3  # sklearn digits has a few duplicate images, no leak


def test_global_batches_are_the_same_for_any_replica_layout(mirrored):
  """Replica i of step k holds the i-th half of the k-th one-device batch."""
  examples = tf.data.Dataset.range(64).map(lambda i: (i, i))
  fn = data_lib.input_fn(examples, global_batch_size=8, training=True, seed=3)
  single = next(iter(tf.distribute.OneDeviceStrategy("/cpu:0")
                     .distribute_datasets_from_function(fn)))[0].numpy()
  per_replica = next(iter(mirrored.distribute_datasets_from_function(fn)))[0]
  halves = [t.numpy() for t in mirrored.experimental_local_results(per_replica)]
  np.testing.assert_array_equal(np.concatenate(halves), single)
  assert sorted(single) != list(range(8))  # it was shuffled


@pytest.mark.parametrize("replicas", [2, 4])  # 1 or 2 per pipeline
@pytest.mark.parametrize("start_step", [0, 4])  # 4: mid-epoch
def test_stream_is_epoch_permutations_cut_into_batches(start_step, replicas):
  """Input pipeline 1 of 2 (2 workers) from `start_step`: per-replica
  batches start_step * R + 1 + 2j of the stream, epoch e in the order
  epoch_permutation(e), spanning epoch boundaries."""
  n, per_replica, seed = 10, 3, 4
  images = np.arange(n, dtype=np.float32)[:, None] * 10
  labels = np.arange(n, dtype=np.int32)
  fn = data_lib.stream_input_fn((images, labels),
                                global_batch_size=per_replica * replicas,
                                seed=seed, start_step=start_step)
  ctx = tf.distribute.InputContext(num_input_pipelines=2,
                                   input_pipeline_id=1,
                                   num_replicas_in_sync=replicas)
  got = [y.tolist() for _, y in fn(ctx).take(6).as_numpy_iterator()]
  stream = np.concatenate([data_lib.epoch_permutation(e, n, seed).numpy()
                           for e in range(12)])
  first = start_step * replicas + 1
  want = [stream[q * per_replica:(q + 1) * per_replica].tolist()
          for q in range(first, first + 12, 2)]
  assert got == want
  x, _ = next(iter(fn(ctx)))
  np.testing.assert_array_equal(x.numpy()[:, 0], np.array(want[0]) * 10)
  assert sorted(stream[:n]) == list(range(n))
  assert stream[:n].tolist() != stream[n:2 * n].tolist()


def test_synthetic_data_has_the_configured_shape():
  cfg = default_config().data
  cfg.name, cfg.synthetic_shape, cfg.num_classes = "synthetic", (4, 5, 3), 7
  cfg.synthetic_examples = 32
  source = data_lib.load_source(cfg, seed=0)
  x, y = next(iter(source.train))
  assert x.shape == (4, 5, 3) and x.dtype == tf.float32
  assert 0 <= int(y) < 7 and source.info.num_classes == 7


def test_batch_that_replicas_cannot_share_is_refused():
  with pytest.raises(ConfigError, match="multiple of 2"):
    data_lib.check_batch_size(63, 2)


def test_tfds_dataset_missing_offline_is_a_clear_error(tmp_path):
  cfg = default_config().data
  cfg.name, cfg.data_dir = "mnist", str(tmp_path)
  with pytest.raises(DataError, match="not in data_dir.*offline"):
    data_lib.load_source(cfg, seed=0)


def test_tfds_source_reads_mock_mnist():
  """TFDS path on tfds.testing.mock_data (no network here to download)."""
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  cfg = default_config().data
  cfg.name = "mnist"
  with tfds.testing.mock_data(num_examples=12):
    source = data_lib.load_source(cfg, seed=0)
    xs = [x for x, _ in source.train]
  assert source.info.input_shape == (28, 28, 1)
  assert len(xs) == 12 and xs[0].dtype == tf.float32


@pytest.mark.parametrize("batch", [64, 100])  # 300 = 4*64 + 44 = 3*100
def test_evaluate_counts_every_example_once(mirrored, batch):
  source = data_lib.load_source(default_config().data, seed=0)
  with mirrored.scope():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Flatten(),
                              keras.layers.Dense(10, dtype="float32")])
  loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True,
                                                    reduction="none")
  trainer = Trainer(model=model, optimizer=keras.optimizers.SGD(0.1),
                    loss=loss, strategy=mirrored, metrics=[
                        keras.metrics.SparseCategoricalAccuracy("accuracy")])
  logs = trainer.evaluate(data_lib.input_fn(
      source.eval, global_batch_size=batch, training=False))
  x = np.stack([x for x, _ in source.eval.as_numpy_iterator()])
  y = np.array([y for _, y in source.eval.as_numpy_iterator()])
  logits = model.predict(x, verbose=0)
  assert logs["num_examples"] == 300
  assert logs["accuracy"] == pytest.approx(
      np.mean(np.argmax(logits, -1) == y), abs=1e-7)
  assert logs["loss"] == pytest.approx(float(np.mean(loss(y, logits))),
                                       rel=1e-5)
