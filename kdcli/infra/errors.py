"""Errors that carry their exit code.

The CLI turns each of these into one line on stderr and the exit code below; anything else is a bug.

| code | meaning                                                        |
|------|----------------------------------------------------------------|
| 0    | success                                                        |
| 1    | a requested check failed (``--min-accuracy`` and other gates)  |
| 2    | bad usage, config or input                                     |
| 3    | cache invalid, incomplete, or mismatched with the data/teacher |
| 4    | internal error (a bug in kdcli: please report it), or a training run that diverged (NaN/inf loss) |
| 130  | interrupted (Ctrl-C / SIGINT / SIGTERM)                        |
"""

from __future__ import annotations


class KdError(Exception):
    """Base class: a user-facing problem with a one-line message and an exit code."""

    exit_code = 4

    def __init__(self, message: str, *, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


class CheckFailed(KdError):
    """A gate the user asked for (``--min-accuracy`` ...) was not met."""

    exit_code = 1


class UsageError(KdError):
    """Bad flags, config, model spec or input data."""

    exit_code = 2


class CacheError(KdError):
    """The cache is invalid, incomplete, locked, or does not match the data or the teacher."""

    exit_code = 3


class Diverged(KdError):
    """Training produced a NaN/inf loss or weights: stopped, nothing non-finite saved (exit 4, not a kdcli bug: the
    message says which step and what to change)."""

    exit_code = 4


class Interrupted(KdError):
    exit_code = 130


EXIT_OK = 0
EXIT_CHECK_FAILED = CheckFailed.exit_code
EXIT_USAGE = UsageError.exit_code
EXIT_CACHE = CacheError.exit_code
EXIT_INTERNAL = KdError.exit_code
EXIT_INTERRUPTED = Interrupted.exit_code
