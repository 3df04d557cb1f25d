"""The config schema in-process: every key outside `user` is checked, in a
config file as through the Python API; `user` takes anything; an old
workdir's config.json still resumes."""

import importlib.util
import json

import ml_collections
import pytest

from trainer import config as config_lib
from trainer.errors import ConfigError, UserError
from trainer.run import run
from trainer.checkpoint.workdir import check_resume_config, read_saved_config

HINT = ("(every key and its default is in trainer/config.py; settings of "
        "your own code go under 'user.')")

TYPOS = {  # a line of a config file -> the error it must give
    "c.train.stpes = 5":
        f"unknown config key 'train.stpes' {HINT}; did you mean "
        "'train.steps'?",
    "c.optimzer = {'name': 'sgd'}":
        f"unknown config key 'optimzer' {HINT}; did you mean 'optimizer'?",
    "c.optimzer = ml_collections.ConfigDict({'name': 'sgd'})":
        f"unknown config key 'optimzer' {HINT}; did you mean 'optimizer'?",
    "c.callbacks.early_stopping.patiense = 3":
        f"unknown config key 'callbacks.early_stopping.patiense' {HINT}; did "
        "you mean 'callbacks.early_stopping.patience'?",
    "c.data.steps = 5":
        f"unknown config key 'data.steps' {HINT}; did you mean 'train.steps'?",
    "c.zzz = 5": f"unknown config key 'zzz' {HINT}",
}


def write_config_file(directory, line: str) -> str:
  """A config file as users write them: default_config() plus `line`."""
  path = directory / "my_config.py"
  path.write_text(
      "import ml_collections\n"
      "from trainer.config import default_config\n\n"
      "def get_config():\n"
      "  c = default_config()\n"
      f"  {line}\n"
      "  return c\n")
  return str(path)


def load_config_file(path: str) -> ml_collections.ConfigDict:
  spec = importlib.util.spec_from_file_location("my_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


@pytest.mark.parametrize("line", sorted(TYPOS))
def test_a_typo_in_a_config_file_is_a_config_error_before_anything_is_written(
    line, tmp_path):
  config = load_config_file(write_config_file(tmp_path, line))
  workdir = tmp_path / "run"
  with pytest.raises(ConfigError) as e:
    run(config, str(workdir))
  assert str(e.value) == TYPOS[line]
  assert not workdir.exists()


def test_the_user_section_takes_any_keys_and_nesting():
  config = config_lib.default_config()
  assert config.user.to_dict() == {}
  config.user.heads = 4
  config.user.model = {"blocks": {"widths": (8, 16)}, "act": "gelu"}
  config.user.model.blocks.new = None
  config_lib.validate(config)


def test_a_missing_key_is_a_config_error():
  config = config_lib.default_config()
  del config.train["steps"]
  with pytest.raises(ConfigError, match="config key 'train.steps' is missing"):
    config_lib.validate(config)


def test_an_old_config_json_without_newer_keys_still_resumes(tmp_path):
  old = config_lib.default_config().to_dict()
  del old["user"], old["train"]["nan_recovery"]  # not there back then
  (tmp_path / "config.json").write_text(json.dumps(old))
  config = config_lib.default_config()
  saved = read_saved_config(str(tmp_path))
  assert check_resume_config(str(tmp_path), config, saved, False) is not None
  config_lib.validate(config_lib.with_defaults(old))


BAD_VALUES = [  # config overrides -> the one-line error (as the launcher prints)
    ({"distribution.strategy": "bogus"}, "unknown distribution.strategy"),
    ({"precision.policy": "float8"}, "unknown precision.policy"),
    ({"data.name": "no_such_dataset"}, "unknown data.name"),
    ({"model.name": "transformer"}, "unknown model.name"),
    ({"distribution.strategy": "mirrored", "distribution.num_cpu_devices": 2,
      "data.global_batch_size": 63}, "cannot be shared evenly"),
    ({"train.steps": 0}, "train.steps must be a positive int"),
    ({"data.global_batch_size": -8},
     "data.global_batch_size must be a positive int"),
    ({"optimizer.learning_rate": 0.0},
     "optimizer.learning_rate must be a positive float"),
    ({"train.nosuch": 1}, "unknown config key 'train.nosuch'"),
    ({"train.stpes": 5}, "did you mean 'train.steps'?"),
    ({"optimizer.schedule": "step"}, "needs optimizer.decay_steps"),
    ({"callbacks.early_stopping.mode": "up"},
     "unknown callbacks.early_stopping.mode"),
    ({"data.global_batch_size": 1600}, "larger than the 1497 training examples"),
]


@pytest.mark.parametrize("overrides, message", BAD_VALUES,
                         ids=[m for _, m in BAD_VALUES])
def test_a_bad_value_is_one_error_line_before_anything_is_written(
    overrides, message, tmp_path):
  """The same path as `launch.train` (tests/test_launch_train.py runs some
  of these through it), in-process: a UserError whose message is one line
  naming the key, and no workdir."""
  from configs import digits  # pylint: disable=import-outside-toplevel
  config = digits.get_config()
  for key, value in overrides.items():
    *path, last = key.split(".")
    node = config
    for part in path:
      node = node[part]
    node[last] = value
  with pytest.raises(UserError) as e:
    run(config, str(tmp_path / "run"))
  assert message in str(e.value) and "\n" not in str(e.value)
  assert not (tmp_path / "run").exists()
