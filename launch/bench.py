r"""Times the trainer against Keras `Model.fit`, the machine, and its inputs.

  python -m launch.bench [--json=PATH] [--repeats=15] [--size=full|tiny]
                         [--devices=1,2]

In one process, after warm-up, interleaving the contenders run by run:
  overhead   a small MLP on a small batch (per-step overhead dominates):
             trainer vs Keras fit, same model, optimizer, tf.data input,
             strategy, policy, steps_per_execution = steps_per_loop; each
             with and without XLA, the faster setting of each side counts;
  compute    a large MLP (matmuls dominate): the same, plus the model's
             achieved FLOP/s next to bare matmuls of its largest layer
             (the target) and to the step's own matmuls run bare (what
             is left is the framework's cost), timed interleaved;
  mirrored   the compute case on 2 logical CPU devices (MirroredStrategy)
             against one device: the cost of distribution;
  input      the digits training stream (per-epoch shuffle + gather)
             against the same batches already in memory;
  disk       JPEGs in TFRecord shards and in an image folder
             (launch/bench_disk.py): the pipeline's examples/s against the
             step's, decoded records on 1 vs 2 input pipelines, and the
             time to resume at an early and a late step.
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

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# pylint: disable=wrong-import-position
from absl import app, flags, logging

from launch.bench_contenders import (Case, KerasFit, Matmuls, Ours, cases,
                                     time_interleaved)
from launch.bench_disk import bench_on_disk, report_rows

_JSON = flags.DEFINE_string("json", "bench.json", "Where to write the JSON "
                            "report ('' = do not write).")
_REPEATS = flags.DEFINE_integer("repeats", 15, "Timed runs per contender.",
                                lower_bound=1)
_SIZE = flags.DEFINE_enum("size", "full", ["full", "tiny"], "tiny: a smoke "
                          "run in seconds (numbers are meaningless).")
_DEVICES = flags.DEFINE_list("devices", ["1", "2"], "Device counts for the "
                             "distribution case (GPUs if any, else logical "
                             "CPUs), e.g. 1,2,4,8 on an 8-GPU host.")

TARGETS = {"overhead_ratio": 0.95, "compute_ratio": 1.00,
           "matmul_fraction": 0.85, "input_fraction": 0.95}


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
  seconds = time_interleaved(contenders, case.steps, repeats)
  out = {name: _summary(seconds[name], case, case.steps)
         for name in contenders if name not in (matmuls or {})}
  for name, m in (matmuls or {}).items():
    median = statistics.median(seconds[name])
    out[name] = {"seconds": seconds[name], "median_seconds": median,
                 "gflops": m.flops_per_step * case.steps / median / 1e9}
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
  real = data_lib.stream_input_fn(source.train_arrays,
                                  global_batch_size=case.batch, seed=0)
  images, labels = source.train_arrays
  memory = tf.data.Dataset.from_tensor_slices(  # 8 batches, then cached
      (images[:case.batch * 8], labels[:case.batch * 8])).batch(
          case.batch).cache().repeat().prefetch(tf.data.AUTOTUNE)
  contenders = {"digits_stream": Ours(case, strategy, data=real,
                                     persistent=True),
                "in_memory": Ours(case, strategy, data=memory,
                                  persistent=True)}
  seconds = time_interleaved(contenders, case.steps, repeats)
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
  seconds = time_interleaved(contenders, case.steps, repeats)
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
  return rows + report_rows(results["disk"])


def main(argv: list[str]) -> None:
  del argv
  logging.set_verbosity(logging.WARNING)
  devices = sorted({int(d) for d in _DEVICES.value})
  from trainer.distribute.strategy import configure_cpu_devices  # pylint: disable=import-outside-toplevel
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
  model_rate = model_flops / (c[c["trainer_best"]]["median_seconds"] /
                              compute.steps) / 1e9
  matmul_rate = c["bare_matmul"]["gflops"]
  own_rate = c["model_matmuls"]["gflops"]
  results["matmul"] = {"shape": [batch, n, m],
                       "matmul_gflops": matmul_rate,
                       "model_gflops": model_rate,
                       "fraction": model_rate / matmul_rate,
                       "model_matmuls_gflops": own_rate,
                       "fraction_of_model_matmuls": model_rate / own_rate}
  print("timing devices ...", flush=True)
  results["devices"] = bench_devices(compute, devices, repeats)
  print("timing input ...", flush=True)
  results["input"] = bench_input(repeats, _SIZE.value)
  print("timing disk ...", flush=True)
  results["disk"] = bench_on_disk(repeats, _SIZE.value)
  for row in report(results):
    print(row)
  if _JSON.value:
    with open(_JSON.value, "w", encoding="utf-8") as f:
      json.dump(results, f, indent=2)
    print(f"wrote {_JSON.value}")


if __name__ == "__main__":
  app.run(main)
