"""Export of a run's model for serving and deployment.

  exporter.py   export(workdir, formats): restore, write each format, the
                report (sizes, the task's metrics per format)
  formats.py    one writer per format (SavedModel, .keras, TFLite, int8)
  signature.py  the serving signature from the model's own inputs/outputs

May import: trainer.checkpoint, trainer.task, trainer.layers, trainer.errors.
"""
