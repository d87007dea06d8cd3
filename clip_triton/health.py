"""A canary health check: one real request through each ensemble.

Triton's /v2/health/ready only says models are loaded. A python-backend stub that died (killed, OOM)
is not restarted by Triton 2.51 and not reflected in readiness: every request to that model then
fails with "Stub process ... is not healthy" while the server reports ready. The canary catches it;
use it as the liveness check (Kubernetes, compose) and in `clip-triton serve`'s watchdog.
"""

from __future__ import annotations

import io
from functools import lru_cache

import numpy as np

from .contract import EMBEDDING_OUTPUT, IMAGE_ENSEMBLE, IMAGE_INPUT, TEXT_ENSEMBLE, TEXT_INPUT


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
            for model, name, item in ((TEXT_ENSEMBLE, TEXT_INPUT, b"a photo of a cat"),
                                      (IMAGE_ENSEMBLE, IMAGE_INPUT, canary_image())):
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
