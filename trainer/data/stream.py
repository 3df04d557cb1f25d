"""The in-memory training stream, addressed by step.

Epoch e of the N examples in the order `epoch_permutation(e)`; a resume at
step k starts at its position at the cost of one permutation.
"""

from typing import Callable

import tensorflow as tf

from trainer.errors import DataError


def epoch_permutation(epoch: tf.Tensor, num_examples: int,
                      seed: int) -> tf.Tensor:
  """The order of epoch `epoch` of the training stream: int64 [N], a
  permutation of range(N) fixed by (seed, epoch). O(N) work per epoch."""
  return tf.random.experimental.stateless_shuffle(
      tf.range(num_examples, dtype=tf.int64),
      seed=tf.stack([tf.constant(seed, tf.int64),
                     tf.cast(epoch, tf.int64)]))


# Batches gathered per tf.data call (tf.data's per-call cost is about that
# of one small train step), capped at this many bytes of examples.
CHUNK_BATCHES, CHUNK_BYTES = 16, 4 << 20


def stream_input_fn(arrays, *, global_batch_size: int, seed: int,
                    start_step: int = 0
                   ) -> Callable[[tf.distribute.InputContext],
                                 tf.data.Dataset]:
  """The training dataset function for a source held in memory.

  `arrays` is a nest of numpy arrays with one row per example, e.g.
  (images [N, H, W, C], labels [N]) or ({"ids": [N, T]}, y [N], w [N]).
  The stream is epoch after epoch of the N examples, epoch e in the order
  `epoch_permutation(e)`; global step k reads stream positions
  [k * B, (k + 1) * B) and per-replica batch q positions [q * b, (q + 1) * b).
  Batch q goes to input pipeline q mod P, whose replicas take its batches in
  turn: the same global batches for any number of replicas or workers.
  Starting at `start_step` costs one permutation, not a replay of the steps
  before it (DESIGN.md fact 8).

  Per epoch: one O(N) permutation of indices; per chunk of up to 16 batches:
  one gather from the arrays.
  """
  flat = tf.nest.flatten(arrays)
  num_examples = len(flat[0])

  def dataset_fn(ctx: tf.distribute.InputContext) -> tf.data.Dataset:
    per_replica = ctx.get_per_replica_batch_size(global_batch_size)
    if per_replica > num_examples:
      raise DataError(f"a per-replica batch of {per_replica} is larger than "
                      f"the {num_examples} training examples")
    tensors = tf.nest.map_structure(tf.constant, arrays)
    first_epoch, skip = divmod(
        start_step * ctx.num_replicas_in_sync * per_replica, num_examples)

    def epoch_order(epoch):  # the first epoch starts at the resumed position
      order = epoch_permutation(epoch, num_examples, seed)
      return order[tf.where(epoch == first_epoch, skip, 0):]

    indices = tf.data.Dataset.range(first_epoch, 2**62).map(
        epoch_order).rebatch(per_replica, drop_remainder=True)
    if ctx.num_input_pipelines > 1:
      indices = indices.shard(ctx.num_input_pipelines, ctx.input_pipeline_id)
    batch_bytes = per_replica * max(1, sum(a[0].nbytes for a in flat))
    chunk = max(1, min(CHUNK_BATCHES, CHUNK_BYTES // batch_bytes))
    gather = lambda idx: tf.nest.map_structure(
        lambda t: tf.gather(t, idx), tensors)
    return indices.batch(chunk).map(
        gather, num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True).unbatch().prefetch(tf.data.AUTOTUNE)

  return dataset_fn
