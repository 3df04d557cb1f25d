"""How long `Trainer.fit` trains: epochs and global steps, in Keras' terms."""

import dataclasses
import numbers

from trainer.fit import inputs


@dataclasses.dataclass(frozen=True)
class FitPlan:
  """How long `fit` trains, in epochs and global steps.

  With `steps`, the plan is absolute and resumable: train until the global
  step reaches `steps`, in epochs of `steps_per_epoch` counted from step 0;
  data that runs out ends the run. With `epochs` (Keras' meaning), it counts
  from this call: epochs `initial_epoch` .. `epochs` - 1, each
  `steps_per_epoch` steps or, by default, one pass over a finite dataset
  (a new pass every epoch); with `steps_per_epoch` one iterator goes on
  across epochs and starts again when the data runs out.

  Attributes:
    epochs: the epoch index to stop at.
    first_epoch: the epoch this call starts in.
    steps_per_epoch: steps per epoch, or None: until the data runs out.
    origin: the global step at which epoch 0 starts (steps mode), or None:
      each epoch starts where the last one ended (epochs mode).
    total_steps: the global step to stop at, or None (epochs of unknown
      length).
    new_pass_each_epoch: start the data again at every epoch.
    run_ends_with_data: data that runs out ends the run (steps mode).
  """
  epochs: int
  first_epoch: int
  steps_per_epoch: int | None
  origin: int | None
  total_steps: int | None
  new_pass_each_epoch: bool
  run_ends_with_data: bool

  @classmethod
  def make(cls, train, *, epochs, steps, steps_per_epoch, initial_epoch,
           step: int) -> "FitPlan":
    """`step`: the global step when `fit` is called."""
    for name, value in (("epochs", epochs), ("steps", steps),
                        ("steps_per_epoch", steps_per_epoch)):
      if value is not None and (isinstance(value, bool) or not isinstance(
          value, numbers.Integral) or value < 1):
        raise ValueError(f"`{name}` must be a positive int, got {value!r}")
    if steps is not None:
      per_epoch = int(steps_per_epoch or steps)
      return cls(-(-int(steps) // per_epoch), step // per_epoch, per_epoch,
                 0, int(steps), False, True)
    epochs = 1 if epochs is None else int(epochs)
    if not 0 <= initial_epoch <= epochs:
      raise ValueError(f"`initial_epoch` must be in [0, epochs={epochs}], got "
                       f"{initial_epoch}")
    finite = inputs.is_finite(train)
    per_epoch = steps_per_epoch or inputs.batches_per_pass(train)
    if per_epoch is None and not finite:
      raise ValueError("`steps_per_epoch` is required with `epochs` when the "
                       "data does not end (or is not a tf.data.Dataset)")
    if per_epoch == 0:
      raise ValueError("`x` holds no batches to train on")
    return cls(epochs, initial_epoch, per_epoch and int(per_epoch), None,
               None, finite and steps_per_epoch is None, False)

  def epoch_start(self, epoch: int, step: int) -> int:
    """The global step epoch `epoch` starts at: from step 0 with `steps`
    (a resumed run continues its epoch); the current step with `epochs`
    (an epoch cut short by the end of the data does not lengthen the
    next)."""
    if self.origin is None:
      return step
    return self.origin + epoch * self.steps_per_epoch

  def epoch_end(self, epoch_start: int) -> int | None:
    if self.steps_per_epoch is None:
      return None
    end = epoch_start + self.steps_per_epoch
    return end if self.total_steps is None else min(end, self.total_steps)

  def done(self, step: int) -> bool:
    return self.total_steps is not None and step >= self.total_steps
