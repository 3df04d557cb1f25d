"""Distributed inference: `Trainer.predict`, outputs in input order.

Every example is tagged with its index before the dataset is split across
replicas and workers; each step runs the model on every replica (an empty
replica on one zero row whose output is dropped, trainer/step/builtin.py), then
gathers indices and outputs from all replicas of all workers, so every
worker ends with the whole result, put back in input order by index.
"""

import keras
import numpy as np
import tensorflow as tf

from trainer.fit import inputs
from trainer.step.replica import call_nonempty


def _forward(model, batch, training):
  """A ComputeLoss-shaped forward pass: (no loss, outputs)."""
  del training
  first = tf.nest.flatten(batch)[0]
  return tf.zeros([tf.shape(first)[0]]), model(batch, training=False)


class Predictor:
  """Runs `model` over a dataset on `strategy`'s replicas.

  Args:
    model: a Keras model built under `strategy.scope()`.
    strategy: the tf.distribute strategy.
    distribute: `Trainer.distribute` (dataset function -> distributed input).
  """

  def __init__(self, model, strategy, distribute):
    self.model, self.strategy, self.distribute = model, strategy, distribute
    self._step = tf.function(self._step_fn)

  def _step_fn(self, batch):
    def replica(indices, x):
      _, outputs = call_nonempty(_forward, self.model, x, False)
      return indices, outputs
    indices, outputs = self.strategy.run(replica, args=batch)
    gather = lambda t: self.strategy.gather(t, axis=0)
    return gather(indices), tf.nest.map_structure(gather, outputs)

  def __call__(self, x, batch_size: int | None = None):
    """Outputs of the model for every example of `x`, in input order:
    numpy [N, ...], or a nest of them for several outputs."""
    examples, batch_size = inputs.indexed_examples(x, batch_size)
    inputs.check_batch_size(batch_size, self.strategy.num_replicas_in_sync)

    def dataset_fn(ctx: tf.distribute.InputContext) -> tf.data.Dataset:
      ds = examples.batch(ctx.get_per_replica_batch_size(batch_size))
      if ctx.num_input_pipelines > 1:
        ds = ds.shard(ctx.num_input_pipelines, ctx.input_pipeline_id)
      return ds.prefetch(tf.data.AUTOTUNE)

    index_chunks, output_chunks = [], []
    with self.strategy.scope():
      for batch in self.distribute(dataset_fn):
        indices, outputs = self._step(batch)
        index_chunks.append(indices.numpy())
        output_chunks.append(tf.nest.map_structure(
            keras.ops.convert_to_numpy, outputs))
    if not index_chunks:
      raise ValueError("`x` for predict holds no examples")
    order = np.argsort(np.concatenate(index_chunks), kind="stable")
    seen = np.concatenate(index_chunks)[order]
    if not np.array_equal(seen, np.arange(len(seen))):
      raise RuntimeError("predict lost or repeated examples (a bug): got "
                         f"{len(seen)} outputs for indices up to {seen[-1]}")
    return tf.nest.map_structure(
        lambda *chunks: np.concatenate(chunks)[order], *output_chunks)
