"""Whether a download can start: the one network check of export (weights, tokenizers, configs)."""

from __future__ import annotations

import os


def reachable(url: str, timeout: float = 5.0) -> str | None:
    """None when a TCP connection to ``url``'s host opens within ``timeout``, else why not. Behind a proxy
    (``HTTPS_PROXY``) the download goes through it, so the direct check is skipped."""
    import socket  # noqa: PLC0415
    from urllib.parse import urlsplit  # noqa: PLC0415

    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    parts = urlsplit(url)
    try:
        socket.create_connection(
            (parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)), timeout=timeout
        ).close()
    except OSError as exc:
        return f"{parts.hostname}: {exc.strerror or exc}"
    return None
