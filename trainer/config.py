"""The config schema: defaults for every key and the checks run before training.

Experiment files in `configs/` start from `default_config()` and override what
they need. `validate()` runs before anything touches the workdir, so bad input
never leaves a half-written run behind. Every key outside `user` must be one
of `default_config()`'s: a typo is an error, in a config file as on the
command line. `user` holds the settings of the user's own code and is never
checked.
"""

import difflib

import ml_collections

from trainer.errors import ConfigError

STRATEGIES = ("auto", "mirrored", "one_device", "multi_worker")
POLICIES = ("float32", "mixed_float16", "mixed_bfloat16")
OPTIMIZERS = ("sgd", "momentum", "adam", "adamw")
SCHEDULES = ("constant", "cosine", "step")
MODES = ("auto", "min", "max")
USER_SECTION = "user"  # the one section validate() leaves alone


def default_config() -> ml_collections.ConfigDict:
  """Every key the framework reads, with its default."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  # The experiment: "package.module:Name" or "path/to/file.py:Name" (see
  # trainer/task.py); the default is the built-in image classification.
  c.task = "trainer.tasks.image_classification:ImageClassification"

  c.data = ml_collections.ConfigDict()
  c.data.name = "digits"  # digits | synthetic | image_folder | tfrecord | any TFDS name
  c.data.global_batch_size = 128  # examples per step, summed over all replicas
  c.data.eval_batch_size = 256  # global
  c.data.data_dir = ""  # TFDS data_dir ("" = TFDS default); image_folder: <dir>/<split>/<label>/<image>
  c.data.image_size = 0  # resize images to this square size (0 = keep)
  c.data.shuffle_buffer = 10_000  # data on disk: examples shuffled together (a window of raw records for files)
  c.data.in_memory = False  # TFDS: hold the train split in memory (exact resume, no replay)
  c.data.skip_bad_records = 0  # files: skip (count, name) up to N records that do not decode; 0 = a bad record ends the run
  c.data.service = ""  # tf.data service dispatcher (host:port): decode training data on its workers
  c.data.train_split = "train"
  c.data.eval_split = "test"
  # tfrecord: globs of tf.train.Example files, encoded image bytes and int64 label keys.
  c.data.train_files = ""
  c.data.eval_files = ""
  c.data.image_key = "image/encoded"
  c.data.label_key = "image/class/label"
  # synthetic only: per-example input shape and examples held in memory.
  c.data.synthetic_shape = (8, 8, 1)
  c.data.synthetic_examples = 4096
  # Classes (synthetic, tfrecord); image_folder sets both from its class
  # folders (sorted: output i is class_names[i]), TFDS the count from its info.
  c.data.num_classes = 10
  c.data.class_names = ()

  c.model = ml_collections.ConfigDict()
  c.model.name = "mlp"  # see trainer.tasks.models.MODELS
  c.model.width = 128  # hidden units (mlp) or base filters (cnn, resnet)
  c.model.depth = 2  # hidden layers (mlp) or blocks per stage (resnet)
  c.model.dropout = 0.0
  c.model.sync_batch_norm = False  # resnet, resnet50: cross-replica batch norm

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.name = "adam"
  c.optimizer.learning_rate = 1e-3
  c.optimizer.momentum = 0.9  # momentum only
  c.optimizer.weight_decay = 0.0  # adamw only
  c.optimizer.global_clipnorm = 0.0  # 0 = no clipping; clips the all-reduced gradient
  c.optimizer.schedule = "constant"  # constant | cosine | step
  c.optimizer.warmup_steps = 0  # cosine: linear warmup from 0
  c.optimizer.decay_steps = ()  # step: global steps where the rate drops
  c.optimizer.decay_factor = 0.1  # step: multiplier at each of decay_steps

  c.train = ml_collections.ConfigDict()
  c.train.steps = 1000
  c.train.steps_per_loop = 50  # steps per host call (one tf.function call)
  c.train.steps_per_epoch = 0  # 0 = one pass over the training set
  c.train.eval_every = 0  # eval at every epoch end, and every N steps if > 0
  c.train.checkpoint_every = 1000  # 0 = only at the end
  c.train.max_checkpoints = 3
  c.train.async_checkpoint = False  # write checkpoints in a background thread
  c.train.nan_recovery = 0  # on a NaN loss: go back to the last checkpoint
  # and skip the batches that led there, at most this many times (0 = stop)
  # micro-batches per replica batch, run in turn: one update per global
  # batch with 1/k of the activation memory (data.global_batch_size stays
  # the examples per update)
  c.train.grad_accum_steps = 1
  c.train.jit_compile = False
  c.train.deterministic = False

  c.pruning = ml_collections.ConfigDict()  # magnitude pruning (trainer/optimize/pruning.py)
  c.pruning.target_sparsity = 0.0  # 0 = off; else the fraction of each kernel zeroed
  c.pruning.initial_sparsity = 0.0
  c.pruning.begin_step = 0
  c.pruning.end_step = 0  # 0 = three quarters of train.steps
  c.pruning.frequency = 100  # steps between mask updates
  c.pruning.power = 3.0  # polynomial decay exponent of the sparsity schedule
  c.pruning.exclude = "^logits$"  # regex of layer names left dense

  c.distribution = ml_collections.ConfigDict()
  c.distribution.strategy = "auto"
  c.distribution.num_cpu_devices = 1  # split the host CPU into N logical devices
  # multi_worker: a worker whose host loop makes no progress (a train loop,
  # an evaluation, a checkpoint save) for this many seconds ends itself
  # (exit 4), so a stuck worker ends the job instead of blocking the others
  # forever (trainer/distribute/watchdog.py); 0 = wait forever. A dead or frozen worker
  # ends the job sooner: TensorFlow's coordination service sees it.
  c.distribution.collective_timeout = 600.0

  c.precision = ml_collections.ConfigDict()
  c.precision.policy = "float32"
  # mixed_float16: a loss scale below this means every step overflows and
  # none is applied: the run has diverged (exit 3, train.nan_recovery)
  c.precision.min_loss_scale = 1.0

  c.callbacks = ml_collections.ConfigDict()
  c.callbacks.progress_bar = True  # Keras Progbar with ETA (chief)
  c.callbacks.tensorboard = True  # scalars in WORKDIR/tensorboard (chief)
  c.callbacks.profile_steps = (0, 0)  # profiler trace of global steps [a, b)
  c.callbacks.csv_log = False  # WORKDIR/log.csv, one row per epoch (chief)
  c.callbacks.early_stopping = ml_collections.ConfigDict()
  c.callbacks.early_stopping.monitor = ""  # "" = off; e.g. val_loss
  c.callbacks.early_stopping.mode = "auto"  # auto | min | max
  c.callbacks.early_stopping.patience = 0  # epochs without improvement
  c.callbacks.early_stopping.min_delta = 0.0
  c.callbacks.early_stopping.restore_best_weights = False
  c.callbacks.best_model = ml_collections.ConfigDict()
  c.callbacks.best_model.monitor = ""  # "" = off; e.g. val_accuracy
  c.callbacks.best_model.mode = "auto"  # auto | min | max
  c.callbacks.best_model.keep = 1  # .keras files kept in WORKDIR/best
  c.callbacks.custom = ""  # comma-separated module:Callback, made with no args

  # Settings of the user's own code (callbacks, layers, tasks): never checked,
  # any keys and nesting.
  c.user = ml_collections.ConfigDict()
  return c


def with_defaults(saved: dict) -> ml_collections.ConfigDict:
  """A saved config (WORKDIR/config.json) with every key added to the
  framework since then set to its default."""

  def merge(base: dict, over: dict) -> dict:
    return {**base, **{k: merge(base[k], v) if isinstance(v, dict) and
                       isinstance(base.get(k), dict) else v
                       for k, v in over.items()}}

  return ml_collections.ConfigDict(merge(default_config().to_dict(), saved))


def _choice(value, allowed, key):
  if value not in allowed:
    raise ConfigError(
        f"unknown {key} {value!r}; use one of: {', '.join(allowed)}")


def _positive(value, key, kind=int):
  if not isinstance(value, (int, float)) or value <= 0 or (
      kind is int and int(value) != value):
    raise ConfigError(f"{key} must be a positive {kind.__name__}, got {value!r}")


def _non_negative(value, key):
  if not isinstance(value, (int, float)) or value < 0:
    raise ConfigError(f"{key} must be >= 0, got {value!r}")


def _dotted_keys(tree: ml_collections.ConfigDict, prefix: str = "") -> list:
  keys = []
  for key in tree.keys():
    keys.append(prefix + key)
    if isinstance(tree[key], ml_collections.ConfigDict):
      keys.extend(_dotted_keys(tree[key], f"{prefix}{key}."))
  return keys


def unknown_key(key: str) -> ConfigError:
  """The error for dotted `key`, which default_config() does not have, with
  the closest key it has."""
  known = _dotted_keys(default_config())
  section, _, leaf = key.rpartition(".")
  siblings = {k.rpartition(".")[2]: k for k in known
              if k.rpartition(".")[0] == section}
  close = ([siblings[k] for k in difflib.get_close_matches(leaf, siblings,
                                                           n=1)] or
           [k for k in known if k.rpartition(".")[2] == leaf][:1] or
           difflib.get_close_matches(key, known, n=1))
  hint = f"; did you mean {close[0]!r}?" if close else ""
  return ConfigError(
      f"unknown config key {key!r} (every key and its default is in "
      f"trainer/config.py; settings of your own code go under "
      f"'{USER_SECTION}.'){hint}")


def check_keys(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError for a key that `default_config()` does not have
  (outside `user`), a section set to a value, or a missing key."""

  def walk(tree, defaults, prefix):
    for key in tree.keys():
      path = prefix + key
      if path == USER_SECTION:
        continue
      if key not in defaults:
        raise unknown_key(path)
      if isinstance(defaults[key], ml_collections.ConfigDict):
        if not isinstance(tree[key], ml_collections.ConfigDict):
          raise ConfigError(f"config key {path!r} is a section of keys, got "
                            f"{tree[key]!r}; set the keys under it instead")
        walk(tree[key], defaults[key], path + ".")
    missing = [k for k in defaults.keys() if k not in tree]
    if missing:
      raise ConfigError(
          f"config key {prefix + missing[0]!r} is missing; start the config "
          "from trainer.config.default_config()")

  walk(config, default_config(), "")


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks what can be checked without TensorFlow; raises ConfigError."""
  check_keys(config)
  _choice(config.distribution.strategy, STRATEGIES, "distribution.strategy")
  _choice(config.precision.policy, POLICIES, "precision.policy")
  _choice(config.optimizer.name, OPTIMIZERS, "optimizer.name")
  _choice(config.optimizer.schedule, SCHEDULES, "optimizer.schedule")
  _positive(config.data.global_batch_size, "data.global_batch_size")
  _positive(config.data.eval_batch_size, "data.eval_batch_size")
  _positive(config.train.steps, "train.steps")
  _positive(config.train.steps_per_loop, "train.steps_per_loop")
  _positive(config.train.grad_accum_steps, "train.grad_accum_steps")
  _positive(config.train.max_checkpoints, "train.max_checkpoints")
  _positive(config.optimizer.learning_rate, "optimizer.learning_rate", float)
  _non_negative(config.precision.min_loss_scale, "precision.min_loss_scale")
  _positive(config.distribution.num_cpu_devices,
            "distribution.num_cpu_devices")
  _non_negative(config.optimizer.global_clipnorm, "optimizer.global_clipnorm")
  _non_negative(config.optimizer.warmup_steps, "optimizer.warmup_steps")
  _non_negative(config.train.eval_every, "train.eval_every")
  _non_negative(config.train.checkpoint_every, "train.checkpoint_every")
  _non_negative(config.train.nan_recovery, "train.nan_recovery")
  _non_negative(config.distribution.collective_timeout,
                "distribution.collective_timeout")
  _non_negative(config.train.steps_per_epoch, "train.steps_per_epoch")
  _non_negative(config.data.skip_bad_records, "data.skip_bad_records")
  _positive(config.optimizer.decay_factor, "optimizer.decay_factor", float)
  if config.optimizer.schedule == "step" and not config.optimizer.decay_steps:
    raise ConfigError("optimizer.schedule=step needs optimizer.decay_steps, "
                      "e.g. --config.optimizer.decay_steps=(3000,6000)")
  if config.data.service and config.train.deterministic:
    raise ConfigError(
        "data.service hands batches to workers first come, first served, "
        "so train.deterministic=True cannot hold; set one of them")
  for key in ("early_stopping", "best_model"):
    _choice(config.callbacks[key].mode, MODES, f"callbacks.{key}.mode")
  _non_negative(config.callbacks.early_stopping.patience,
                "callbacks.early_stopping.patience")
  _positive(config.callbacks.best_model.keep, "callbacks.best_model.keep")
  profile = config.callbacks.profile_steps
  if len(profile) != 2 or not 0 <= profile[0] <= profile[1]:
    raise ConfigError("callbacks.profile_steps must be (first, stop) with "
                      f"0 <= first <= stop, got {profile!r}")
