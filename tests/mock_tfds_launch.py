"""Runs `launch.train` with TFDS mocked by `tfds.testing.mock_data`.

There is no network here, so real TFDS datasets cannot be downloaded; this is
the one thing the tests mock. Usage: python tests/mock_tfds_launch.py
[launch.train flags]. MOCK_TFDS_EXAMPLES sets the examples per split.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# pylint: disable=wrong-import-position
import tensorflow_datasets as tfds
from absl import app

from launch import train

if __name__ == "__main__":
  with tfds.testing.mock_data(
      num_examples=int(os.environ.get("MOCK_TFDS_EXAMPLES", "64"))):
    app.run(train.main, flags_parser=train.parse_flags)
