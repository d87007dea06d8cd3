"""Thin Triton gRPC client for clip-triton (installed as ``clip_triton.client``).

Needs the ``client`` extra (tritonclient[grpc]); never imports torch.
"""

from .aio_client import AsyncClipClient
from .grpc_client import ClipClient, ClipClientError, ItemErrors, JobFailed, ServerFacts, rank

__all__ = ["AsyncClipClient", "ClipClient", "ClipClientError", "ItemErrors", "JobFailed", "ServerFacts", "rank"]
