"""Thin Triton gRPC client for clip-triton (installed as ``clip_triton.client``).

Needs the ``client`` extra (tritonclient[grpc]); never imports torch.
"""

from .aio_client import AsyncClipClient
from .grpc_client import (
    ClipClient,
    ClipClientError,
    DeadlineExceeded,
    ItemErrors,
    JobFailed,
    JobInterrupted,
    ServerFacts,
    ServerUnavailable,
    rank,
)
from .index import EmbeddingIndex, Hit

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
    "rank",
]
