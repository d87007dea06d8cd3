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

import base64
import binascii
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from .. import __version__
from ..contract import DEFAULT_URL, TEXT, VISION, check_served_model_name
from ..errors import ClipTritonError
from ..tokenizer import DEFAULT_MAX_TEXT_CHARS
from .fetch import FetchPolicy
from .schemas import ApiError, item_error

MAX_DATA_URL_HEADER = 1024  # "data:image/<type>[;params];base64" ends before this many characters
# Parsing JSON costs memory per value, not per byte: 8.4 MB of `[{},{},...]` became 2.8 M dicts
# (+420 MB, 0.95 s) before the item count could refuse it. Before any parsing the body's values are
# counted from its commas and opening brackets (an over-count: those inside strings count too), and a
# body with more than JSON_VALUES_FREE + one per JSON_BYTES_PER_VALUE bytes is refused. Parsing then
# costs at most ~72 bytes per value: under 10 MB for a 1 MB body, ~5 bytes per byte beyond. Prose
# has a comma every ~60 characters; image data URLs have none.
JSON_VALUES_FREE = 65_536
JSON_BYTES_PER_VALUE = 16


def json_values_problem(body: bytes) -> str | None:
    """Why a JSON body holds too many values to parse within the memory budget, or None (C-speed
    counts over the bytes, no parsing)."""
    values = body.count(b",") + body.count(b"{") + body.count(b"[")
    allowed = JSON_VALUES_FREE + len(body) // JSON_BYTES_PER_VALUE
    if values <= allowed:
        return None
    return (
        f"request body holds up to {values} JSON values (commas and brackets, strings included) in {len(body)} "
        f"bytes, over the limit of {allowed} ({JSON_VALUES_FREE} + one per {JSON_BYTES_PER_VALUE} bytes); "
        "send fewer items per request"
    )


@dataclass
class GatewaySettings:
    triton_url: str = DEFAULT_URL
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
    max_text_chars: int = DEFAULT_MAX_TEXT_CHARS  # one text, as encoded (a prompt in its template)
    prompt_cache_entries: int = 256
    docs: bool = False  # /docs, /redoc, /openapi.json: off unless asked for
    served_model_name: str | None = None  # public model id; default: the repository's, else the architecture
    # Folder holding the served model's tokenizer.json, for models with a Hugging Face tokenizer (SigLIP,
    # MetaCLIP 2): the gateway counts `usage` tokens with it. The repository's `tokenizer/1` is one.
    tokenizer_dir: str | None = None

    def __post_init__(self):
        if self.served_model_name is not None:
            check_served_model_name(self.served_model_name)
        if self.auth and not self.api_keys:
            raise ClipTritonError(
                "no API keys configured for the gateway",
                "set CLIP_TRITON_API_KEYS=key1,key2, or pass --no-auth for local use only",
            )


def decode_data_url(value: str) -> bytes:
    """The bytes of a ``data:<type>[;param...];base64,<data>`` URL. Parsed in linear time, with no
    regular expression over user input (a backtracking pattern spent 5.6 s of the event loop on
    ``data:image/png`` and 16 Mi semicolons): the header must end within its first
    ``MAX_DATA_URL_HEADER`` characters."""
    comma = value.find(",", 0, MAX_DATA_URL_HEADER)
    header = value[:comma] if comma > 0 else ""
    params = header[5:].split(";") if header[:5].lower() == "data:" else []
    if len(params) < 2 or params[-1].lower() != "base64":
        raise ValueError("malformed data URL: expected data:image/<type>;base64,<data>")
    if not params[0].lower().startswith("image/"):
        raise ValueError(f"data URL is {params[0][:64] or 'untyped'}, not an image (expected data:image/...)")
    try:
        return base64.b64decode(value[comma + 1 :], validate=True)
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
        return (VISION.kind if is_image_reference(item) else TEXT.kind), item
    kind = item.get("type")
    if kind == "text" and isinstance(item.get("text"), str):  # OpenAI's part type, not ours
        return TEXT.kind, item["text"]
    if kind == "image_url":
        url = item.get("image_url")
        url = url.get("url") if isinstance(url, dict) else url
        if isinstance(url, str) and is_image_reference(url):
            return VISION.kind, url
        raise item_error(index, "image_url must be a data:image/...;base64, URL or an http(s) URL", name)
    raise item_error(
        index, 'a typed item is {"type": "text", "text": ...} or {"type": "image_url", "image_url": {"url": ...}}', name
    )


def utf8_error(value: str) -> str | None:
    """Why a string from JSON cannot be sent on (a lone surrogate such as "\\ud800"), or None."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        return f"not valid Unicode text (unpaired surrogate at character {exc.start})"
    return None


class BodyLimit:
    """ASGI middleware, the gateway's admission: before any other work, a request to a guarded path
    (``/v1/``) without a valid API key is answered 401 without reading a byte of its body (an
    unauthenticated request costs O(1) memory, whatever it sends), then a body over ``limit`` bytes is
    refused while it arrives, then a body with more JSON values than the memory budget allows is
    refused before it is parsed (:func:`json_values_problem`).

    The declared Content-Length is checked first; a chunked body (no length) is counted chunk by
    chunk, and the 413 goes out as soon as the count passes the limit: the rest is never read.
    """

    def __init__(self, app, limit: int, refuse, key_problem=None, guarded: str = "/v1/"):
        self.app, self.limit, self.refuse = app, limit, refuse
        self.key_problem, self.guarded = key_problem, guarded

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        if self.key_problem is not None and scope.get("path", "").startswith(self.guarded):
            problem = self.key_problem(headers.get(b"authorization", b"").decode("latin-1"))
            if problem is not None:
                from fastapi.responses import JSONResponse  # noqa: PLC0415

                return await JSONResponse(problem.body(), status_code=problem.status)(scope, receive, send)
        declared = headers.get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.limit:
            return await self.refuse(send, f"request body is {int(declared)} bytes")
        # The body is read here, within the limit, and its JSON values counted before the app parses
        # anything (json_values_problem); the app then reads it from this buffer.
        chunks, received = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return None  # the client left: nothing to answer
            chunk = message.get("body", b"")
            received += len(chunk)
            if received > self.limit:
                return await self.refuse(send, f"request body is over {received} bytes")
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        del chunks
        if scope.get("path", "").startswith(self.guarded) and (problem := json_values_problem(body)) is not None:
            from fastapi.responses import JSONResponse  # noqa: PLC0415

            error = ApiError(400, problem, code="too_many_values")
            return await JSONResponse(error.body(), status_code=400)(scope, receive, send)
        replayed = False

        async def buffered_receive():
            nonlocal replayed
            if replayed:
                return await receive()  # after the body: the disconnect, when it comes
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, buffered_receive, send)


def create_app(settings: GatewaySettings):
    from fastapi import Depends, FastAPI, Request  # noqa: PLC0415
    from fastapi.exceptions import RequestValidationError  # noqa: PLC0415
    from fastapi.responses import JSONResponse  # noqa: PLC0415
    from starlette.exceptions import HTTPException  # noqa: PLC0415

    from clip_triton.client import AsyncClipClient  # noqa: PLC0415

    from .routes import Routes  # noqa: PLC0415

    routes = Routes(settings)

    @asynccontextmanager
    async def lifespan(app):
        urls = [u.strip() for u in settings.triton_url.split(",") if u.strip()]
        app.state.client = AsyncClipClient(
            urls if len(urls) > 1 else urls[0],
            timeout=settings.triton_timeout_s,
            retries=2,
            backoff=0.2,
            prompt_cache_entries=settings.prompt_cache_entries,
        )
        app.state.tokenizer = None
        yield
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
