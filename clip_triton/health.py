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
import secrets
import time

import numpy as np

from .contract import (
    EMBEDDING_OUTPUT,
    IMAGE_INPUT,
    METRICS_PORT,
    STUB_NOT_HEALTHY,
    TEXT_INPUT,
    ModelNames,
)

STUB_DEAD = STUB_NOT_HEALTHY
UNREACHABLE = ("StatusCode.UNAVAILABLE", "Connection refused", "failed to connect")


def canary_image(nonce: int = 0) -> bytes:
    """A small PNG; its colour comes from ``nonce``, so each canary is a new request."""
    from PIL import Image  # noqa: PLC0415

    buffer = io.BytesIO()
    colour = (nonce & 0xFF, (nonce >> 8) & 0xFF, (nonce >> 16) & 0xFF)
    Image.new("RGB", (32, 24), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def canary_items() -> tuple[bytes, bytes]:
    """(text, image) never sent before: Triton's response cache (repo --response-cache) would answer a
    repeated canary itself, and a dead tokenizer, preprocess or encoder stub would go unnoticed."""
    nonce = secrets.randbits(24)
    return f"a photo of a cat, canary {nonce:06x}".encode(), canary_image(nonce)


def served_names(client) -> list[ModelNames]:
    """Every served model's names on a server, from its ready models (an unnamed statistics request:
    open where the repository index is an admin API)."""
    from .client.core import index_names  # noqa: PLC0415

    return ModelNames.served_in(index_names(client.get_inference_statistics(as_json=True)))


def canary(url: str, timeout: float = 10.0) -> tuple[bool, str]:
    """(healthy, reason): both ensembles of every served model answer a real request with a finite,
    normalised embedding, all within ``timeout`` seconds together."""
    import tritonclient.grpc as grpcclient  # noqa: PLC0415

    text, image = canary_items()
    deadline = time.monotonic() + timeout
    try:
        client = grpcclient.InferenceServerClient(url)
        try:
            served = served_names(client)
            if not served:
                return False, "no clip_image ensemble is ready"
            pairs = [(names.text, TEXT_INPUT, text) for names in served] + [
                (names.image, IMAGE_INPUT, image) for names in served
            ]
            for model, name, item in pairs:
                tensor = grpcclient.InferInput(name, [1, 1], "BYTES")
                tensor.set_data_from_numpy(np.array([[item]], dtype=object))
                left = max(deadline - time.monotonic(), 0.01)
                out = client.infer(model, [tensor], client_timeout=left).as_numpy(EMBEDDING_OUTPUT)
                if out is None or not np.isfinite(out).all() or abs(float(np.linalg.norm(out)) - 1) > 1e-3:
                    return False, f"{model} returned an invalid embedding"
        finally:
            client.close()
    except Exception as exc:  # noqa: BLE001 (any failure is unhealthy)
        message = exc.message() if callable(getattr(exc, "message", None)) else str(exc)
        return False, f"{type(exc).__name__}: {message}"
    return True, "ok"


def completed_requests(metrics_url: str, timeout: float = 5.0, models: tuple[str, ...] | None = None) -> float | None:
    """Requests Triton has completed successfully so far, or None if unreachable.

    All models by default, or only `models` (e.g. the ensembles, to count what clients asked for).
    The counter includes model warm-up, which Triton runs at load (every bucket x batch size, 85
    inferences on the tiny repository): compare counts with a baseline, never with a fixed number.
    """
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
            if models is not None and not any(f'model="{m}"' in line for m in models):
                continue
            total += float(line.rsplit(" ", 1)[1])
    return total


def metrics_url_for(grpc_url: str, metrics_port: int = METRICS_PORT) -> str:
    host = grpc_url.rsplit(":", 1)[0] if ":" in grpc_url else grpc_url
    return f"http://{host}:{metrics_port}/metrics"


# Completions are looked for over at least this long before a failed canary counts as evidence of
# death: on a saturated server one request can take seconds, so a window as short as a 50 ms canary
# deadline sees none complete although the server is working (it restarted busy servers under load).
MIN_WINDOW_S = 5.0
# Each metrics read inside a probe waits at most this long (and never past the probe's budget).
METRICS_READ_S = 2.0
# What a probe may take beyond its budget: the last metrics read is bounded by what is left, at least this.
PROBE_SLACK_S = 0.5
# The interpreter's start and imports (measured 0.3 s here), with room for a busy node: an
# orchestrator's probe timeout must cover probe_budget(...) plus this (tests/test_gpu_path.py reads
# docker-compose.yml's and the Kubernetes Deployment's numbers).
STARTUP_MARGIN_S = 3.0


def probe_budget(timeout: float) -> float:
    """The longest a :func:`probe` with this ``timeout`` takes (seconds): the budget is the timeout,
    never under the ``MIN_WINDOW_S`` that busy-vs-dead needs, plus the last read's slack."""
    return max(timeout, MIN_WINDOW_S) + PROBE_SLACK_S


def probe(
    grpc_url: str, metrics_url: str | None, timeout: float = 10.0, counter: dict | None = None
) -> tuple[bool, str]:
    """(alive, reason). Dead only on evidence: a dead stub, no server, or a failed canary while no
    request completed. A canary that fails while requests keep completing means busy, not dead.

    Completions count from ``counter["completed"]`` when given (the reading of the previous probe: the
    watchdog's window is then the whole interval between probes), and over at least ``MIN_WINDOW_S``.
    ``counter`` is updated with the latest reading.

    The whole probe fits in :func:`probe_budget` (``timeout``, at least ``MIN_WINDOW_S``, plus a
    slack): the canary's two requests share one deadline and every metrics read is bounded by what is
    left, so an orchestrator whose probe timeout covers it never kills a probe that would have said
    "busy" (compose's healthcheck and the Kubernetes liveness probe are sized from it).
    """
    started = time.monotonic()
    deadline = started + max(timeout, MIN_WINDOW_S)

    def read() -> float | None:
        left = min(METRICS_READ_S, max(deadline - time.monotonic(), PROBE_SLACK_S))
        return completed_requests(metrics_url, timeout=left) if metrics_url else None

    before = read()
    baseline = before
    if counter is not None and counter.get("completed") is not None and before is not None:
        baseline = min(before, counter["completed"])
    healthy, reason = canary(grpc_url, timeout=max(min(timeout, deadline - time.monotonic()), 0.01))
    after = read()
    while (
        not healthy
        and baseline is not None
        and after is not None
        and after <= baseline
        and STUB_DEAD not in reason
        and not any(marker in reason for marker in UNREACHABLE)
        and time.monotonic() - started < MIN_WINDOW_S
        and time.monotonic() < deadline - 0.25
    ):
        time.sleep(0.25)
        after = read()
    if counter is not None:
        counter["completed"] = after
    if healthy:
        return True, "ok"
    if STUB_DEAD in reason:
        return False, f"a python-backend stub died: {reason}"
    if any(marker in reason for marker in UNREACHABLE):
        return False, f"the server cannot be reached: {reason}"
    if baseline is not None and after is not None and after > baseline:
        return (
            True,
            f"busy: the canary did not finish ({reason}) but {after - baseline:.0f} requests completed meanwhile",
        )
    evidence = "no request completed meanwhile" if after is not None else "and its metrics are unreachable"
    return False, f"the canary failed ({reason}) and {evidence}"
