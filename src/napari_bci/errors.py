"""Exception types users see.

Every error that reaches a user names the file (or object) and the problem in one line.
The CLI maps :class:`InputError` to exit code 2 and any other :class:`BCIError` to 1; widgets
turn them into napari notifications.
"""

from __future__ import annotations

from os import PathLike


class BCIError(Exception):
    """Base class of napari-bci's user-facing errors."""

    exit_code = 1


class InputError(BCIError, ValueError):
    """Bad user input: a missing, unreadable, corrupt or unsupported file or parameter.

    ``InputError(path, problem)`` formats as ``"<path>: <problem>"``.
    """

    exit_code = 2

    def __init__(self, source: str | PathLike | None, problem: str):
        self.source = None if source is None else str(source)
        self.problem = problem
        super().__init__(problem if source is None else f"{self.source}: {problem}")


class ModelError(BCIError):
    """A generator or checkpoint that cannot be loaded or run."""

    exit_code = 2


class CheckpointSecurityError(ModelError):
    """A checkpoint that would need arbitrary code execution (a pickle) to load."""


class Cancelled(BCIError):
    """Work stopped at the user's request."""
