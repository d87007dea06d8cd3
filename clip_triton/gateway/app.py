"""OpenAI-compatible HTTP gateway in front of the clip-triton ensembles.

* ``POST /v1/embeddings`` (OpenAI schema): ``input`` is a string or a list; an item that is a
  ``data:image/...;base64,`` URL or an http(s) URL is an image (NV-CLIP's convention), anything else
  is text. ``encoding_format`` ``float`` or ``base64`` (little-endian float32, as OpenAI does).
* ``POST /v1/classify``: images and prompts -> for each image every prompt's cosine and softmax
  probability (``logit_scale`` read from the server), ranked.
* ``GET /v1/models``, ``GET /healthz`` (process), ``GET /readyz`` (Triton ready), ``GET /metrics``.

Errors use OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``: 400 naming the bad
item's index, 401 for a missing or wrong key, 404 for an unknown model, 413 for an oversized body,
400 for schema errors, 503 when Triton is unavailable. A caller's bad input never yields a 500.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from typing import Any

from .. import __version__
from .admission import BodyLimit
from .schemas import ApiError
from .settings import GatewaySettings

ClientFactory = Callable[[GatewaySettings], Any]


def triton_client(settings: GatewaySettings):
    """The default client factory: an :class:`~clip_triton.client.AsyncClipClient` on ``triton_url``
    (a comma-separated list of URLs is used in turn)."""
    from clip_triton.client import AsyncClipClient  # noqa: PLC0415

    urls = [u.strip() for u in settings.triton_url.split(",") if u.strip()]
    return AsyncClipClient(
        urls if len(urls) > 1 else urls[0],
        timeout=settings.triton_timeout_s,
        retries=2,
        backoff=0.2,
        prompt_cache_entries=settings.prompt_cache_entries,
    )


def create_app(settings: GatewaySettings, client_factory: ClientFactory = triton_client):
    """The gateway's ASGI app. ``client_factory(settings)`` makes the Triton client when the app starts
    (closed when it stops): tests pass a fake with :class:`~clip_triton.client.AsyncClipClient`'s
    coroutines, and no Triton is needed."""
    from fastapi import Depends, FastAPI, Request  # noqa: PLC0415
    from fastapi.exceptions import RequestValidationError  # noqa: PLC0415
    from fastapi.responses import JSONResponse  # noqa: PLC0415
    from starlette.exceptions import HTTPException  # noqa: PLC0415

    from .routes import Routes  # noqa: PLC0415

    routes = Routes(settings)

    @asynccontextmanager
    async def lifespan(app):
        app.state.client = client_factory(settings)
        app.state.served = None  # {public id: facts}, read from the server (routes.served_models)
        app.state.served_at = 0.0
        app.state.clients = {}  # a client per served model (its own prompt cache), made on first use
        app.state.tokenizers = {}  # the gateway's own, only for servers that do not count tokens
        yield
        for client in app.state.clients.values():
            if client is not app.state.client:
                await client.close()
        await app.state.client.close()

    app = FastAPI(
        title="clip-triton gateway",
        version=__version__,
        lifespan=lifespan,
        docs_url="/docs" if settings.docs else None,
        redoc_url="/redoc" if settings.docs else None,
        openapi_url="/openapi.json" if settings.docs else None,
    )

    # -- errors in OpenAI's shape ------------------------------------------------------------
    @app.exception_handler(ApiError)
    async def _api_error(request, exc: ApiError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _schema_error(request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        return JSONResponse(
            ApiError(
                400,
                f"invalid request: {where or 'body'}: {first.get('msg', 'schema error')}",
                param=where,
                code="invalid_schema",
            ).body(),
            status_code=400,
        )

    @app.exception_handler(HTTPException)
    async def _http_error(request, exc: HTTPException):
        return JSONResponse(
            ApiError(exc.status_code, str(exc.detail), code="http_error").body(), status_code=exc.status_code
        )

    # -- body size, metrics --------------------------------------------------------------------
    async def refuse_body(send, what: str) -> None:
        routes.refused_bodies.inc()
        body = JSONResponse(
            ApiError(413, f"{what}, over the limit of {settings.max_body_bytes} bytes", code="body_too_large").body(),
            status_code=413,
        )
        await body({"type": "http"}, None, send)

    app.add_middleware(BodyLimit, limit=settings.max_body_bytes, refuse=refuse_body, key_problem=routes.key_problem)

    @app.middleware("http")
    async def _metrics(request: Request, call_next):
        started = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        # Labelled by route template, never the raw path: 3,000 distinct 404 paths are one series.
        endpoint = getattr(route, "path", None) or "(unmatched)"
        if endpoint not in ("/metrics", "/healthz"):
            routes.requests_total.labels(endpoint, str(response.status_code)).inc()
            routes.latency.labels(endpoint).observe(time.perf_counter() - started)
        return response

    # -- endpoints -------------------------------------------------------------------------------
    app.add_api_route("/healthz", routes.healthz, methods=["GET"])
    app.add_api_route("/readyz", routes.readyz, methods=["GET"])
    app.add_api_route("/metrics", routes.metrics, methods=["GET"])
    guarded = [Depends(routes.authorise)]
    app.add_api_route("/v1/models", routes.models, methods=["GET"], dependencies=guarded)
    app.add_api_route("/v1/embeddings", routes.embeddings, methods=["POST"], dependencies=guarded)
    app.add_api_route("/v1/classify", routes.classify, methods=["POST"], dependencies=guarded)
    return app
