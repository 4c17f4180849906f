"""The package's exception types (one module, imported by every layer).

``InvalidInputError`` is a ``ValueError`` so that callers catching the
standard type keep working; ``BackendError`` and ``TrainingInterrupted``
are ``RuntimeError`` subclasses for the same reason.
"""

__all__ = ["SotcoreError", "InvalidInputError", "InvalidTypeError", "BackendError",
           "TrainingInterrupted"]


class SotcoreError(Exception):
    """Base class of every error sotcore raises on purpose."""


class InvalidInputError(SotcoreError, ValueError):
    """Bad user input: an argument, a file or a field in it (the message names it)."""


class InvalidTypeError(InvalidInputError, TypeError):
    """An argument of the wrong type: both an ``InvalidInputError`` and a ``TypeError``."""


class BackendError(SotcoreError, RuntimeError):
    """A device backend failed, timed out or returned something that is not a bit array."""


class TrainingInterrupted(SotcoreError, RuntimeError):
    """Training stopped because the backend (or anything in a step) failed.

    ``checkpoint`` is the path of the checkpoint written just before the
    failed step (None if no checkpoint path was configured); resuming from it
    continues exactly as if the failure had not happened.
    """

    def __init__(self, message, checkpoint=None):
        super().__init__(message)
        self.checkpoint = checkpoint
