"""Small labelled datasets made in a test, as numpy arrays."""

import numpy as np


def features(n: int, features: int = 6, seed: int = 1, classes: int = 3
            ) -> tuple[np.ndarray, np.ndarray]:
  """x float32 [n, features] ~ N(0, 1), y int32 [n] in [0, classes)."""
  rng = np.random.RandomState(seed)
  x = rng.normal(size=(n, features)).astype(np.float32)
  y = rng.randint(0, classes, size=n).astype(np.int32)
  return x, y


def images(n: int, seed: int = 0, classes: int = 10
          ) -> tuple[np.ndarray, np.ndarray]:
  """x float32 [n, 8, 8, 1] ~ U(0, 1), y int32 [n] in [0, classes)."""
  rng = np.random.RandomState(seed)
  return (rng.uniform(size=(n, 8, 8, 1)).astype(np.float32),
          rng.randint(0, classes, size=n).astype(np.int32))
