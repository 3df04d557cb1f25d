"""Processes, devices and agreement: what a tf.distribute job needs around
the step.

  strategy.py    build_strategy (one device, mirrored, multi-worker from
                 TF_CONFIG or SLURM), logical CPU devices, is_chief
  agreement.py   WorkerAgreement: every worker takes the same decision
                 (stop, learning rate, preemption) after each hook
  watchdog.py    Watchdog: ends a worker stuck without host-loop progress
  stop_signals.py  SIGTERM and Ctrl-C: a preemption; a second Ctrl-C stops
                 at once

May import: trainer.errors only.
"""
