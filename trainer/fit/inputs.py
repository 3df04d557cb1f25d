"""What `Trainer.fit`, `evaluate` and `predict` accept, as datasets.

In Keras' words: `x` is a `tf.data.Dataset` batched by the global batch
size, a dataset function (`InputContext -> per-replica batches`), an
iterator over `Trainer.distribute(...)`, or numpy arrays (a dict of arrays
for several inputs) with `y` (and optionally `sample_weight`), which are
batched here by the global `batch_size`. Bad combinations are a ValueError
naming the argument.
"""

import numpy as np
import tensorflow as tf

DEFAULT_BATCH_SIZE = 32  # Keras' default for numpy inputs


def is_arrays(x) -> bool:
  """True for numpy arrays, lists of numbers, or a dict/tuple of arrays."""
  if x is None or isinstance(x, tf.data.Dataset) or callable(x):
    return False
  leaves = tf.nest.flatten(x)
  return bool(leaves) and all(isinstance(a, (np.ndarray, list, tf.Tensor))
                              or np.isscalar(a) for a in leaves)


def _num_rows(tree, argument: str) -> int:
  sizes = {len(np.asarray(a)) for a in tf.nest.flatten(tree)}
  if len(sizes) != 1:
    raise ValueError(f"`{argument}` holds arrays of different lengths "
                     f"{sorted(sizes)}; every array has one row per example")
  return sizes.pop()


def check_batch_size(batch_size: int | None, replicas: int) -> int:
  """The global batch size for numpy inputs (default 32)."""
  batch_size = DEFAULT_BATCH_SIZE if batch_size is None else batch_size
  if not isinstance(batch_size, int) or batch_size < 1:
    raise ValueError(f"`batch_size` must be a positive int, got {batch_size!r}")
  if batch_size % replicas:
    raise ValueError(f"`batch_size`={batch_size} cannot be split evenly "
                     f"across {replicas} replicas; use a multiple of "
                     f"{replicas}")
  return batch_size


def arrays_dataset(x, y=None, sample_weight=None, *, batch_size: int,
                   shuffle: bool = False, seed: int = 0) -> tf.data.Dataset:
  """Numpy `x` (and `y`, `sample_weight`) as a finite dataset of global
  batches, the last one partial; reshuffled every pass if `shuffle`."""
  parts = [p for p in (x, y, sample_weight) if p is not None]
  names = ("x", "y", "sample_weight")
  rows = {name: _num_rows(p, name) for name, p in zip(names, (x, y,
                                                               sample_weight))
          if p is not None}
  if len(set(rows.values())) != 1:
    detail = " but ".join(f"`{k}` has {v} examples" for k, v in rows.items())
    raise ValueError(f"{detail}; they must have one row per example each")
  data = tf.data.Dataset.from_tensor_slices(
      parts[0] if len(parts) == 1 else tuple(parts))
  if shuffle:
    data = data.shuffle(rows["x"], seed=seed, reshuffle_each_iteration=True)
  return data.batch(batch_size)


def check_no_y(x, y, sample_weight, batch_size) -> None:
  """`y`, `sample_weight` and `batch_size` go with arrays only."""
  for name, value in (("y", y), ("sample_weight", sample_weight),
                      ("batch_size", batch_size)):
    if value is not None:
      raise ValueError(
          f"`{name}` must be None when `x` is a {type(x).__name__}: a "
          "dataset already holds its labels and weights and is batched")


def as_input(x, y=None, sample_weight=None, *, batch_size=None, replicas=1,
             shuffle=False, seed=0):
  """`x` as fit/evaluate take it: a batched dataset, a dataset function or
  an iterator, unchanged; numpy arrays batched by the global batch_size."""
  if is_arrays(x):
    return arrays_dataset(x, y, sample_weight,
                          batch_size=check_batch_size(batch_size, replicas),
                          shuffle=shuffle, seed=seed)
  if x is None:
    raise ValueError("`x` is required: a tf.data.Dataset, a dataset function"
                     " or numpy arrays (with `y`)")
  check_no_y(x, y, sample_weight, batch_size)
  return x


def split_validation(x, y, sample_weight, fraction: float):
  """Keras' `validation_split`: the last `fraction` of the arrays, taken
  before any shuffling. Returns ((x, y, w) to train, (x, y, w) to
  validate)."""
  if not 0.0 < fraction < 1.0:
    raise ValueError(f"`validation_split` must be in (0, 1), got {fraction}")
  if not is_arrays(x):
    raise ValueError("`validation_split` needs numpy arrays `x`, `y`; with a "
                     "dataset pass `validation_data`")
  n = _num_rows(x, "x")
  cut = int(n * (1.0 - fraction))
  if cut in (0, n):
    raise ValueError(f"`validation_split`={fraction} of {n} examples leaves "
                     "one side empty")
  head = lambda t: None if t is None else tf.nest.map_structure(
      lambda a: np.asarray(a)[:cut], t)
  tail = lambda t: None if t is None else tf.nest.map_structure(
      lambda a: np.asarray(a)[cut:], t)
  return ((head(x), head(y), head(sample_weight)),
          (tail(x), tail(y), tail(sample_weight)))


def validation_input(validation_data, batch_size: int | None, replicas: int):
  """`validation_data`: (x, y[, w]) arrays, a batched dataset or a dataset
  function; None stays None."""
  if validation_data is None:
    return None
  if isinstance(validation_data, tuple) and is_arrays(validation_data[0]):
    if len(validation_data) not in (2, 3):
      raise ValueError("`validation_data` as arrays must be (x, y) or "
                       "(x, y, sample_weight)")
    return arrays_dataset(*validation_data, batch_size=check_batch_size(
        batch_size, replicas))
  if isinstance(validation_data, tf.data.Dataset) or callable(
      validation_data):
    return validation_data
  raise ValueError("`validation_data` must be (x, y), (x, y, sample_weight), "
                   "a tf.data.Dataset or a dataset function, got "
                   f"{type(validation_data).__name__}")


def batches_per_pass(data) -> int | None:
  """Global batches in one pass of a finite `tf.data.Dataset`; None when
  unknown, infinite, or not a dataset."""
  if not isinstance(data, tf.data.Dataset):
    return None
  n = int(data.cardinality())
  return n if n >= 0 else None


def is_finite(data) -> bool:
  """A `tf.data.Dataset` that ends (or may: unknown cardinality)."""
  return (isinstance(data, tf.data.Dataset) and
          int(data.cardinality()) != int(tf.data.INFINITE_CARDINALITY))


def indexed_examples(x, batch_size: int | None) -> tuple[tf.data.Dataset,
                                                          int]:
  """For predict: `x` (arrays, or a batched dataset of x or (x, ...)) as
  unbatched (index, x) elements, and the global batch size to use."""
  if is_arrays(x):
    examples = tf.data.Dataset.from_tensor_slices(x)
  elif isinstance(x, tf.data.Dataset):
    examples = (x.map(lambda *e: e[0]) if isinstance(x.element_spec, tuple)
                else x).unbatch()
  else:
    raise ValueError("`x` for predict must be numpy arrays (or a dict of "
                     "them) or a batched tf.data.Dataset, got "
                     f"{type(x).__name__}")
  indices = tf.data.Dataset.range(2**62)
  return (tf.data.Dataset.zip((indices, examples)),
          DEFAULT_BATCH_SIZE if batch_size is None else batch_size)



def _host_only(strategy: tf.distribute.Strategy, num_workers: int) -> bool:
  """One replica on the host CPU: nothing to split or copy to a device."""
  try:
    devices = strategy.extended.worker_devices
  except (AttributeError, RuntimeError):  # the default strategy has none
    return not tf.config.list_logical_devices("GPU")
  return (strategy.num_replicas_in_sync == 1 and num_workers == 1 and
          len(devices) == 1 and "CPU" in devices[0].upper())


def distribute(strategy: tf.distribute.Strategy, data, num_workers: int = 1):
  """A distributed dataset from a dataset function or a batched dataset.

  A dataset function gets an InputContext and returns per-replica batches;
  a plain `tf.data.Dataset` must be batched by the global batch size.
  With one replica on the host CPU the dataset is used as it is: the
  distributed iterator would only add ~150 us per batch (measured here) for
  a split and a device copy that do not happen. Anything else (an iterator
  over what this returned) is passed through.
  """
  if _host_only(strategy, num_workers):
    return data(tf.distribute.InputContext()) if (
        callable(data) and not isinstance(data, tf.data.Dataset)) else data
  if isinstance(data, tf.data.Dataset):
    return strategy.experimental_distribute_dataset(data)
  if callable(data):
    return strategy.distribute_datasets_from_function(data)
  return data  # already distributed
