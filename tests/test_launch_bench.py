"""The benchmark runs end to end at a tiny size and writes a valid report
(the numbers themselves are judged in the report, never in a test)."""

import json

import pytest

from conftest import run_module

pytestmark = pytest.mark.slow


def test_tiny_benchmark_prints_the_table_and_writes_every_figure(tmp_path):
  path = tmp_path / "bench.json"
  proc = run_module("launch.bench", "--size=tiny", "--repeats=1",
                    f"--json={path}", timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.loads(path.read_text())
  assert report["machine"]["cores"] >= 1 and report["machine"]["tensorflow"]
  for case in ("overhead", "compute"):
    r = report[case]
    for contender in ("trainer", "trainer_xla", "keras_fit", "keras_fit_xla"):
      assert r[contender]["examples_per_sec"] > 0
      assert r[contender]["step_time_ms"] > 0
      assert len(r[contender]["seconds"]) == 1
    assert r["ratio"] == pytest.approx(
        r[r["trainer_best"]]["median_seconds"] /
        r[r["keras_best"]]["median_seconds"])
    assert r["trainer_best"] in ("trainer", "trainer_xla")
    assert r["keras_best"] in ("keras_fit", "keras_fit_xla")
  for name in ("bare_matmul", "model_matmuls"):
    assert len(report["compute"][name]["seconds"]) == 1
  assert report["matmul"]["fraction_of_model_matmuls"] > 0
  assert 0 < report["matmul"]["fraction"]
  assert report["matmul"]["matmul_gflops"] > 0
  assert report["devices"]["1_devices"]["speedup"] == 1.0
  assert report["devices"]["2_devices"]["examples_per_sec"] > 0
  assert report["input"]["fraction"] > 0
  for source in ("tfrecord", "image_folder"):
    disk = report["disk"][source]
    for kind in ("pipeline", "step", "fed"):
      assert disk[f"{kind}_examples_per_sec"] > 0
    # one epoch's worth: what was trained, decoded once (plus read-ahead)
    assert disk["trained"] <= disk["decoded_1_pipeline"] < 2 * disk["trained"]
    assert disk["decoded_ratio"] < 1.5
    assert disk["resume_ratio"] > 0
  own = report["disk"]["own_pipeline"]  # a task's tf.data pipeline resumed
  assert own["resume_ratio"] > 0 and len(own["decoded"]) == 2
  early, late = sorted(own["decoded"], key=int)
  assert own["decoded"][late] < 2 * own["decoded"][early] + 64  # no replay
  for line in ("trainer/keras time", "bare matmul", "own matmuls run bare",
               "stream/memory", "disk        tfrecord", "disk        image_folder",
               "disk        own pipeline"):
    assert line in proc.stdout


def test_the_step_matmuls_count_the_model_flops():
  from launch.bench_contenders import cases  # pylint: disable=import-outside-toplevel
  for case in cases("full").values():
    flops = sum(2 * r * i * c for r, i, c, _, _ in case.train_matmuls())
    assert flops == case.train_flops_per_example() * case.batch
