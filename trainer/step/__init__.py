"""The train step: one tf.GradientTape step per replica, correct across replicas.

  builtin.py   TrainStep: the loss, one all-reduce, finiteness, unscale, clip,
               update (the step of every task without its own train_step)
  custom.py    CustomStep: runs a task's own train_step(batch, step), several
               models and optimizers, with the same guarantees
  context.py   StepContext: what a task's own train_step gets (`step`)
  update.py    OptimizerUpdate: one optimizer's update after the all-reduce
               (loss scale, skip on overflow, clip), shared by both steps
  base.py      Step: what both share (global step, after-update hook, the
               host loop's interface, StepOutput) and dense_gradients
  loss.py      ComputeLoss and the per-example loss helpers
  metrics.py   metrics as compile takes them: objects or names ("accuracy")
  replica.py   replica-context primitives both steps share (empty replicas,
               batch-norm statistics, the all-reduce, XLA's refusal)

May import: trainer.optimize, trainer.errors. Never trainer.fit or trainer.run.
"""
