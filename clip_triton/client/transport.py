"""Triton gRPC specifics shared by the sync and async clients: connections and request tensors.

The module object of ``tritonclient.grpc`` (or ``tritonclient.grpc.aio``) is passed in, so this file
imports no tritonclient itself and the fast tests pass a fake.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from clip_triton.facts import ServerFacts

from .core import output_names


def urls_of(url: str | Sequence[str], owner: str) -> list[str]:
    """The server URLs a client was given: one ``host:port`` / ``dns:///host:port``, or a list."""
    urls = [url] if isinstance(url, str) else list(url)
    if not urls:
        raise ValueError(f"{owner} needs at least one server URL")
    return urls


def connect(grpc, urls: list[str]) -> list:
    """One ``InferenceServerClient`` per URL; a ``dns:`` target balances round-robin over its addresses."""
    return [
        grpc.InferenceServerClient(
            u, channel_args=[("grpc.lb_policy_name", "round_robin")] if u.startswith("dns:") else None
        )
        for u in urls
    ]


def bytes_input(grpc, name: str, payload: list[bytes]):
    """The request's one BYTES input, ``[N, 1]``: one encoded image or UTF-8 text per row."""
    array = np.array(payload, dtype=object).reshape(-1, 1)
    tensor = grpc.InferInput(name, list(array.shape), "BYTES")
    tensor.set_data_from_numpy(array)
    return tensor


def requested_outputs(grpc, facts: ServerFacts, tokens: bool = False) -> list:
    return [grpc.InferRequestedOutput(name) for name in output_names(facts, tokens)]
