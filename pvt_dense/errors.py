"""Exceptions raised for bad user input.

Every error a user can trigger with a file, a name or a tensor they pass us is one of these, so that tools can
print one clear line instead of a traceback from deep inside MindSpore or pickle.
"""


class PVTDenseError(ValueError):
    """Base class of all user-facing errors in pvt_dense."""


class CheckpointError(PVTDenseError):
    """A checkpoint file is missing, corrupt, unsafe, or does not fit the model it is loaded into."""


class UnsafeCheckpointError(CheckpointError):
    """A pickle inside a checkpoint refers to a global that weights and training state never need."""


class ImageReadError(PVTDenseError):
    """An image file cannot be decoded into pixels."""


class ConfigError(PVTDenseError):
    """A config key, value or component name is unknown or out of range."""
