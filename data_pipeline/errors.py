"""The project's one exception hierarchy (here, since data_pipeline must not import deepmil_jax)."""


class DeepMILError(Exception):
    """Base of every error raised for a user's input; the message names the input and the fix."""


class DataError(DeepMILError):
    """A data file, table or folder that cannot be used as it is."""
