"""Exceptions raised for bad user input.

Every check that can fail on user input raises one of these *before* heavy work starts, with a message
that names the offending value and says how to fix it. The CLI prints the message without a traceback.
"""


class CBQError(Exception):
    """Base class of every user-facing error of cbq-lightning."""


class ConfigError(CBQError, ValueError):
    """A configuration value is invalid (out of range, inconsistent with the model, ...)."""


class ModelSourceError(CBQError, ValueError):
    """The model cannot be found or its architecture is not supported."""


class DataError(CBQError, ValueError):
    """The calibration or evaluation data is missing or too small."""


class TrainingError(CBQError, RuntimeError):
    """Training produced an unusable result (e.g. a non-finite loss)."""


class FileFormatError(CBQError, ValueError):
    """A file the tool reads is missing, truncated or not what it should be (the message names it)."""


class OutputError(CBQError, OSError):
    """An output cannot be written (full disk, read-only or forbidden folder); earlier outputs are intact."""


class OutputInUse(OutputError):
    """Another live run holds the output folder's lock (:mod:`cbq_lightning.lock`); nothing was changed."""


class RunStopped(CBQError):
    """The run was asked to stop (SIGTERM) and stopped at a safe point; the same command resumes it."""
