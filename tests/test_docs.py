"""The README stays true: its Python example runs and its commands are CI's."""

import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT

README = os.path.join(ROOT, "README.md")


def _blocks(language: str) -> list[str]:
  with open(README, encoding="utf-8") as f:
    return re.findall(rf"```{language}\n(.*?)```", f.read(), flags=re.S)


@pytest.mark.slow
def test_python_example_trains_mirrored_mixed_float16_and_prints_it(tmp_path):
  example = tmp_path / "example.py"
  example.write_text(next(b for b in _blocks("python") if "import trainer\n"
                          in b))
  proc = subprocess.run(
      [sys.executable, str(example)], cwd=tmp_path, capture_output=True,
      text=True, timeout=300, check=False,
      env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
  assert proc.returncode == 0, proc.stderr[-3000:]
  last = proc.stdout.strip().splitlines()[-1]
  accuracy, scale = re.fullmatch(
      r"eval accuracy ([\d.]+), loss scale (\d+)", last).groups()
  assert float(accuracy) >= 0.95
  assert int(scale) > 1  # LossScaleOptimizer was in use
  with open(README, encoding="utf-8") as f:
    assert f"It prints `{last}`" in f.read()  # the README quotes the output


@pytest.mark.slow
def test_your_own_experiment_runs_from_an_empty_directory(tmp_path):
  """The 'Your own experiment' section: its two files, its command, run
  from a directory outside the checkout."""
  blocks = _blocks("python")
  (tmp_path / "my_task.py").write_text(
      next(b for b in blocks if "class MyTask" in b))
  (tmp_path / "my_config.py").write_text(
      next(b for b in blocks if "c.task = \"my_task.py:MyTask\"" in b))
  with open(README, encoding="utf-8") as f:
    command = re.search(r"`(python -m launch\.train --config=my_config\.py\s+"
                        r"--workdir=runs/mine)`", f.read()).group(1).split()
  proc = subprocess.run(
      [sys.executable, *command[1:], "--config.callbacks.progress_bar=False"],
      cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False,
      env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
  assert proc.returncode == 0, proc.stderr[-3000:]
  last = proc.stdout.strip().splitlines()[-1]
  accuracy = float(re.search(r"eval accuracy ([\d.]+)", last).group(1))
  assert last.startswith("done: 200 steps") and accuracy >= 0.9, last


def test_ci_runs_the_quickstart_commands():
  install, tests = _blocks("sh")[0].strip().splitlines()
  with open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8") as f:
    ci = f.read()
  assert install in ci
  assert tests in ci
