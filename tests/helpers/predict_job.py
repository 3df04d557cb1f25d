"""One worker of a 2-worker predict job (tests/test_fit_keras_api.py), started
by `launch.local --module=predict_job -- --out=DIR`: builds the same model
on every worker under MultiWorkerMirroredStrategy, predicts 100 rows in
batches of 32 and saves the result and the model's own outputs to DIR."""

import json
import os
import sys

import keras
import numpy as np


def main() -> None:
  out = next(a.split("=", 1)[1] for a in sys.argv[1:]
             if a.startswith("--out="))
  import trainer  # pylint: disable=import-outside-toplevel
  from trainer.fit.trainer import Trainer  # pylint: disable=import-outside-toplevel
  strategy = trainer.build_strategy("multi_worker")
  index = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
  rng = np.random.default_rng(0)
  x = rng.random((100, 10), dtype=np.float32)
  with strategy.scope():
    keras.utils.set_random_seed(7)
    model = keras.Sequential([keras.Input((10,)),
                              keras.layers.Dense(16, activation="relu"),
                              keras.layers.Dense(10)])
  runner = Trainer(model=model, optimizer=keras.optimizers.SGD(0.1),
                   loss="SparseCategoricalCrossentropy", strategy=strategy)
  predicted = runner.predict(x, batch_size=32)
  np.save(os.path.join(out, f"predict_{index}.npy"), predicted)
  np.save(os.path.join(out, f"model_{index}.npy"), model(x).numpy())


if __name__ == "__main__":
  main()
