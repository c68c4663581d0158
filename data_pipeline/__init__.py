"""Mammogram reading, preprocessing, TFDS datasets, folds and tf.data input. Imports no JAX."""

import os as _os

# TensorFlow logs its search for CUDA ("failed call to cuInit") at ERROR level when it is
# imported, unless this is set first (deepmil_jax sets it too, before JAX sets it to 1).
_os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from data_pipeline.errors import DataError, DeepMILError

__all__ = ["DataError", "DeepMILError"]
