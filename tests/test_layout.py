"""trainer/'s packages form layers: a module imports only its own package
and the packages below it (trainer/__init__.py lists the order). Read from
the source, nothing imported."""

import ast
import pathlib

import pytest

TRAINER = pathlib.Path(__file__).resolve().parent.parent / "trainer"
# Top of the import order first; entries on one line may not import each
# other.
ORDER = [
    ["run"],
    ["fit", "export"],
    ["step", "checkpoint"],
    ["task", "tasks", "callbacks"],
    ["optimize"],
    ["config", "distribute", "data"],
    ["layers", "errors", "compat"],
]
RANK = {name: len(ORDER) - i for i, row in enumerate(ORDER) for name in row}


def _entry(module: str) -> str:
  """trainer.fit.trainer -> fit; trainer.run -> run."""
  return module.split(".")[1]


def _imports(path: pathlib.Path) -> set[str]:
  """The trainer.* modules that `path` imports, at any depth."""
  found = set()
  for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
    if isinstance(node, ast.Import):
      found |= {a.name for a in node.names if a.name.startswith("trainer.")}
    elif isinstance(node, ast.ImportFrom) and node.module:
      if node.module == "trainer":
        found |= {f"trainer.{a.name}" for a in node.names}
      elif node.module.startswith("trainer."):
        found.add(node.module)
  return found


MODULES = sorted(p for p in TRAINER.rglob("*.py") if p.name != "__init__.py"
                 or p.parent != TRAINER)


def test_every_entry_of_trainer_has_a_place_in_the_order():
  entries = {p.stem if p.parent == TRAINER else p.parent.name
             for p in TRAINER.glob("*") if p.suffix == ".py" or p.is_dir()}
  entries -= {"__init__", "__pycache__"}
  assert entries == set(RANK)


@pytest.mark.parametrize("path", MODULES,
                         ids=lambda p: str(p.relative_to(TRAINER)))
def test_a_module_imports_only_its_package_and_those_below(path):
  rel = path.relative_to(TRAINER)
  own = rel.parts[0] if len(rel.parts) > 1 else rel.stem
  wrong = sorted(m for m in _imports(path)
                 if _entry(m) != own and RANK[_entry(m)] >= RANK[own])
  assert not wrong, f"{rel} imports {wrong} (rank {RANK[own]})"


def test_every_package_says_what_it_holds():
  for init in TRAINER.glob("*/__init__.py"):
    doc = ast.get_docstring(ast.parse(init.read_text(encoding="utf-8")))
    assert doc and len(doc.splitlines()) >= 3, init


def test_one_set_of_exit_statuses_for_every_entry_point():
  """launch/status.py is the one definition; the watchdog (in the library,
  which does not import the launchers) and train.sbatch repeat one value
  each, pinned here."""
  from launch import restarts  # pylint: disable=import-outside-toplevel
  from launch.status import ExitStatus  # pylint: disable=import-outside-toplevel
  from trainer.distribute import stop_signals  # pylint: disable=import-outside-toplevel
  from trainer.distribute import watchdog  # pylint: disable=import-outside-toplevel
  assert watchdog.EXIT_STALLED == ExitStatus.STALLED
  assert stop_signals.INTERRUPTED == ExitStatus.INTERRUPTED
  sbatch = (TRAINER.parent / "launch" / "slurm" / "train.sbatch").read_text()
  assert f"EXIT_PREEMPTED={int(ExitStatus.PREEMPTED)} " in sbatch
  assert [s for s in range(256) if restarts.restartable(s)] == [1, 4]
  assert restarts.restartable(-9)  # killed by a signal


def test_private_tensorflow_and_keras_names_only_in_compat():
  """Every private access of trainer/ (`protected-access`, an import from
  `tensorflow.python` or `keras.src`) is in compat.py (os._exit aside: the
  standard library's)."""
  found = [f"{p.relative_to(TRAINER)}:{i}" for p in MODULES
           if p.name != "compat.py"
           for i, line in enumerate(p.read_text().splitlines(), 1)
           if ("protected-access" in line and "os._exit" not in line) or
           "tensorflow.python" in line or "keras.src" in line]
  assert not found, found

