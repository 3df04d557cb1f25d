"""The launcher end to end, in subprocesses: training, --testing, bad input."""

import concurrent.futures
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, run_module, run_modules
from test_config import TYPOS, write_config_file
from trainer.callbacks import read_metrics

pytestmark = pytest.mark.slow


def test_digits_mirrored_mixed_float16_reaches_95_percent(tmp_path):
  workdir = tmp_path / "run"
  proc = run_module(
      "launch.train", "--config=configs/digits.py", f"--workdir={workdir}",
      "--config.distribution.strategy=mirrored",
      "--config.distribution.num_cpu_devices=2",
      "--config.precision.policy=mixed_float16")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "mixed_float16 on a machine with no GPU" in proc.stderr
  records = read_metrics(workdir)
  evals = [r for r in records if "eval/accuracy" in r]
  trains = [r for r in records if "train/loss" in r]
  assert evals[-1]["step"] == 600 and evals[-1]["eval/accuracy"] >= 0.95
  assert evals[-1]["eval/num_examples"] == 300
  assert all(r["train/loss_scale"] > 0 for r in trains)
  assert all("train/examples_per_sec" in r for r in trains)
  assert trains[-1]["train/loss"] < trains[0]["train/loss"]
  config = json.loads((workdir / "config.json").read_text())
  assert config["precision"]["policy"] == "mixed_float16"
  assert config["distribution"]["num_cpu_devices"] == 2
  assert (workdir / "checkpoints" / "ckpt-600.index").exists()
  assert "done: 600 steps" in proc.stdout
  # A quiet console: our lines, not TensorFlow's start-up lines (C++, before
  # absl), its INFO at every checkpoint and all-reduce, or tf.data's warning.
  for noise in ("oneDNN custom operations", "cuda drivers", "cuInit",
                "absl::InitializeLog",
                "Sharding callback", "INFO:tensorflow", "then broadcast",
                "UserWarning"):
    assert noise not in proc.stderr, (noise, proc.stderr[:2000])
  assert "strategy MirroredStrategy with 2 replica(s)" in (
      proc.stderr.splitlines()[0])


def test_same_command_on_a_finished_workdir_resumes_and_does_nothing(tmp_path):
  args = ("launch.train", "--config=configs/digits.py",
          f"--workdir={tmp_path}", "--config.train.steps=100",
          "--config.train.checkpoint_every=50")
  assert run_module(*args).returncode == 0
  lines = len(read_metrics(tmp_path))
  files = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
  again = run_module(*args)
  assert again.returncode == 0, again.stderr[-2000:]
  assert "restored" in again.stderr and "(step 100)" in again.stderr
  assert len(read_metrics(tmp_path)) == lines
  # It says so and writes nothing (it saved ckpt-100 again and printed a
  # progress bar of 0/1 steps).
  assert again.stdout.strip().splitlines()[-1].startswith(
      "already at step 100: nothing to train, nothing written; eval "
      "accuracy 0.")
  assert "0/1" not in again.stdout
  assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == files


MOCK_TFDS = {  # config -> tiny overrides so the CPU run takes seconds
    "configs/mnist.py": ["--config.data.global_batch_size=8",
                         "--config.data.eval_batch_size=8"],
    "configs/cifar10_resnet.py": ["--config.data.global_batch_size=8",
                                  "--config.data.eval_batch_size=8",
                                  "--config.model.depth=1",
                                  "--config.model.width=8"],
    "configs/imagenet_resnet50.py": ["--config.data.global_batch_size=4",
                                     "--config.data.eval_batch_size=4",
                                     "--config.data.image_size=32"],
}


def test_testing_mode_passes_on_digits_without_workdir():
  proc = run_module("launch.train", "--config=configs/digits.py", "--testing")
  assert proc.returncode == 0, proc.stderr[-3000:]
  verdict = proc.stdout.strip().splitlines()[-1]
  assert verdict.startswith("testing: PASS configs/digits.py: 6 steps on ")
  assert "CPU:0" in verdict


@pytest.fixture(scope="module")
def mock_tfds_runs(tmp_path_factory) -> dict:
  """--testing on each TFDS config with mock data, side by side:
  {config: (CompletedProcess, its workdir)}."""

  def testing(config, workdir):
    return subprocess.run(
        [sys.executable, "tests/mock_tfds_launch.py", f"--config={config}",
         "--testing", f"--workdir={workdir}", *MOCK_TFDS[config]],
        cwd=ROOT, capture_output=True, text=True, timeout=600, check=False,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2",
                 MOCK_TFDS_EXAMPLES="24"))

  workdirs = {c: tmp_path_factory.mktemp("mock_tfds") for c in MOCK_TFDS}
  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    futures = {c: pool.submit(testing, c, workdirs[c]) for c in MOCK_TFDS}
    return {c: (f.result(), workdirs[c]) for c, f in futures.items()}


@pytest.mark.parametrize("config", sorted(MOCK_TFDS))
def test_testing_mode_passes_on_tfds_configs_with_mock_data(config,
                                                            mock_tfds_runs):
  proc, workdir = mock_tfds_runs[config]
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.strip().splitlines()[-1].startswith(
      f"testing: PASS {config}: 6 steps")
  assert not (workdir / "checkpoints").exists()  # testing keeps none
  assert read_metrics(workdir)[-1]["eval/num_examples"] > 0


def test_testing_mode_fails_on_a_diverging_config():
  proc = run_module("launch.train", "--config=configs/digits.py", "--testing",
                    "--config.optimizer.learning_rate=1e30")
  assert proc.returncode == 1
  assert proc.stdout.strip().splitlines()[-1].startswith(
      "testing: FAIL configs/digits.py")


# Through the launcher, one case per way bad input is reported: a flag that
# does not parse, a section that does not exist, a value validate() refuses,
# and errors found later (data, cluster, callbacks, task, XLA); each must be
# one `error:` line, exit 2 and no workdir. tests/test_config.py checks the
# messages of many more bad values in-process (the same path).
BAD_INPUT = [
    (["--config.distribution.strategy=bogus"], "unknown distribution.strategy"),
    (["--config.train.steps=many"], "invalid literal for int"),
    (["--config.optimzer.name=sgd"], "did you mean 'optimizer'?"),
    (["--config.train.stpes=5"], "did you mean 'train.steps'?"),
    (["--config.data.name=mnist", "--config.data.data_dir=EMPTY"],
     "is not in data_dir"),
    (["--config.distribution.strategy=multi_worker"], "needs a cluster"),
    (["--config.callbacks.custom=no_such_module:Callback"],
     "cannot be loaded"),
    (["--config.task=configs.regression:Nope"],
     "task 'configs.regression:Nope': configs.regression has no 'Nope'"),
    (["--config.model.name=cnn", "--config.train.deterministic=True",
      "--config.train.jit_compile=True"],
     "do not yet have a deterministic XLA implementation"),
]


@pytest.fixture(scope="module")
def bad_input_runs(tmp_path_factory) -> dict:
  """Every BAD_INPUT case through the launcher, several at once:
  {message: (CompletedProcess, its workdir)}."""
  jobs, workdirs = {}, {}
  for overrides, message in BAD_INPUT:
    folder = tmp_path_factory.mktemp("bad_input")
    workdirs[message] = folder / "run"
    overrides = [o.replace("EMPTY", str(folder)) for o in overrides]
    env = {"TF_CONFIG": ""} if "multi_worker" in overrides[0] else None
    jobs[message] = (("launch.train", "--config=configs/digits.py",
                      f"--workdir={workdirs[message]}", *overrides),
                     {"env": env, "timeout": 180})
  return {k: (proc, workdirs[k]) for k, proc in run_modules(jobs).items()}


@pytest.mark.parametrize("message", [m for _, m in BAD_INPUT])
def test_bad_input_is_one_line_and_exit_2(message, bad_input_runs):
  proc, workdir = bad_input_runs[message]
  assert proc.returncode == 2
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("error: ") and message in last, proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr
  assert not workdir.exists()  # nothing half-written


@pytest.mark.parametrize("config_arg,message", [
    ("--config=configs/missing.py", "does not exist"),
    ("--config=BROKEN", "cannot load the config"),
])
def test_bad_config_file_is_one_line_and_exit_2(config_arg, message, tmp_path):
  broken = tmp_path / "broken.py"
  broken.write_text("def get_config(:\n")
  proc = run_module("launch.train", config_arg.replace("BROKEN", str(broken)),
                    f"--workdir={tmp_path / 'run'}", timeout=120)
  assert proc.returncode == 2
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("error: ") and message in last


@pytest.fixture(scope="module")
def typo_runs(tmp_path_factory) -> dict:
  """A config file with each typo through the launcher, side by side:
  {line: (CompletedProcess, workdir)}."""
  jobs, workdirs = {}, {}
  for line in TYPO_LINES:
    folder = tmp_path_factory.mktemp("typo")
    workdirs[line] = folder / "run"
    jobs[line] = (("launch.train", f"--config={write_config_file(folder, line)}",
                   f"--workdir={workdirs[line]}"), {"timeout": 120})
  return {k: (proc, workdirs[k]) for k, proc in run_modules(jobs).items()}


TYPO_LINES = ["c.train.stpes = 5", "c.optimzer = {'name': 'sgd'}"]


@pytest.mark.parametrize("line", TYPO_LINES)
def test_a_typo_in_a_config_file_is_one_line_and_exit_2(line, typo_runs):
  proc, workdir = typo_runs[line]
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert proc.stderr.strip().splitlines()[-1] == f"error: {TYPOS[line]}"
  assert not workdir.exists()


def test_user_keys_come_from_the_config_file_and_the_command_line(tmp_path):
  config = write_config_file(
      tmp_path, "c.user.declared = 1; c.user.model = {'heads': 2}")
  runs = run_modules({  # side by side
      "keys": (("launch.train", f"--config={config}", "--testing",
                f"--workdir={tmp_path / 'run'}", "--config.user.declared=7",
                "--config.user.model.heads=8", "--config.user.new=abc",
                "--config.user.nested={'k': (1, 2)}"), {"timeout": 120}),
      "no_section": (("launch.train", f"--config={config}", "--testing",
                      f"--workdir={tmp_path / 'run2'}",
                      "--config.user.sub.x=5"), {"timeout": 120})},
                     processes=2)
  proc = runs["keys"]
  assert proc.returncode == 0, proc.stderr[-2000:]
  saved = json.loads((tmp_path / "run" / "config.json").read_text())
  assert sorted(os.listdir(tmp_path)) == ["my_config.py", "run"]  # no probe
  assert saved["user"] == {"declared": 7, "model": {"heads": 8}, "new": "abc",
                           "nested": {"k": [1, 2]}}
  # A key in a new nested section: its section must exist first.
  proc = runs["no_section"]
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines()[-1] == (
      "error: --config.user.sub.x=5: there is no section 'user.sub' to add a "
      "key to; declare it in the config file (c.user.sub = "
      "ml_collections.ConfigDict()) or set it whole, e.g. "
      "--config.user.sub=\"{'key': 1}\"")
  assert not (tmp_path / "run2").exists()


UNWRITABLE = {  # --workdir -> why it cannot be written (FILE: a file)
    "/proc/no_such_run":
        "creating a file in /proc failed (No such file or directory)",
    "FILE/run": "FILE is a file, not a directory",
    "FILE": "FILE is a file, not a directory",
}


@pytest.fixture(scope="module")
def unwritable_runs(tmp_path_factory) -> dict:
  """Every UNWRITABLE case through the launcher, several at once:
  {case: (CompletedProcess, --workdir, its folder)}."""
  jobs, cases = {}, {}
  for case in UNWRITABLE:
    folder = tmp_path_factory.mktemp("unwritable")
    (folder / "file").write_text("not a directory")
    workdir = case.replace("FILE", str(folder / "file"))
    cases[case] = (workdir, folder)
    jobs[case] = (("launch.train", "--config=configs/digits.py",
                   f"--workdir={workdir}"), {"timeout": 180})
  return {k: (proc, *cases[k]) for k, proc in run_modules(jobs).items()}


@pytest.mark.parametrize("case", UNWRITABLE)
def test_a_workdir_that_cannot_be_written_is_one_line_and_exit_2(
    case, unwritable_runs):
  proc, workdir, folder = unwritable_runs[case]
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert proc.stderr.strip().splitlines()[-1] == (
      f"error: --workdir {workdir} cannot be written: "
      f"{UNWRITABLE[case].replace('FILE', str(folder / 'file'))}; choose a "
      "directory you can write to")
  assert os.listdir(folder) == ["file"]  # the probe left nothing behind


def test_testing_mode_refuses_a_workdir_that_holds_a_run(tmp_path):
  from configs import digits  # pylint: disable=import-outside-toplevel
  from trainer.run import run  # pylint: disable=import-outside-toplevel
  config = digits.get_config()
  config.train.steps, config.callbacks.progress_bar = 20, False
  run(config, str(tmp_path))  # a run in the workdir (trained in-process)
  before = (tmp_path / "metrics.jsonl").read_text()
  proc = run_module("launch.train", "--config=configs/digits.py", "--testing",
                    f"--workdir={tmp_path}")
  assert proc.returncode == 2
  assert "--testing would overwrite the run" in proc.stderr.splitlines()[-1]
  assert (tmp_path / "metrics.jsonl").read_text() == before


def test_bad_input_on_a_run_leaves_it_as_it_was(tmp_path):
  """A rejected command wrote config.json, so the good one that followed
  was refused ('holds a run with a different config')."""
  from configs import digits  # pylint: disable=import-outside-toplevel
  from trainer.errors import DataError  # pylint: disable=import-outside-toplevel
  from trainer.run import run  # pylint: disable=import-outside-toplevel

  def config(steps, batch=64):
    c = digits.get_config()
    c.callbacks.progress_bar = False
    c.train.steps, c.data.global_batch_size = steps, batch
    return c

  run(config(20), str(tmp_path))
  files = lambda: {p.name: p.read_bytes() for p in tmp_path.iterdir()
                   if p.is_file()}
  before = files()
  with pytest.raises(DataError, match="larger than the 1497 training"):
    run(config(40, batch=1600), str(tmp_path))
  assert files() == before
  assert run(config(40), str(tmp_path)).steps == 40
