"""What `launch.bench` times: the cases, and the contenders that run them.

A contender has `run(steps)`: the timed unit. `time_interleaved` runs each
contender once to warm up, then every contender once per repeat, in turn.
"""

import dataclasses
import time


@dataclasses.dataclass(frozen=True)
class Case:
  """One timed workload: an MLP of `widths` on [batch, features] inputs."""
  name: str
  features: int
  widths: tuple  # hidden layer widths; then a 10-way float32 logits layer
  batch: int  # global batch
  steps: int  # timed steps per run
  steps_per_loop: int
  image_shape: tuple = ()  # if set, inputs are images of it, flattened

  def layer_shapes(self) -> list[tuple[int, int]]:
    sizes = [self.features, *self.widths, 10]
    return list(zip(sizes[:-1], sizes[1:]))

  def train_matmuls(self) -> list[tuple]:
    """The matmuls of one train step, as (rows, inner, cols, transpose_a,
    transpose_b): per layer x @ W, x^T @ dy, and dy @ W^T but the first."""
    out = []
    for i, (n, m) in enumerate(self.layer_shapes()):
      out += [(self.batch, n, m, False, False), (n, self.batch, m, True, False)]
      if i:
        out.append((self.batch, m, n, False, True))
    return out

  def train_flops_per_example(self) -> int:
    """Forward 2NM per layer, weight gradient 2NM, input gradient 2NM for
    every layer but the first (its input needs no gradient)."""
    shapes = self.layer_shapes()
    return sum(6 * n * m for n, m in shapes) - 2 * shapes[0][0] * shapes[0][1]


def cases(size: str) -> dict[str, Case]:
  if size == "tiny":
    return {"overhead": Case("overhead", 64, (32,), 32, 20, 10),
            "compute": Case("compute", 256, (256, 256), 64, 20, 10)}
  # Short runs, many repeats: this kind of VM stalls a run now and then
  # (run times come in steps of ~0.3 s and ~1.3 s), and a median over many
  # short runs is the number the stalls leave alone.
  return {"overhead": Case("overhead", 64, (128, 128), 64, 1000, 100),
          "compute": Case("compute", 512, (1024, 1024, 1024), 512, 20, 10)}


def _model(case: Case, seed: int = 0):
  import keras  # pylint: disable=import-outside-toplevel
  keras.utils.set_random_seed(seed)
  layers = ([keras.Input(case.image_shape), keras.layers.Flatten()]
            if case.image_shape else [keras.Input((case.features,))])
  layers += [keras.layers.Dense(w, activation="relu") for w in case.widths]
  layers.append(keras.layers.Dense(10, dtype="float32"))
  return keras.Sequential(layers)


def _dataset(case: Case):
  """In-memory batches, repeated: the same input for both contenders
  (flat features: a case with `image_shape` needs its own data).

  Batched in NumPy, so each element is one whole batch (slicing 8 batches
  out of one tensor); batching example by example in tf.data would cost
  about as much as the small case's whole step and time the input instead.
  tf.data autotuning is off: each `fit` call makes a new iterator, and
  destroying an autotuned one stalls for 150-350 ms about half the time
  (measured here), which would time the iterator instead of the steps.
  """
  assert not case.image_shape, "an image case brings its own data"
  import numpy as np  # pylint: disable=import-outside-toplevel
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  rng = np.random.RandomState(0)
  x = rng.normal(size=(8, case.batch, case.features)).astype(np.float32)
  y = rng.randint(0, 10, size=(8, case.batch)).astype(np.int32)
  options = tf.data.Options()
  options.autotune.enabled = False
  return tf.data.Dataset.from_tensor_slices((x, y)).repeat().prefetch(
      2).with_options(options)


class Ours:
  """The trainer: `fit` for `steps` more steps per timed run.

  `persistent`: one iterator over `data` for all runs (`fit` continues an
  iterator it is given), as in one long `fit`; else a new one per run.
  """

  def __init__(self, case, strategy, data=None, persistent=False,
               jit_compile=False):
    import keras  # pylint: disable=import-outside-toplevel
    from trainer.fit.trainer import Trainer  # pylint: disable=import-outside-toplevel
    with strategy.scope():
      model = _model(case)
    self.trainer = Trainer(
        model=model, optimizer=keras.optimizers.Adam(1e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(
            from_logits=True, reduction="none"),
        strategy=strategy, steps_per_loop=case.steps_per_loop,
        jit_compile=jit_compile)
    self.data = data if data is not None else _dataset(case)
    if persistent:
      self.data = iter(self.trainer.distribute(self.data))

  def run(self, steps: int) -> None:
    done = int(self.trainer.global_step.numpy())
    self.trainer.fit(self.data, steps=done + steps)


class KerasFit:
  """Keras `Model.fit` with `steps_per_execution` = our steps_per_loop.

  `jit_compile=False` is what Keras' "auto" picks on a CPU-only machine.
  """

  def __init__(self, case, strategy, jit_compile=False):
    import keras  # pylint: disable=import-outside-toplevel
    with strategy.scope():
      self.model = _model(case)
      self.model.compile(
          optimizer=keras.optimizers.Adam(1e-3),
          loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
          steps_per_execution=case.steps_per_loop, jit_compile=jit_compile)
    self.data = _dataset(case)

  def run(self, steps: int) -> None:
    self.model.fit(self.data, epochs=1, steps_per_epoch=steps, verbose=0)


def time_interleaved(contenders: dict, steps: int,
                     repeats: int) -> dict[str, list]:
  """Seconds per run of each contender, interleaved run by run."""
  for contender in contenders.values():  # warm-up: tracing, thread pools
    contender.run(steps)
  seconds = {name: [] for name in contenders}
  for _ in range(repeats):
    for name, contender in contenders.items():
      start = time.perf_counter()
      contender.run(steps)
      seconds[name].append(time.perf_counter() - start)
  return seconds


class Matmuls:
  """Bare float32 matmuls: one "step" runs each of `products` (rows, inner,
  cols, transpose_a, transpose_b) once. Timed as one more contender, so it
  sees the same moments of the machine as the others. One element of each
  product is kept (the loop must use it; a sum would add a pass over it),
  and each waits for the one before: two at once share the cores and run
  slower than one after another (measured here: ~17%)."""

  def __init__(self, products: list[tuple]):
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    pairs = [(tf.random.normal((inner, rows) if ta else (rows, inner)),
              tf.random.normal((cols, inner) if tb else (inner, cols)), ta, tb)
             for rows, inner, cols, ta, tb in products]
    self.flops_per_step = sum(2 * r * i * c for r, i, c, _, _ in products)

    @tf.function
    def loop(steps):
      total = tf.constant(0.0)
      for _ in tf.range(steps):
        for a, b, ta, tb in pairs:
          with tf.control_dependencies([total]):
            total += tf.matmul(a, b, transpose_a=ta, transpose_b=tb)[0, 0]
      return total

    self._loop = loop

  def run(self, steps: int) -> None:
    self._loop(steps).numpy()
