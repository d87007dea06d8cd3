"""One exception type for everything a user can fix, with the next step to take."""

from __future__ import annotations


class ClipTritonError(Exception):
    """An error the user can act on. ``hint`` says what to do next.

    The CLI prints ``error: <message> (<hint>)`` on one line and exits non-zero;
    library callers can read both parts separately.
    """

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message

    def __reduce__(self):  # keep the hint when raised in a worker process
        return (type(self), (self.message, self.hint))


class VerificationError(ClipTritonError):
    """An exported graph or engine disagrees with the open_clip reference beyond tolerance."""
