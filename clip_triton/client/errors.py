"""The client's errors: what failed, and what to do next (``message`` and ``hint``).

Every error is a :class:`~clip_triton.errors.ClipTritonError`. The bottom layer of the client: it
imports nothing else from it.
"""

from __future__ import annotations

import numpy as np

from clip_triton.errors import ClipTritonError

DEADLINE_HINT = (
    "the server is busy, not down: raise --timeout (seconds per request; timeout= in Python) "
    "or lower --batch-size / --concurrency"
)


class ClipClientError(ClipTritonError):
    """A request failed for a reason other than bad items (server down, deadline, misconfiguration).

    A :class:`~clip_triton.errors.ClipTritonError`: ``message`` says what happened, ``hint`` what to do.
    """

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message, hint)


class ServerUnavailable(ClipClientError):
    """The server could not be reached (or stayed unreachable for ``retry_seconds``)."""


class DeadlineExceeded(ClipClientError):
    """A request missed its deadline: the server is slower than the deadline allowed, not down."""


class UnknownLanguage(ClipClientError, ValueError):
    """A ``language=`` the served model does not have (only NLLB models name languages), refused before
    any request."""


class ItemErrors(ClipClientError):
    """Some items were refused. ``errors`` maps input index -> reason; ``embeddings`` holds the
    other rows (rows of failed items are NaN), so good results are never lost."""

    def __init__(self, errors: dict[int, str], embeddings: np.ndarray):
        self.errors = dict(sorted(errors.items()))
        self.embeddings = embeddings
        first = next(iter(self.errors.items()))
        super().__init__(f"{len(self.errors)} of {len(embeddings)} items failed; first: index {first[0]}: {first[1]}")

    def __reduce__(self):
        return (type(self), (self.errors, self.embeddings))


class JobFailed(ClipClientError):
    """A job stopped on a failure that retries did not outlast. Nothing answered is lost:
    ``embeddings`` holds every row answered (others NaN), ``answered`` their indices, ``errors`` the
    items refused so far; ``cause`` is the failure (a :class:`ClipClientError` with its hint)."""

    def __init__(self, cause: ClipClientError, embeddings: np.ndarray, answered: list[int], errors: dict[int, str]):
        super().__init__(f"{cause.message} ({len(answered)} of {len(embeddings)} items answered before it)", cause.hint)
        self.cause = cause
        self.embeddings, self.answered, self.errors = embeddings, sorted(answered), dict(sorted(errors.items()))

    def __reduce__(self):
        return (type(self), (self.cause, self.embeddings, self.answered, self.errors))


class JobInterrupted(KeyboardInterrupt):
    """Ctrl-C (or any interruption) during a job: queued requests were dropped and in-flight ones
    cancelled at once. A ``KeyboardInterrupt``, so callers that do not look stop as usual; those that
    do find every row answered before it in ``embeddings`` (others NaN), ``answered`` and ``errors``."""

    def __init__(self, embeddings: np.ndarray, answered: list[int], errors: dict[int, str]):
        super().__init__(f"interrupted: {len(answered)} of {len(embeddings)} items answered")
        self.embeddings, self.answered, self.errors = embeddings, sorted(answered), dict(sorted(errors.items()))
