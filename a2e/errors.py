"""Typed errors of the core, so callers (the HTTP layer) can map them to status codes."""


class A2EError(Exception):
    """Base class of the errors this package raises on purpose."""


class AudioError(A2EError, ValueError):
    """The client's audio cannot be used: empty, undecodable, non-finite, too long..."""


class AudioTooLongError(AudioError):
    """The audio is longer than the configured maximum."""


class CheckpointError(A2EError):
    """A weights file does not exist, cannot be read safely or does not fit the model."""


class ConfigError(A2EError):
    """A config file is malformed or tries to do more than assign plain values."""


class ModelOutputError(A2EError):
    """The model produced non-finite values: a fault of ours, never sent to a client as numbers."""
