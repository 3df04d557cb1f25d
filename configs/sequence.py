"""Your own experiment: a sequence task on integer token ids. An Embedding,
a Lambda layer with a registered function (masked mean over the tokens
that are not padding), a dense head; generated data: does a sequence hold
more of token 1 than of token 2?

  python -m launch.train --config=configs/sequence.py --workdir=runs/seq
"""

import keras
import numpy as np

from trainer.config import default_config
from trainer.layers import lambda_layer

PAD = 0


def get_config():
  c = default_config()
  c.task = "configs.sequence:CountTokens"
  c.user.vocab = 32
  c.user.max_length = 24
  c.user.num_train = 4000
  c.user.num_eval = 512
  c.user.embedding = 32
  c.data.global_batch_size = 64
  c.data.eval_batch_size = 128
  c.optimizer.name = "adam"
  c.optimizer.learning_rate = 3e-3
  c.train.steps = 600
  c.train.steps_per_loop = 25
  c.train.steps_per_epoch = 100
  c.train.checkpoint_every = 200
  return c


@keras.saving.register_keras_serializable(package="sequence")
def masked_mean(inputs):
  """Mean of the embeddings [b, T, E] over the positions whose token id
  [b, T] is not PAD: [b, E]."""
  embedded, ids = inputs
  mask = keras.ops.cast(keras.ops.not_equal(ids, PAD), embedded.dtype)[..., None]
  total = keras.ops.sum(embedded * mask, axis=1)
  return total / keras.ops.maximum(keras.ops.sum(mask, axis=1), 1.0)


class CountTokens:
  """Binary label: 1 if token 1 occurs more often than token 2."""

  def __init__(self, config):
    self.user = u = config.user
    rng = np.random.default_rng(config.seed)
    n = u.num_train + u.num_eval
    ids = rng.integers(1, u.vocab, size=(n, u.max_length)).astype(np.int32)
    lengths = rng.integers(u.max_length // 3, u.max_length + 1, size=n)
    ids[np.arange(u.max_length)[None, :] >= lengths[:, None]] = PAD
    label = ((ids == 1).sum(1) > (ids == 2).sum(1)).astype(np.int32)
    self.ids, self.label = ids, label

  def build_model(self):
    ids = keras.Input((self.user.max_length,), dtype="int32", name="tokens")
    embedded = keras.layers.Embedding(self.user.vocab, self.user.embedding,
                                      name="embedding")(ids)
    pooled = lambda_layer(masked_mean, name="masked_mean")([embedded, ids])
    hidden = keras.layers.Dense(64, activation="relu", name="hidden")(pooled)
    logits = keras.layers.Dense(2, dtype="float32", name="logits")(hidden)
    return keras.Model({"tokens": ids}, logits, name="count_tokens")

  def _split(self, part):
    n = self.user.num_train
    rows = slice(0, n) if part == "train" else slice(n, None)
    return {"tokens": self.ids[rows]}, self.label[rows]

  def train_data(self):
    return self._split("train")

  def eval_data(self):
    return self._split("eval")

  def build_losses(self, labels, logits):
    return keras.losses.sparse_categorical_crossentropy(labels, logits,
                                                        from_logits=True)

  def build_metrics(self):
    return [keras.metrics.SparseCategoricalAccuracy(name="accuracy")]
