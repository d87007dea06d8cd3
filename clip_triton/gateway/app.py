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


import asyncio
import base64
import binascii
import hmac
import re
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from ..contract import ModelContract, TokenizerSpec, check_served_model_name
from ..errors import ClipTritonError
from ..tokenizer import ClipTokenizer, TextError
from .fetch import FetchError, FetchPolicy, fetch_image

DATA_URL = re.compile(r"^data:([^;,]*)((?:;[^;,]*)*);base64,(.*)$", re.S | re.I)


@dataclass
class GatewaySettings:
    triton_url: str = "localhost:8001"
    api_keys: tuple[str, ...] = ()
    auth: bool = True  # False only when explicitly disabled for local use
    max_body_bytes: int = 64 * 1024 * 1024
    max_items: int = 256
    triton_timeout_s: float = 60.0
    fetch: FetchPolicy = field(default_factory=FetchPolicy)
    max_urls_per_request: int = 16  # image URLs fetched for one request
    max_concurrent_fetches: int = 8  # image URLs being fetched at once, all requests together
    max_templates: int = 64
    max_template_chars: int = 1000
    max_template_texts: int = 256  # prompts x templates encoded for one /v1/classify request
    prompt_cache_entries: int = 256
    docs: bool = False  # /docs, /redoc, /openapi.json: off unless asked for
    served_model_name: str | None = None  # public model id; default: the repository's, else the architecture

    def __post_init__(self):
        if self.served_model_name is not None:
            check_served_model_name(self.served_model_name)
        if self.auth and not self.api_keys:
            raise ClipTritonError("no API keys configured for the gateway",
                                  "set CLIP_TRITON_API_KEYS=key1,key2, or pass --no-auth for local use only")


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _item_error(index: int, reason: str, name: str = "input") -> ApiError:
    return ApiError(400, f"{name}[{index}]: {reason}", param=f"{name}[{index}]", code="invalid_item")


def decode_data_url(value: str) -> bytes:
    match = DATA_URL.match(value)
    if not match:
        raise ValueError("malformed data URL: expected data:image/<type>;base64,<data>")
    if not match.group(1).lower().startswith("image/"):
        raise ValueError(f"data URL is {match.group(1) or 'untyped'}, not an image (expected data:image/...)")
    try:
        return base64.b64decode(match.group(3), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("data URL holds invalid base64") from None


def is_image_reference(value: str) -> bool:
    """A plain string item is an image when it is a ``data:image/`` URL (any other ``data:`` text is
    text: "data: the quick brown fox") or an ``http(s)://`` URL (NV-CLIP's convention); anything else
    is text. A caption that is a URL is sent as ``{"type": "text", "text": ...}`` instead."""
    lowered = value[:16].lower()
    return lowered.startswith(("data:image/", "http://", "https://"))


def is_data_url(value: str) -> bool:
    return value[:5].lower() == "data:"


def classify_item(item, index: int, name: str = "input") -> tuple[str, str]:
    """("text" | "image", value) of one input item: a string (the rule of :func:`is_image_reference`),
    or a typed object ``{"type": "text", "text": ...}`` / ``{"type": "image_url", "image_url": URL or
    {"url": URL}}`` that says which it is (OpenAI's content-part shape)."""
    if isinstance(item, str):
        return ("image" if is_image_reference(item) else "text"), item
    kind = item.get("type")
    if kind == "text" and isinstance(item.get("text"), str):
        return "text", item["text"]
    if kind == "image_url":
        url = item.get("image_url")
        url = url.get("url") if isinstance(url, dict) else url
        if isinstance(url, str) and is_image_reference(url):
            return "image", url
        raise _item_error(index, "image_url must be a data:image/...;base64, URL or an http(s) URL", name)
    raise _item_error(index, 'a typed item is {"type": "text", "text": ...} or {"type": "image_url", '
                             '"image_url": {"url": ...}}', name)


def utf8_error(value: str) -> str | None:
    """Why a string from JSON cannot be sent on (a lone surrogate such as "\\ud800"), or None."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        return f"not valid Unicode text (unpaired surrogate at character {exc.start})"
    return None


class BodyLimit:
    """ASGI middleware: refuse a body over ``limit`` bytes while it arrives, before any other work.

    The declared Content-Length is checked first; a chunked body (no length) is counted chunk by
    chunk, and the 413 goes out as soon as the count passes the limit: the rest is never read.
    """

    def __init__(self, app, limit: int, refuse):
        self.app, self.limit, self.refuse = app, limit, refuse

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.limit:
            return await self.refuse(send, f"request body is {int(declared)} bytes")
        state = {"received": 0, "refused": False}

        async def counted_receive():
            if state["refused"]:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                state["received"] += len(message.get("body", b""))
                if state["received"] > self.limit:
                    state["refused"] = True
                    await self.refuse(send, f"request body is over {state['received']} bytes")
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message):
            if not state["refused"]:  # the app's own answer to a refused body is dropped
                await send(message)

        await self.app(scope, counted_receive, guarded_send)


def create_app(settings: GatewaySettings):
    from fastapi import Depends, FastAPI, Request  # noqa: PLC0415
    from fastapi.exceptions import RequestValidationError  # noqa: PLC0415
    from fastapi.responses import JSONResponse, PlainTextResponse  # noqa: PLC0415
    from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest  # noqa: PLC0415
    from pydantic import BaseModel, Field  # noqa: PLC0415
    from starlette.exceptions import HTTPException  # noqa: PLC0415

    from tritonclient.utils import InferenceServerException  # noqa: PLC0415

    from clip_triton.client import AsyncClipClient, ClipClientError, ItemErrors  # noqa: PLC0415
    from clip_triton.client.grpc_client import template_texts  # noqa: PLC0415

    registry = CollectorRegistry()
    requests_total = Counter("clip_gateway_requests", "HTTP requests", ["endpoint", "status"], registry=registry)
    refused_bodies = Counter("clip_gateway_bodies_refused", "request bodies over the size limit", registry=registry)
    fetch_gate = asyncio.Semaphore(settings.max_concurrent_fetches)
    latency = Histogram("clip_gateway_request_seconds", "request latency", ["endpoint"], registry=registry,
                        buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
    items_total = Counter("clip_gateway_items", "embedded items", ["kind"], registry=registry)

    @asynccontextmanager
    async def lifespan(app):
        urls = [u.strip() for u in settings.triton_url.split(",") if u.strip()]
        app.state.client = AsyncClipClient(urls if len(urls) > 1 else urls[0], timeout=settings.triton_timeout_s,
                                           retries=2, backoff=0.2, prompt_cache_entries=settings.prompt_cache_entries)
        app.state.tokenizer = None
        yield
        await app.state.client.close()

    app = FastAPI(title="clip-triton gateway", version="0.1.0", lifespan=lifespan,
                  docs_url="/docs" if settings.docs else None, redoc_url="/redoc" if settings.docs else None,
                  openapi_url="/openapi.json" if settings.docs else None)

    # -- errors in OpenAI's shape ------------------------------------------------------------
    @app.exception_handler(ApiError)
    async def _api_error(request, exc: ApiError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _schema_error(request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        return JSONResponse(ApiError(400, f"invalid request: {where or 'body'}: {first.get('msg', 'schema error')}",
                                     param=where, code="invalid_schema").body(), status_code=400)

    @app.exception_handler(HTTPException)
    async def _http_error(request, exc: HTTPException):
        return JSONResponse(ApiError(exc.status_code, str(exc.detail), code="http_error").body(),
                            status_code=exc.status_code)

    # -- body size, metrics --------------------------------------------------------------------
    async def refuse_body(send, what: str) -> None:
        refused_bodies.inc()
        body = JSONResponse(ApiError(413, f"{what}, over the limit of {settings.max_body_bytes} bytes",
                                     code="body_too_large").body(), status_code=413)
        await body({"type": "http"}, None, send)

    app.add_middleware(BodyLimit, limit=settings.max_body_bytes, refuse=refuse_body)

    @app.middleware("http")
    async def _metrics(request: Request, call_next):
        started = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        # Labelled by route template, never the raw path: 3,000 distinct 404 paths are one series.
        endpoint = getattr(route, "path", None) or "(unmatched)"
        if endpoint not in ("/metrics", "/healthz"):
            requests_total.labels(endpoint, str(response.status_code)).inc()
            latency.labels(endpoint).observe(time.perf_counter() - started)
        return response

    # -- auth ------------------------------------------------------------------------------------
    async def authorise(request: Request) -> None:
        if not settings.auth:
            return
        header = request.headers.get("authorization", "")
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not key:
            raise ApiError(401, "missing API key: send 'Authorization: Bearer <key>'", code="missing_api_key")
        if not any(hmac.compare_digest(key.strip().encode(), k.encode()) for k in settings.api_keys):
            raise ApiError(401, "incorrect API key", code="invalid_api_key")

    # -- helpers ---------------------------------------------------------------------------------
    async def facts(request: Request):
        try:
            return await request.app.state.client.get_facts()
        except (ClipClientError, InferenceServerException, OSError, TimeoutError) as exc:
            raise ApiError(503, f"the model server is unavailable ({type(exc).__name__})", type_="server_error",
                           code="triton_unavailable") from None

    async def tokenizer(request: Request) -> ClipTokenizer:
        if request.app.state.tokenizer is None:
            served = await facts(request)
            spec = ModelContract.from_json(served.contract).tokenizer if served.contract else TokenizerSpec()
            request.app.state.tokenizer = ClipTokenizer(spec)
        return request.app.state.tokenizer

    def public_id(served) -> str:
        return settings.served_model_name or served.public_id

    def check_model(model: str, served) -> None:
        accepted = {public_id(served)}
        if public_id(served) == served.model:  # no alias: "ARCH/TAG" is accepted too
            accepted.add(f"{served.model}/{served.public_pretrained}")
        if model not in accepted:
            raise ApiError(404, f"model {model!r} is not served here; this gateway serves {public_id(served)!r}",
                           param="model", code="model_not_found")

    def check_text(items: list[tuple[int, str]], name: str) -> None:
        for index, text in items:
            if (problem := utf8_error(text)) is not None:
                raise _item_error(index, problem, name)

    async def count_tokens(request: Request, texts: list[tuple[int, str]], name: str) -> int:
        """Tokens of the texts as the server will encode them; in a worker thread, never on the event
        loop (tokenizing is CPU work, bounded per text but not free)."""
        tok = await tokenizer(request)
        check_text(texts, name)

        def count() -> int:
            total = 0
            for index, text in texts:
                try:
                    total += int((tok.ids(text) != 0).sum())
                except TextError as exc:
                    raise _item_error(index, str(exc), name) from None
            return total

        return await asyncio.to_thread(count)

    async def load_images(refs: list[tuple[int, str]], name: str) -> list[bytes]:
        urls = sum(1 for _, ref in refs if not is_data_url(ref))
        if urls > settings.max_urls_per_request:
            raise ApiError(400, f"{urls} image URLs in one request, over the limit of {settings.max_urls_per_request}; "
                                "send fewer per request, or the images themselves as data URLs", param=name,
                           code="too_many_urls")

        async def one(index: int, ref: str) -> bytes:
            try:
                if is_data_url(ref):
                    return decode_data_url(ref)
                async with fetch_gate:  # bounded across all requests: memory in flight stays bounded
                    return await fetch_image(ref, settings.fetch)
            except (ValueError, FetchError) as exc:
                raise _item_error(index, str(exc), name) from None

        return list(await asyncio.gather(*(one(i, r) for i, r in refs)))

    async def triton_call(coro, positions: list[int], name: str):
        try:
            return await coro
        except ItemErrors as exc:
            index, reason = next(iter(exc.errors.items()))
            raise _item_error(positions[index], reason, name) from None
        except (ClipClientError, InferenceServerException, OSError, TimeoutError) as exc:  # transport failures
            raise ApiError(503, f"the model server is unavailable ({str(exc)[:200]})", type_="server_error",
                           code="triton_unavailable") from None

    # -- schemas -----------------------------------------------------------------------------
    class EmbeddingRequest(BaseModel):
        input: str | list[str | dict]
        model: str
        encoding_format: Literal["float", "base64"] = "float"
        dimensions: int | None = None
        user: str | None = None

    class ClassifyRequest(BaseModel):
        model: str
        images: list[str] = Field(min_length=1)
        prompts: list[str] = Field(min_length=1)
        templates: list[str] | None = None

    # -- endpoints -----------------------------------------------------------------------------
    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz(request: Request):
        if not await request.app.state.client.is_ready():
            raise ApiError(503, "the model server is not ready", type_="server_error", code="triton_not_ready")
        return {"status": "ready"}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(generate_latest(registry).decode(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models", dependencies=[Depends(authorise)])
    async def models(request: Request):
        served = await facts(request)
        return {"object": "list", "data": [{"id": public_id(served), "object": "model", "created": 0,
                                            "owned_by": "clip-triton", "pretrained": served.public_pretrained,
                                            "embed_dim": served.embed_dim}]}

    @app.post("/v1/embeddings", dependencies=[Depends(authorise)])
    async def embeddings(body: EmbeddingRequest, request: Request):
        items = [body.input] if isinstance(body.input, str) else list(body.input)
        if not items:
            raise ApiError(400, "input must not be empty", param="input", code="empty_input")
        if len(items) > settings.max_items:
            raise ApiError(400, f"input has {len(items)} items, over the limit of {settings.max_items}", param="input")
        served = await facts(request)
        check_model(body.model, served)
        if body.dimensions is not None and body.dimensions != served.embed_dim:
            raise ApiError(400, f"dimensions={body.dimensions} is not supported; {public_id(served)} returns "
                                f"{served.embed_dim}", param="dimensions")
        kinds = [classify_item(x, i) for i, x in enumerate(items)]
        texts = [(i, value) for i, (kind, value) in enumerate(kinds) if kind == "text"]
        refs = [(i, value) for i, (kind, value) in enumerate(kinds) if kind == "image"]
        tokens = await count_tokens(request, texts, "input")
        images = await load_images(refs, "input")
        client = request.app.state.client
        text_vectors, image_vectors = await asyncio.gather(  # an empty side returns a (0, D) array
            triton_call(client.embed_texts([t for _, t in texts]), [i for i, _ in texts], "input"),
            triton_call(client.embed_images(images), [i for i, _ in refs], "input"),
        )
        vectors = np.empty((len(items), served.embed_dim), dtype=np.float32)
        vectors[[i for i, _ in texts]] = text_vectors
        vectors[[i for i, _ in refs]] = image_vectors
        items_total.labels("text").inc(len(texts))
        items_total.labels("image").inc(len(refs))
        data = [{"object": "embedding", "index": i,
                 "embedding": base64.b64encode(v.astype("<f4").tobytes()).decode() if body.encoding_format == "base64"
                 else v.tolist()} for i, v in enumerate(vectors)]
        return {"object": "list", "data": data, "model": public_id(served),
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    @app.post("/v1/classify", dependencies=[Depends(authorise)])
    async def classify(body: ClassifyRequest, request: Request):
        """Zero-shot scores: for each image, every prompt's cosine and probability, ranked."""
        if len(body.images) > settings.max_items or len(body.prompts) > settings.max_items:
            raise ApiError(400, f"at most {settings.max_items} images and {settings.max_items} prompts")
        served = await facts(request)
        check_model(body.model, served)
        templates = body.templates or []
        if len(templates) > settings.max_templates:
            raise ApiError(400, f"{len(templates)} templates, over the limit of {settings.max_templates}",
                           param="templates")
        for index, template in enumerate(templates):
            if "{}" not in template:
                raise _item_error(index, "needs a {} placeholder for the prompt", "templates")
            if len(template) > settings.max_template_chars:
                raise _item_error(index, f"{len(template)} characters, over the limit of "
                                         f"{settings.max_template_chars}", "templates")
        check_text(list(enumerate(templates)), "templates")
        n_texts = len(body.prompts) * max(1, len(templates))
        if n_texts > settings.max_template_texts:
            raise ApiError(400, f"{len(body.prompts)} prompts x {len(templates)} templates = {n_texts} texts to "
                                f"encode, over the limit of {settings.max_template_texts}", param="templates",
                           code="too_many_texts")
        for index, ref in enumerate(body.images):
            if not is_image_reference(ref):
                raise _item_error(index, "not an image: pass a data:image/...;base64, URL or an http(s) URL", "images")
        texts = template_texts(body.prompts, templates) if templates else list(body.prompts)
        # usage counts what is encoded: every prompt in every template (checked there, named by prompt)
        tokens = await count_tokens(request, [(i // max(1, len(templates)), t) for i, t in enumerate(texts)], "prompts")
        images = await load_images(list(enumerate(body.images)), "images")
        client = request.app.state.client
        prompt_vectors = await triton_call(client.prompt_embeddings(body.prompts, templates or None),
                                           list(range(len(body.prompts))), "prompts")
        image_vectors = await triton_call(client.embed_images(images), list(range(len(images))), "images")
        from clip_triton.client import rank  # noqa: PLC0415

        ranked = rank(image_vectors @ prompt_vectors.T, body.prompts, served.logit_scale, served.logit_bias)
        items_total.labels("image").inc(len(images))
        return {"object": "list", "model": public_id(served), "logit_scale": served.logit_scale,
                "data": [{"object": "classification", "index": i, "scores": scores} for i, scores in enumerate(ranked)],
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    return app
