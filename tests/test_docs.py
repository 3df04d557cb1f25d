"""The README and docs/ stay true: their Python examples run (or are
excerpts of files that do), the config keys they name exist, and the
README's commands are CI's."""

import glob
import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT
from trainer.config import default_config

README = os.path.join(ROOT, "README.md")
PAGES = [README, *sorted(glob.glob(os.path.join(ROOT, "docs", "*.md"))),
         os.path.join(ROOT, "BUILD.md")]
# A fenced block's marker, the line before it: an excerpt of a file (each of
# its code lines is in that file) or a block a test here runs.
_MARKED = re.compile(r"(?:<!-- (excerpt of [\w/.]+|run by tests/test_docs.py)"
                     r" -->\n)?```(\w+)\n(.*?)```", re.S)


def _fenced(language: str, paths=PAGES) -> list[tuple[str, str | None, str]]:
  """(page, marker or None, code) of every `language` block of `paths`."""
  found = []
  for path in paths:
    with open(path, encoding="utf-8") as f:
      found += [(os.path.relpath(path, ROOT), marker or None, code)
                for marker, lang, code in _MARKED.findall(f.read())
                if lang == language]
  return found


def _blocks(language: str, paths=(README,)) -> list[str]:
  return [code for _, _, code in _fenced(language, paths)]


def _run_block(needle: str) -> tuple[str, str]:
  """(page, code) of the one Python block that contains `needle`."""
  hits = [(page, code) for page, _, code in _fenced("python") if needle in code]
  assert len(hits) == 1, (needle, [p for p, _ in hits])
  return hits[0]


# What the run tests below pick out of the docs, one block each.
RUN_BLOCKS = ("import trainer\n", "class MyTask", 'c.task = "my_task.py:MyTask"')


@pytest.mark.slow
def test_python_example_trains_mirrored_mixed_float16_and_prints_it(tmp_path):
  page, code = _run_block("import trainer\n")
  example = tmp_path / "example.py"
  example.write_text(code)
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
  with open(os.path.join(ROOT, page), encoding="utf-8") as f:
    assert f"It prints `{last}`" in f.read()  # the page quotes the output


@pytest.mark.slow
def test_your_own_experiment_runs_from_an_empty_directory(tmp_path):
  """The 'Your own experiment' section: its two files, its command, run
  from a directory outside the checkout."""
  (tmp_path / "my_task.py").write_text(_run_block("class MyTask")[1])
  (tmp_path / "my_config.py").write_text(
      _run_block('c.task = "my_task.py:MyTask"')[1])
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


def _code_lines(text: str) -> list[str]:
  """The code of each line, comments and indentation dropped."""
  lines = [re.sub(r"\s+#.*$|^\s*#.*$", "", line).strip()
           for line in text.splitlines()]
  return [line for line in lines if line]


def test_every_python_block_runs_or_is_an_excerpt_of_a_file_that_does():
  """A block is run by a test here (marked `<!-- run by tests/test_docs.py
  -->`) or is an excerpt of a shipped file (`<!-- excerpt of configs/x.py
  -->`: each of its code lines is in that file), so no example drifts from
  the code."""
  unmarked, drifted, unrun = [], [], []
  for page, marker, code in _fenced("python"):
    if marker is None:
      unmarked.append((page, code.splitlines()[0]))
    elif marker.startswith("excerpt of "):
      with open(os.path.join(ROOT, marker[len("excerpt of "):]),
                encoding="utf-8") as f:
        source = set(_code_lines(f.read()))
      drifted += [(page, line) for line in _code_lines(code)
                  if line not in source]
    elif not any(needle in code for needle in RUN_BLOCKS):
      unrun.append((page, code.splitlines()[0]))
  assert not unmarked, f"mark each block as run or an excerpt: {unmarked}"
  assert not drifted, f"excerpt lines not in their file: {drifted}"
  assert not unrun, f"marked as run, but no test runs them: {unrun}"


# Dotted names in the docs that are Keras' or a file's, not config keys.
NOT_KEYS = {"optimizer.iterations", "model.stop_training", "model.keras",
            "model.save", "model.quantize", "model.fit", "model.compile",
            "optimizer.apply_gradients", "train.sbatch", "train.shuffle",
            "train.stpes"}  # the docs' example of a typo


def _config_keys() -> set[str]:
  keys = set()

  def walk(tree, prefix=""):
    for key, value in tree.items():
      keys.add(prefix + key)
      if hasattr(value, "items"):
        walk(value, f"{prefix}{key}.")

  walk(default_config())
  return keys


def test_every_config_key_the_docs_name_exists():
  """`data.global_batch_size`, `--config.train.steps=...`, `pruning.*`: each
  dotted name under a config section, in the README, docs/ and BUILD.md, is
  a key of trainer/config.py (`user.*` is yours)."""
  keys = _config_keys()
  sections = sorted({k.split(".")[0] for k in keys if "." in k})
  name = re.compile(r"(?<![\w./-])((?:%s)(?:\.[a-z_][a-z0-9_]*)+)(?![\w/(-])"
                    % "|".join(sections))
  files = (".md", ".py", ".json", ".jsonl", ".csv")  # data.md, train.py
  unknown = []
  for path in PAGES:
    with open(path, encoding="utf-8") as f:
      for found in name.finditer(f.read()):
        key = found.group(1)
        if key not in keys and key not in NOT_KEYS and not key.endswith(
            files):
          unknown.append((os.path.relpath(path, ROOT), key))
  assert not unknown, unknown
