"""Thin Triton gRPC client for clip-triton (installed as ``clip_triton.client``).

Needs the ``client`` extra (tritonclient[grpc]); never imports torch.
"""

from clip_triton.facts import ServerFacts

from .aio_client import AsyncClipClient
from .errors import (
    ClipClientError,
    DeadlineExceeded,
    ItemErrors,
    JobFailed,
    JobInterrupted,
    ServerUnavailable,
    UnknownLanguage,
)
from .grpc_client import ClipClient
from .index import EmbeddingIndex, Hit
from .scoring import rank

__all__ = [
    "AsyncClipClient",
    "ClipClient",
    "ClipClientError",
    "DeadlineExceeded",
    "EmbeddingIndex",
    "Hit",
    "ItemErrors",
    "JobFailed",
    "JobInterrupted",
    "ServerFacts",
    "ServerUnavailable",
    "UnknownLanguage",
    "rank",
]
