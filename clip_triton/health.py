"""Liveness: is the server dead, as opposed to busy?

Triton's /v2/health/ready only says models are loaded. A python-backend stub that died (killed, OOM)
is not restarted by Triton 2.51 and not reflected in readiness: every request to that model then
fails with "Stub process ... is not healthy" while the server reports ready. A canary request through
each ensemble catches that. But a canary waits in the same queues as user traffic, so on a busy
server it can time out while the server is working hard: slowness is not death. :func:`probe` therefore
declares a server dead only on evidence: the canary says a stub is not healthy, or the server cannot
be reached at all, or the canary fails while Triton's success counters stand still (no request
completed while it waited). `clip-triton health` (Kubernetes liveness, compose healthcheck) and
`clip-triton serve`'s watchdog both use it.
"""

from __future__ import annotations

import io
from functools import lru_cache

import numpy as np

from .contract import EMBEDDING_OUTPUT, IMAGE_ENSEMBLE, IMAGE_INPUT, TEXT_ENSEMBLE, TEXT_INPUT

STUB_DEAD = "is not healthy"  # python backend: "Stub process '<model>_0_0' is not healthy."
UNREACHABLE = ("StatusCode.UNAVAILABLE", "Connection refused", "failed to connect")


@lru_cache(maxsize=1)
def canary_image() -> bytes:
    from PIL import Image  # noqa: PLC0415

    buffer = io.BytesIO()
    Image.new("RGB", (32, 24), (120, 80, 200)).save(buffer, format="PNG")
    return buffer.getvalue()


def canary(url: str, timeout: float = 10.0) -> tuple[bool, str]:
    """(healthy, reason): both ensembles answer a real request with a finite, normalised embedding."""
    import tritonclient.grpc as grpcclient  # noqa: PLC0415

    try:
        client = grpcclient.InferenceServerClient(url)
        try:
            for model, name, item in (
                (TEXT_ENSEMBLE, TEXT_INPUT, b"a photo of a cat"),
                (IMAGE_ENSEMBLE, IMAGE_INPUT, canary_image()),
            ):
                tensor = grpcclient.InferInput(name, [1, 1], "BYTES")
                tensor.set_data_from_numpy(np.array([[item]], dtype=object))
                out = client.infer(model, [tensor], client_timeout=timeout).as_numpy(EMBEDDING_OUTPUT)
                if out is None or not np.isfinite(out).all() or abs(float(np.linalg.norm(out)) - 1) > 1e-3:
                    return False, f"{model} returned an invalid embedding"
        finally:
            client.close()
    except Exception as exc:  # noqa: BLE001 (any failure is unhealthy)
        message = exc.message() if callable(getattr(exc, "message", None)) else str(exc)
        return False, f"{type(exc).__name__}: {message}"
    return True, "ok"


def completed_requests(metrics_url: str, timeout: float = 5.0) -> float | None:
    """Requests Triton has completed successfully so far (all models), or None if unreachable."""
    import http.client  # noqa: PLC0415
    import urllib.request  # noqa: PLC0415

    try:
        with urllib.request.urlopen(metrics_url, timeout=timeout) as response:  # noqa: S310 (operator's URL)
            text = response.read().decode("utf-8", "replace")
    except (OSError, ValueError, http.client.HTTPException):  # unreachable, malformed URL, cut answer
        return None
    total = 0.0
    for line in text.splitlines():
        if line.startswith("nv_inference_request_success{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def metrics_url_for(grpc_url: str, metrics_port: int = 8002) -> str:
    host = grpc_url.rsplit(":", 1)[0] if ":" in grpc_url else grpc_url
    return f"http://{host}:{metrics_port}/metrics"


def probe(grpc_url: str, metrics_url: str | None, timeout: float = 10.0) -> tuple[bool, str]:
    """(alive, reason). Dead only on evidence: a dead stub, no server, or a failed canary while no
    request completed. A canary that fails while requests keep completing means busy, not dead."""
    before = completed_requests(metrics_url) if metrics_url else None
    healthy, reason = canary(grpc_url, timeout=timeout)
    if healthy:
        return True, "ok"
    if STUB_DEAD in reason:
        return False, f"a python-backend stub died: {reason}"
    if any(marker in reason for marker in UNREACHABLE):
        return False, f"the server cannot be reached: {reason}"
    after = completed_requests(metrics_url) if metrics_url else None
    if before is not None and after is not None and after > before:
        return True, f"busy: the canary did not finish ({reason}) but {after - before:.0f} requests completed meanwhile"
    evidence = "no request completed meanwhile" if after is not None else "and its metrics are unreachable"
    return False, f"the canary failed ({reason}) and {evidence}"
