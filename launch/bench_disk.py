"""`launch.bench`'s on-disk case: JPEG images in TFRecord shards and in an
image folder, read by the built-in `tfrecord` and `image_folder` sources.

For each source, timed interleaved with the others:
  pipeline   the training pipeline alone (trainer/data/files.py: read,
             windowed shuffle, JPEG decode, resize, batch), examples/s;
  step       the train step on the same shapes already in memory;
  fed        the train step fed by the pipeline (what a run gets).
Counted once: the records decoded to train the same steps on 1 input
pipeline and on 2 (each worker's share, in one process), and the time to
the first batch of a resume at an early and a late step (and their ratio).
The same resume for a task's own tf.data pipeline over the TFRecord shards
(`TFRecordDataset(files).map(parse and decode)`, trainer/data/pipeline.py),
with the records it decoded to get there.
"""

import os
import statistics
import tempfile
import time

import numpy as np
from absl import logging

from launch.bench_contenders import Case, Ours, time_interleaved

IMAGE = 96  # stored JPEGs are IMAGE x IMAGE, quality 90; decoded to SIZE
SIZE = 32


def write_jpegs(root: str, *, num_files: int, per_file: int) -> dict:
  """The same images (2 classes) as TFRecord shards and as an image
  folder; returns the config overrides of each source."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  ramp = np.linspace(0, 255, IMAGE, dtype=np.float32)
  for split in ("train", "test"):
    for c in range(2):
      os.makedirs(os.path.join(root, "folder", split, f"class{c}"),
                  exist_ok=True)
  for f in range(num_files):
    path = os.path.join(root, f"train-{f:03d}.tfrecord")
    with tf.io.TFRecordWriter(path) as writer:
      for i in range(per_file):
        label = (f + i) % 2
        base = ramp[None, :, None] if label else ramp[:, None, None]
        pixels = np.clip(base + rng.normal(0, 40, (IMAGE, IMAGE, 3)), 0, 255)
        jpeg = tf.io.encode_jpeg(pixels.astype(np.uint8), quality=90).numpy()
        writer.write(tf.train.Example(features=tf.train.Features(feature={
            "image/encoded": tf.train.Feature(
                bytes_list=tf.train.BytesList(value=[jpeg])),
            "image/class/label": tf.train.Feature(
                int64_list=tf.train.Int64List(value=[label]))}))
                     .SerializeToString())
        for split in ("train",) + (("test",) if f == 0 else ()):
          with open(os.path.join(root, "folder", split, f"class{label}",
                                 f"{f:03d}-{i:04d}.jpg"), "wb") as out:
            out.write(jpeg)
  records = os.path.join(root, "train-*.tfrecord")
  return {"tfrecord": {"name": "tfrecord", "train_files": records,
                       "eval_files": records, "num_classes": 2},
          "image_folder": {"name": "image_folder",
                           "data_dir": os.path.join(root, "folder")}}


def _source(overrides: dict):
  from configs import digits  # pylint: disable=import-outside-toplevel
  from trainer import data as data_lib  # pylint: disable=import-outside-toplevel
  cfg = digits.get_config().data
  cfg.image_size = SIZE
  cfg.update(overrides)
  return data_lib.load_source(cfg, seed=0)


class _Pipeline:
  """The training pipeline alone: `run(steps)` pulls that many batches."""

  def __init__(self, fn):
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    self.batches = iter(fn(tf.distribute.InputContext()))

  def run(self, steps: int) -> None:
    for _ in range(steps):
      next(self.batches)


def _counted(files):
  """`files` with a decode that counts its calls (in this process)."""
  import dataclasses  # pylint: disable=import-outside-toplevel
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  count = [0]

  def tick(label):
    count[0] += 1
    return label

  def decode(record):
    image, label = files.decode(record)
    label = tf.numpy_function(tick, [label], label.dtype, stateful=True)
    return image, tf.ensure_shape(label, [])

  return dataclasses.replace(files, decode=decode), count


def _decoded(files, *, batch: int, steps: int, pipelines: int) -> int:
  """Records decoded over `pipelines` input pipelines to train `steps`."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  from trainer.data import files as files_lib  # pylint: disable=import-outside-toplevel
  counted, count = _counted(files)
  fn = files_lib.train_fn(counted, global_batch_size=batch, seed=0,
                          window=256)
  for index in range(pipelines):
    ctx = tf.distribute.InputContext(num_input_pipelines=pipelines,
                                     input_pipeline_id=index,
                                     num_replicas_in_sync=pipelines)
    for _ in fn(ctx).take(steps):
      pass
  return count[0]


def _resume_seconds(files, *, batch: int, start_step: int,
                    repeats: int) -> float:
  """Median seconds from a resumed pipeline's creation to its first batch."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  from trainer.data import files as files_lib  # pylint: disable=import-outside-toplevel
  seconds = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn = files_lib.train_fn(files, global_batch_size=batch, seed=0,
                            window=256, start_step=start_step)
    next(iter(fn(tf.distribute.InputContext())))
    seconds.append(time.perf_counter() - start)
  return statistics.median(seconds)


def _own_pipeline(pattern: str, count: list):
  """A user's `train_data()` over the TFRecord shards: read, parse, decode
  and resize, counting its decodes in `count`."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel

  def tick(label):
    count[0] += 1
    return label

  def parse(record):
    example = tf.io.parse_single_example(record, {
        "image/encoded": tf.io.FixedLenFeature([], tf.string),
        "image/class/label": tf.io.FixedLenFeature([], tf.int64)})
    image = tf.image.resize(tf.io.decode_jpeg(example["image/encoded"], 3),
                            (SIZE, SIZE)) / 255.0
    label = tf.numpy_function(tick, [example["image/class/label"]],
                              tf.int64, stateful=True)
    return image, tf.ensure_shape(label, [])

  files = tf.data.Dataset.list_files(pattern, shuffle=False)
  return files.interleave(tf.data.TFRecordDataset, cycle_length=4).map(
      parse, num_parallel_calls=tf.data.AUTOTUNE)


def _own_pipeline_resume(pattern: str, *, batch: int, starts: tuple,
                         repeats: int) -> dict:
  """Median seconds to the first batch of a task's own pipeline resumed at
  each step of `starts`, and the records it decoded to get there."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  from trainer.data import pipeline  # pylint: disable=import-outside-toplevel
  out = {"resume_seconds": {}, "decoded": {}}
  for start in starts:
    seconds = []
    for _ in range(repeats):
      count = [0]
      begin = time.perf_counter()
      fn = pipeline.input_fn(_own_pipeline(pattern, count),
                             global_batch_size=batch, training=True, seed=0,
                             shuffle_buffer=256, start_step=start)
      next(iter(fn(tf.distribute.InputContext())))
      seconds.append(time.perf_counter() - begin)
    out["resume_seconds"][str(start)] = statistics.median(seconds)
    out["decoded"][str(start)] = count[0]
  early, late = (str(s) for s in starts)
  out["resume_ratio"] = (out["resume_seconds"][late] /
                         out["resume_seconds"][early])
  return out


def bench_on_disk(repeats: int, size: str) -> dict:
  """The figures of the module docstring, per source."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  num_files, per_file = (8, 128) if size == "full" else (4, 16)
  case = Case("disk", SIZE * SIZE * 3, (256,), 64 if size == "full" else 16,
              40 if size == "full" else 4, 10 if size == "full" else 2,
              image_shape=(SIZE, SIZE, 3))
  epoch_steps = num_files * per_file // case.batch
  strategy = tf.distribute.OneDeviceStrategy("/cpu:0")
  out = {"images": num_files * per_file, "stored": [IMAGE, IMAGE],
         "decoded": [SIZE, SIZE], "batch": case.batch}
  with tempfile.TemporaryDirectory() as root:
    sources = {k: _source(v) for k, v in write_jpegs(
        root, num_files=num_files, per_file=per_file).items()}
    from trainer.data import files as files_lib  # pylint: disable=import-outside-toplevel
    contenders = {}
    for name, source in sources.items():
      fn = files_lib.train_fn(source.train, global_batch_size=case.batch,
                              seed=0, window=256)
      x, y = next(iter(fn(tf.distribute.InputContext())))
      memory = tf.data.Dataset.from_tensors((x, y)).repeat()
      contenders[f"{name}/pipeline"] = _Pipeline(fn)
      contenders[f"{name}/step"] = Ours(case, strategy, data=memory,
                                        persistent=True)
      contenders[f"{name}/fed"] = Ours(case, strategy, data=fn,
                                       persistent=True)
    verbosity = logging.get_verbosity()
    logging.set_verbosity(logging.ERROR)  # the fed runs' input-bound warnings
    try:
      seconds = time_interleaved(contenders, case.steps, repeats)
    finally:
      logging.set_verbosity(verbosity)
    for name, source in sources.items():
      r = {kind: case.steps * case.batch / statistics.median(
          seconds[f"{name}/{kind}"]) for kind in ("pipeline", "step", "fed")}
      r = {f"{kind}_examples_per_sec": v for kind, v in r.items()}
      r["input_bound"] = (r["pipeline_examples_per_sec"] <
                          r["step_examples_per_sec"])
      # on shared cores the pipeline and the step compete: fed < both
      r["fed_fraction"] = (r["fed_examples_per_sec"] /
                           r["step_examples_per_sec"])
      steps = epoch_steps  # one epoch's worth of global batches
      one = _decoded(source.train, batch=case.batch, steps=steps, pipelines=1)
      two = _decoded(source.train, batch=case.batch, steps=steps, pipelines=2)
      r.update(trained=steps * case.batch, decoded_1_pipeline=one,
               decoded_2_pipelines=two, decoded_ratio=two / one)
      early, late = 3, 50 * epoch_steps + 3
      r["resume_seconds"] = {str(k): _resume_seconds(
          source.train, batch=case.batch, start_step=k, repeats=repeats)
                             for k in (early, late)}
      r["resume_ratio"] = r["resume_seconds"][str(late)] / r[
          "resume_seconds"][str(early)]
      out[name] = r
    out["own_pipeline"] = _own_pipeline_resume(
        os.path.join(root, "train-*.tfrecord"), batch=case.batch,
        starts=(3, 50 * epoch_steps + 3), repeats=repeats)
  return out


def report_rows(disk: dict) -> list[str]:
  """The on-disk rows of the bench table."""
  rows = []
  for name in ("tfrecord", "image_folder"):
    r = disk[name]
    rows.append(
        f"disk        {name:<15} pipeline {r['pipeline_examples_per_sec']:.0f}"
        f" ex/s, step {r['step_examples_per_sec']:.0f}, fed "
        f"{r['fed_examples_per_sec']:.0f} ({r['fed_fraction']:.2f} of the step)"
        f"{'  INPUT-BOUND' if r['input_bound'] else ''}")
    early, late = r["resume_seconds"]
    rows.append(
        f"disk        {name:<15} decoded {r['decoded_1_pipeline']} (1) vs "
        f"{r['decoded_2_pipelines']} (2 pipelines) for {r['trained']}: "
        f"x{r['decoded_ratio']:.2f}; resume at step {late} vs {early}: "
        f"x{r['resume_ratio']:.2f}")
  own = disk.get("own_pipeline")
  if own:
    (early, late), decoded = own["resume_seconds"], own["decoded"]
    rows.append(
        f"disk        {'own pipeline':<15} resume at step {late} vs {early}: "
        f"x{own['resume_ratio']:.2f}, decoding {decoded[late]} vs "
        f"{decoded[early]} records to the first batch")
  return rows
