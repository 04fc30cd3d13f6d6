"""The one error type users see. The CLI prints ``str(err)`` as one line and exits with status 2."""
from __future__ import annotations


class PrismError(Exception):
    """A user-facing error: one line naming the file or option and the fix."""


class UnknownNameError(PrismError, KeyError):
    """A name that is not registered; ``str()`` is a one-line message listing the valid names."""

    def __str__(self) -> str:  # KeyError quotes its message otherwise
        return self.args[0]
