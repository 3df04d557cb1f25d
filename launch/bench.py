r"""Times the trainer against Keras `Model.fit`, the machine, and its inputs.

  python -m launch.bench [--json=PATH] [--repeats=5] [--size=full|tiny]

In one process, after warm-up, interleaving the contenders run by run:
  overhead   a small MLP on a small batch (per-step overhead dominates):
             trainer vs Keras fit, same model, optimizer, tf.data input,
             strategy, policy, steps_per_execution = steps_per_loop; each
             with and without XLA, the faster setting of each side counts;
  compute    a large MLP (matmuls dominate): the same, plus the model's
             achieved FLOP/s next to bare matmuls of its largest layer
             (timed interleaved with the others);
  mirrored   the compute case on 2 logical CPU devices (MirroredStrategy)
             against one device: the cost of distribution;
  input      the digits training stream (per-epoch shuffle + gather)
             against the same batches already in memory.
Reports medians over `--repeats` runs; writes every figure and the machine
to JSON. Targets (issue 7) are checked in the report, not in tests.
"""

import dataclasses
import datetime
import json
import os
import platform
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# pylint: disable=wrong-import-position
from absl import app, flags, logging

_JSON = flags.DEFINE_string("json", "bench.json", "Where to write the JSON "
                            "report ('' = do not write).")
_REPEATS = flags.DEFINE_integer("repeats", 15, "Timed runs per contender.",
                                lower_bound=1)
_SIZE = flags.DEFINE_enum("size", "full", ["full", "tiny"], "tiny: a smoke "
                          "run in seconds (numbers are meaningless).")

TARGETS = {"overhead_ratio": 0.95, "compute_ratio": 1.00,
           "matmul_fraction": 0.85, "input_fraction": 0.95}


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
  """In-memory batches, repeated: the same input for both contenders.

  Batched in NumPy, so each element is one whole batch (slicing 8 batches
  out of one tensor); batching example by example in tf.data would cost
  about as much as the small case's whole step and time the input instead.
  tf.data autotuning is off: each `fit` call makes a new iterator, and
  destroying an autotuned one stalls for 150-350 ms about half the time
  (measured here), which would time the iterator instead of the steps.
  """
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
    from trainer.loop import Trainer  # pylint: disable=import-outside-toplevel
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


def _time(contenders: dict, steps: int, repeats: int) -> dict[str, list]:
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


def _summary(seconds: list, case: Case, steps: int) -> dict:
  median = statistics.median(seconds)
  return {"seconds": seconds, "median_seconds": median,
          "examples_per_sec": steps * case.batch / median,
          "step_time_ms": 1e3 * median / steps}


def bench_vs_keras(case: Case, strategy, repeats: int,
                   matmuls: dict | None = None) -> dict:
  """Each side with its best setting: with and without XLA (`jit_compile`),
  the faster one counts. `matmuls` (name: Matmuls) run interleaved."""
  contenders = {"trainer": Ours(case, strategy),
                "trainer_xla": Ours(case, strategy, jit_compile=True),
                "keras_fit": KerasFit(case, strategy),
                "keras_fit_xla": KerasFit(case, strategy, jit_compile=True)}
  contenders.update(matmuls or {})
  seconds = _time(contenders, case.steps, repeats)
  out = {name: _summary(s, case, case.steps) for name, s in seconds.items()}
  best = lambda names: min(names, key=lambda n: out[n]["median_seconds"])
  out["trainer_best"] = best(["trainer", "trainer_xla"])
  out["keras_best"] = best(["keras_fit", "keras_fit_xla"])
  out["ratio"] = (out[out["trainer_best"]]["median_seconds"] /
                  out[out["keras_best"]]["median_seconds"])
  return out


def bench_input(repeats: int, size: str) -> dict:
  """The digits training stream vs the same batches held in memory."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  from trainer import data as data_lib  # pylint: disable=import-outside-toplevel
  case = Case("input", 64, (128, 128), 64, 1000 if size == "full" else 20,
              100 if size == "full" else 10, image_shape=(8, 8, 1))
  strategy = tf.distribute.OneDeviceStrategy("/cpu:0")
  source = data_lib.load_source(_digits_config(), 0)
  real = data_lib.train_input_fn(source, global_batch_size=case.batch,
                                 seed=0, shuffle_buffer=1)
  images, labels = source.train_arrays
  memory = tf.data.Dataset.from_tensor_slices(  # 8 batches, then cached
      (images[:case.batch * 8], labels[:case.batch * 8])).batch(
          case.batch).cache().repeat().prefetch(tf.data.AUTOTUNE)
  contenders = {"digits_stream": Ours(case, strategy, data=real,
                                     persistent=True),
                "in_memory": Ours(case, strategy, data=memory,
                                  persistent=True)}
  seconds = _time(contenders, case.steps, repeats)
  out = {name: _summary(s, case, case.steps) for name, s in seconds.items()}
  out["fraction"] = (out["in_memory"]["median_seconds"] /
                     out["digits_stream"]["median_seconds"])
  return out


def _digits_config():
  from configs import digits  # pylint: disable=import-outside-toplevel
  return digits.get_config().data


def machine() -> dict:
  import keras  # pylint: disable=import-outside-toplevel
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  cpu = platform.processor()
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      cpu = next(l.split(":", 1)[1].strip() for l in f
                 if l.startswith("model name"))
  except (OSError, StopIteration):
    pass
  return {"cpu": cpu, "cores": os.cpu_count(), "python": sys.version.split()[0],
          "tensorflow": tf.__version__, "keras": keras.__version__,
          "platform": platform.platform(),
          "gpus": len(tf.config.list_physical_devices("GPU")),
          "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
              timespec="seconds")}


def bench_devices(case: Case, devices: list[int], repeats: int) -> dict:
  """The trainer on N devices (MirroredStrategy over N GPUs, or N logical
  CPUs that share the same cores). On GPUs the batch grows with N (weak
  scaling, as in published multi-GPU numbers); on CPUs it stays fixed."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  gpus = [d.name for d in tf.config.list_logical_devices("GPU")]
  cpus = [d.name for d in tf.config.list_logical_devices("CPU")]
  contenders, runs = {}, {}
  for n in devices:
    names = (gpus or cpus)[:n]
    strategy = (tf.distribute.OneDeviceStrategy(names[0]) if n == 1 else
                tf.distribute.MirroredStrategy(
                    names, cross_device_ops=None if gpus else
                    tf.distribute.ReductionToOneDevice()))
    scaled = dataclasses.replace(case, batch=case.batch * (n if gpus else 1))
    contenders[f"{n}_devices"] = Ours(scaled, strategy)
    runs[f"{n}_devices"] = scaled
  seconds = _time(contenders, case.steps, repeats)
  out = {name: _summary(s, runs[name], case.steps)
         for name, s in seconds.items()}
  base = out[f"{devices[0]}_devices"]["examples_per_sec"]
  for name in out:
    out[name]["speedup"] = out[name]["examples_per_sec"] / base
  out["device_kind"] = "GPU" if gpus else "logical CPU"
  return out


def report(results: dict) -> list[str]:
  """The table printed at the end, with each target and whether it holds."""
  rows = ["case        contender        examples/s   step ms   vs target"]
  for key in ("overhead", "compute"):
    r = results[key]
    for name in ("trainer", "trainer_xla", "keras_fit", "keras_fit_xla"):
      rows.append(f"{key:<11} {name:<15} {r[name]['examples_per_sec']:>11.0f} "
                  f"{r[name]['step_time_ms']:>9.3f}")
    target = TARGETS[f"{key}_ratio"]
    rows.append(f"{key:<11} trainer/keras time {r['ratio']:.3f}"
                f"{'':>11}<= {target:.2f} "
                f"{'ok' if r['ratio'] <= target else 'MISSED'}"
                f"  (best: {r['trainer_best']}, {r['keras_best']})")
  m = results["matmul"]
  rows.append(f"compute     model {m['model_gflops']:.1f} GFLOP/s, bare "
              f"matmul {m['matmul_gflops']:.1f}: {m['fraction']:.3f}   >= "
              f"{TARGETS['matmul_fraction']:.2f} "
              f"{'ok' if m['fraction'] >= TARGETS['matmul_fraction'] else 'MISSED'}")
  rows.append(f"compute     the step's own matmuls run bare "
              f"{m['model_matmuls_gflops']:.1f} GFLOP/s: model at "
              f"{m['fraction_of_model_matmuls']:.3f} of them")
  d = results["devices"]
  for name, r in d.items():
    if isinstance(r, dict):
      rows.append(f"devices     {name:<15} {r['examples_per_sec']:>11.0f} "
                  f"{r['step_time_ms']:>9.3f}   x{r['speedup']:.2f} "
                  f"({d['device_kind']})")
  i = results["input"]
  for name in ("digits_stream", "in_memory"):
    rows.append(f"input       {name:<15} {i[name]['examples_per_sec']:>11.0f} "
                f"{i[name]['step_time_ms']:>9.3f}")
  rows.append(f"input       stream/memory {i['fraction']:.3f}{'':>16}>= "
              f"{TARGETS['input_fraction']:.2f} "
              f"{'ok' if i['fraction'] >= TARGETS['input_fraction'] else 'MISSED'}")
  return rows


_DEVICES = flags.DEFINE_list("devices", ["1", "2"], "Device counts for the "
                             "distribution case (GPUs if any, else logical "
                             "CPUs), e.g. 1,2,4,8 on an 8-GPU host.")


def main(argv: list[str]) -> None:
  del argv
  logging.set_verbosity(logging.WARNING)
  devices = sorted({int(d) for d in _DEVICES.value})
  from trainer.strategy import configure_cpu_devices  # pylint: disable=import-outside-toplevel
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  if not tf.config.list_physical_devices("GPU"):
    configure_cpu_devices(max(devices))
  repeats, chosen = _REPEATS.value, cases(_SIZE.value)
  one = tf.distribute.OneDeviceStrategy(
      (tf.config.list_logical_devices("GPU") or
       tf.config.list_logical_devices("CPU"))[0].name)
  results = {"machine": machine(), "repeats": repeats, "size": _SIZE.value,
             "targets": TARGETS,
             "cases": {k: dataclasses.asdict(c) for k, c in chosen.items()}}
  compute = chosen["compute"]
  batch, n, m = compute.batch, *max(compute.layer_shapes(),
                                    key=lambda s: s[0] * s[1])
  model_flops = compute.train_flops_per_example() * compute.batch
  matmuls = {  # the largest layer's forward product, as many as a step has
      "bare_matmul": Matmuls([(batch, n, m, False, False)] * max(
          1, round(model_flops / (2 * batch * n * m)))),
      # the step's own products (transposed ones in the backward pass)
      "model_matmuls": Matmuls(compute.train_matmuls())}
  for key in ("overhead", "compute"):
    print(f"timing {key} ...", flush=True)
    results[key] = bench_vs_keras(chosen[key], one, repeats,
                                  matmuls if key == "compute" else None)
  c = results["compute"]
  rate = lambda name, flops: flops / (c[name]["median_seconds"] /
                                      compute.steps)
  model_rate = rate(c["trainer_best"], model_flops)
  matmul_rate = rate("bare_matmul", matmuls["bare_matmul"].flops_per_step)
  own_rate = rate("model_matmuls", matmuls["model_matmuls"].flops_per_step)
  results["matmul"] = {"shape": [batch, n, m],
                       "matmul_gflops": matmul_rate / 1e9,
                       "model_gflops": model_rate / 1e9,
                       "fraction": model_rate / matmul_rate,
                       "model_matmuls_gflops": own_rate / 1e9,
                       "fraction_of_model_matmuls": model_rate / own_rate}
  print("timing devices ...", flush=True)
  results["devices"] = bench_devices(compute, devices, repeats)
  print("timing input ...", flush=True)
  results["input"] = bench_input(repeats, _SIZE.value)
  for row in report(results):
    print(row)
  if _JSON.value:
    with open(_JSON.value, "w", encoding="utf-8") as f:
      json.dump(results, f, indent=2)
    print(f"wrote {_JSON.value}")


if __name__ == "__main__":
  app.run(main)
