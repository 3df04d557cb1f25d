"""The Trainer and its loops: what runs the step, in Keras' words.

  trainer.py     Trainer: fit / evaluate / predict / train_steps
  host_loop.py   one host loop: `steps_per_loop` steps in one tf.function
                 call
  epochs.py      the epoch and host loops of fit, the callback hooks around
                 them, evaluation every `eval_every` steps
  logs.py        a host loop's logs (loss, grad norm, input wait...) and the
                 divergence check
  plan.py        what fit was given -> how many epochs, steps, evaluations
  inputs.py      numpy, Dataset or input function -> distributed batches
  evaluation.py  the eval loop (metrics over the whole eval set, exactly)
  predict.py     predict in input order across replicas and workers

May import: trainer.step, trainer.optimize, trainer.distribute,
trainer.callbacks, trainer.data, trainer.errors. Never trainer.run or trainer.checkpoint.
"""
