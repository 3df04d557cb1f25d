"""How long `Trainer.fit` trains: epochs and global steps, in Keras' terms."""

import dataclasses

from trainer import inputs


@dataclasses.dataclass(frozen=True)
class FitPlan:
  """How long `fit` trains, in epochs and global steps.

  Attributes:
    epochs: the epoch index to stop at.
    steps_per_epoch: steps per epoch, or None: until the data runs out.
    total_steps: the global step to stop at, or None (epochs of unknown
      length).
    fresh_pass_each_epoch: a finite dataset trained by `epochs`: each epoch
      is one new pass over it (Keras' meaning); else one stream throughout.
  """
  epochs: int
  steps_per_epoch: int | None
  total_steps: int | None
  fresh_pass_each_epoch: bool

  @classmethod
  def make(cls, train, *, epochs, steps, steps_per_epoch) -> "FitPlan":
    for name, value in (("epochs", epochs), ("steps", steps),
                        ("steps_per_epoch", steps_per_epoch)):
      if value is not None and (not isinstance(value, int) or value < 1):
        raise ValueError(f"`{name}` must be a positive int, got {value!r}")
    if steps is not None:
      per_epoch = steps_per_epoch or steps
      return cls(-(-steps // per_epoch), per_epoch, steps, False)
    epochs = 1 if epochs is None else epochs
    per_epoch = steps_per_epoch or inputs.batches_per_pass(train)
    if per_epoch is None and not inputs.is_finite(train):
      raise ValueError("`steps_per_epoch` is required with `epochs` when the "
                       "data does not end (or is not a tf.data.Dataset)")
    return cls(epochs, per_epoch, per_epoch and epochs * per_epoch,
               inputs.is_finite(train))

  def epoch_of(self, step: int) -> int:
    return step // self.steps_per_epoch if self.steps_per_epoch else 0

  def epoch_start(self, epoch: int, step: int) -> int:
    return epoch * self.steps_per_epoch if self.steps_per_epoch else step

  def epoch_end(self, epoch_start: int) -> int | None:
    if self.steps_per_epoch is None:
      return None
    end = epoch_start + self.steps_per_epoch
    return end if self.total_steps is None else min(end, self.total_steps)

  def done(self, step: int) -> bool:
    return self.total_steps is not None and step >= self.total_steps
