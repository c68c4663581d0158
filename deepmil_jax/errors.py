"""Errors raised for users' mistakes; all derive from the project's one base, `DeepMILError`."""

from data_pipeline.errors import DataError, DeepMILError


class ConfigError(DeepMILError):
    """A flag or configuration value that cannot work; the message names the flag and the fix."""


class WeightsError(DeepMILError):
    """A pretrained-weights file of the wrong format, or with missing or mis-shaped layers."""


__all__ = ["ConfigError", "DataError", "DeepMILError", "WeightsError"]
