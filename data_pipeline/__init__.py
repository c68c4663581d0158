"""Mammogram reading, preprocessing, TFDS datasets, folds and tf.data input. Imports no JAX."""

from data_pipeline.errors import DataError, DeepMILError

__all__ = ["DataError", "DeepMILError"]
