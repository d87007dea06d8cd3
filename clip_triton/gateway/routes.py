"""The gateway's endpoints and the checks they share, as one object per app (its settings, metrics
and fetch limit); ``create_app`` mounts them."""

from __future__ import annotations

import asyncio
import hmac
import logging
import time

import numpy as np
import orjson
from fastapi import Request
from fastapi.responses import PlainTextResponse, Response
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from tritonclient.utils import InferenceServerException

from clip_triton.client import ClipClientError, ItemErrors, rank
from clip_triton.client.scoring import template_texts
from clip_triton.facts import resolve_alias

from ..contract import DEFAULT_EMBEDDING_TYPE, TEXT, VISION, ModelContract, TokenizerSpec, with_language
from ..encodings import encode, to_base64, to_json
from ..tokenizer import ClipTokenizer, HFTextTokenizer, TextError, text_tokenizer
from .fetch import FetchError, fetch_image
from .inputs import classify_item, decode_data_url, is_data_url, is_image_reference, utf8_error
from .schemas import ApiError, ClassifyRequest, EmbeddingRequest, item_error

LOG = logging.getLogger("clip_triton.gateway")
# How often a request naming an unknown model may make the gateway read the served models again.
CATALOG_REFRESH_S = 5.0


TRANSPORT_FAILURES = (ClipClientError, InferenceServerException, OSError, TimeoutError)


def unavailable(exc: BaseException, what: str) -> ApiError:
    """The 503 for a failed call to Triton. The cause goes to the gateway's log, not to the caller: it
    names internal addresses ("ipv4:10.0.3.7:8001: Failed to connect ..."); only its kind is public."""
    LOG.warning("%s failed: %s", what, exc)
    return ApiError(
        503, f"the model server is unavailable ({type(exc).__name__})", type_="server_error", code="triton_unavailable"
    )


async def owned(*coroutines) -> list:
    """Run ``coroutines`` as tasks owned by the calling request: the first failure cancels the others
    (and waits for them) before it is raised, as does the request's own cancellation (a client gone).
    ``asyncio.gather`` leaves them running: 4 requests refused at once for one bad data URL each had
    started 60 fetches that went on for everyone else's fetch slots."""
    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(coroutine) for coroutine in coroutines]
    except BaseExceptionGroup as failed:
        api = [exc for exc in failed.exceptions if isinstance(exc, ApiError)]
        raise (api or list(failed.exceptions))[0] from None
    return [task.result() for task in tasks]


def rendered(answer: dict) -> Response:
    """``answer`` (JSON types and the NumPy rows of :func:`~clip_triton.encodings.to_json`) as JSON
    bytes, serialized once by orjson. A route that returns a dict is first copied by FastAPI's
    ``jsonable_encoder``, which walks every number of every embedding: 6.4 of the 10 ms that 16 x 512
    floats cost; ``json.dumps`` then spent 3.8 ms writing each float32 with the 17 digits of its
    float64 value, a body 1.7x larger for the client to parse (measured here, docs/benchmarks.md).
    orjson writes NaN as null: the caller checks the rows are finite first."""
    return Response(orjson.dumps(answer, option=orjson.OPT_SERIALIZE_NUMPY), media_type="application/json")


class Routes:
    """Endpoints (``healthz``, ``readyz``, ``metrics``, ``models``, ``embeddings``, ``classify``) and
    the request checks they share."""

    def __init__(self, settings, clock=time.monotonic):
        self.settings = settings
        self.clock = clock  # the catalogue's age (a seam: tests pass their own)
        self.registry = CollectorRegistry()
        self.requests_total = Counter(
            "clip_gateway_requests", "HTTP requests", ["endpoint", "status"], registry=self.registry
        )
        self.refused_bodies = Counter(
            "clip_gateway_bodies_refused", "request bodies over the size limit", registry=self.registry
        )
        self.latency = Histogram(
            "clip_gateway_request_seconds",
            "request latency",
            ["endpoint"],
            registry=self.registry,
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )
        # Labelled by served model: only names the server serves become labels (checked before counting).
        self.items_total = Counter("clip_gateway_items", "embedded items", ["kind", "model"], registry=self.registry)
        self.model_requests = Counter(
            "clip_gateway_model_requests",
            "requests answered, per served model",
            ["endpoint", "model"],
            registry=self.registry,
        )
        self.warned_alias = False
        self.fetch_gate = asyncio.Semaphore(settings.max_concurrent_fetches)

    # -- auth ------------------------------------------------------------------------------------
    def key_problem(self, header: str) -> ApiError | None:
        """Why an ``Authorization`` header value does not admit a request, or None. The gateway's ASGI
        layer asks this before reading any of the body (app.py ``BodyLimit``); the routes ask again."""
        if not self.settings.auth:
            return None
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not key:
            return ApiError(401, "missing API key: send 'Authorization: Bearer <key>'", code="missing_api_key")
        if not any(hmac.compare_digest(key.strip().encode(), k.encode()) for k in self.settings.api_keys):
            return ApiError(401, "incorrect API key", code="invalid_api_key")
        return None

    async def authorise(self, request: Request) -> None:
        problem = self.key_problem(request.headers.get("authorization", ""))
        if problem is not None:
            raise problem

    # -- helpers ---------------------------------------------------------------------------------
    async def served_models(self, request: Request, refresh: bool = False) -> dict:
        """{public id: facts} of every model the server serves: read once, and again (``refresh``) at
        most every CATALOG_REFRESH_S when a request names a model not in it (a model that finished
        loading after the first read, a repository rewritten and the server restarted)."""
        state = request.app.state
        if refresh and state.served is not None and self.clock() - state.served_at >= CATALOG_REFRESH_S:
            state.served = None
        if state.served is None:
            try:
                models = await state.client.served_models()
            except TRANSPORT_FAILURES as exc:
                raise unavailable(exc, "reading the served models") from None
            if not models:
                raise ApiError(
                    503,
                    "the model server serves no clip-triton model yet",
                    type_="server_error",
                    code="triton_not_ready",
                )
            alias = self.settings.served_model_name
            if alias and len(models) == 1:  # --served-model-name renames a single served model
                models = {alias: next(iter(models.values()))}
            elif alias and not self.warned_alias:
                self.warned_alias = True
                LOG.warning(
                    "--served-model-name %r ignored: the server serves %d models by their own names", alias, len(models)
                )
            state.served, state.served_at = models, self.clock()
        return state.served

    async def model(self, request: Request, model: str, endpoint: str):
        """(public id, facts, client) of the served model a request names; 404 naming the served ones."""
        models = await self.served_models(request)
        if model not in models:
            models = await self.served_models(request, refresh=True)
        name = model if model in models else resolve_alias(model, models)  # "ARCH/TAG"
        if name is None:
            listed = ", ".join(repr(public) for public in sorted(models))
            raise ApiError(
                404,
                f"model {model!r} is not served here; this gateway serves {listed}",
                param="model",
                code="model_not_found",
            )
        facts = models[name]
        clients = request.app.state.clients
        if facts.public_id not in clients:
            root = request.app.state.client
            clients[facts.public_id] = root if len(models) == 1 else root.for_model(facts.public_id)
        self.model_requests.labels(endpoint, name).inc()
        return name, facts, clients[facts.public_id]

    async def tokenizer(self, request: Request, name: str, served) -> ClipTokenizer | HFTextTokenizer:
        """The gateway's own tokenizer for a served model whose server does not count tokens (a
        repository from before issue 30): CLIP's BPE ships here; a Hugging Face one needs its file."""
        tokenizers = request.app.state.tokenizers
        if name not in tokenizers:
            spec = ModelContract.from_json(served.contract).tokenizer if served.contract else TokenizerSpec()
            try:
                tokenizers[name] = text_tokenizer(spec, self.settings.tokenizer_dir)
            except (FileNotFoundError, ValueError) as exc:
                raise ApiError(
                    500,
                    f"the gateway cannot tokenize for {served.model} ({exc}) and the server does not count tokens "
                    "(a repository written before clip-triton counted them): rewrite it with `clip-triton repo`, or "
                    "set CLIP_TRITON_TOKENIZER_DIR (--tokenizer-dir) to a folder holding its tokenizer.json",
                    type_="server_error",
                    code="tokenizer_unavailable",
                ) from None
        return tokenizers[name]

    def check_text(self, items: list[tuple[int, str]], name: str) -> None:
        limit = self.settings.max_text_chars
        for index, text in items:
            if len(text) > limit:  # before any other work on it (the server refuses it the same way)
                raise item_error(index, f"{len(text)} characters, over the limit of {limit}", name)
            if (problem := utf8_error(text)) is not None:
                raise item_error(index, problem, name)

    async def count_tokens(self, request: Request, model: tuple, texts: list[tuple[int, str]], name: str) -> int:
        """Tokens of the texts as the server will encode them, counted here (a server that does not count
        them); in a worker thread, never on the event loop (tokenizing is CPU work, bounded per text but
        not free)."""
        tok = await self.tokenizer(request, model[0], model[1])

        def count() -> int:
            total = 0
            for index, text in texts:
                try:
                    total += int((tok.ids(text) != tok.spec.pad_token_id).sum())
                except TextError as exc:
                    raise item_error(index, str(exc), name) from None
            return total

        return await asyncio.to_thread(count)

    async def load_images(self, refs: list[tuple[int, str]], name: str) -> list[bytes]:
        urls = sum(1 for _, ref in refs if not is_data_url(ref))
        if urls > self.settings.max_urls_per_request:
            raise ApiError(
                400,
                f"{urls} image URLs in one request, over the limit of {self.settings.max_urls_per_request}; "
                "send fewer per request, or the images themselves as data URLs",
                param=name,
                code="too_many_urls",
            )

        policy = self.settings.fetch

        async def one(index: int, ref: str) -> bytes:
            try:
                if is_data_url(ref):
                    return decode_data_url(ref)
                # One deadline from the moment the item asks: the wait for a fetch slot (bounded across
                # all requests, so memory in flight stays bounded) is inside it, not before it.
                async with asyncio.timeout(policy.timeout_s):
                    async with self.fetch_gate:
                        return await fetch_image(ref, policy)
            except TimeoutError:
                raise item_error(index, f"URL was not fetched within {policy.timeout_s:g} s", name) from None
            except (ValueError, FetchError) as exc:
                raise item_error(index, str(exc), name) from None

        return await owned(*(one(i, r) for i, r in refs))

    async def triton_call(self, coro, positions: list[int], name: str):
        try:
            return await coro
        except ItemErrors as exc:
            index, reason = next(iter(exc.errors.items()))
            raise item_error(positions[index], reason, name) from None
        except TRANSPORT_FAILURES as exc:
            raise unavailable(exc, "a model server call") from None

    # -- endpoints -----------------------------------------------------------------------------
    async def healthz(self):
        return {"status": "ok"}

    async def readyz(self, request: Request):
        if not await request.app.state.client.is_ready():
            raise ApiError(503, "the model server is not ready", type_="server_error", code="triton_not_ready")
        return {"status": "ready"}

    async def metrics(self):
        return PlainTextResponse(generate_latest(self.registry).decode(), media_type="text/plain; version=0.0.4")

    async def models(self, request: Request):
        models = await self.served_models(request)
        return {
            "object": "list",
            "data": [
                {
                    "id": name,
                    "object": "model",
                    "created": 0,
                    "owned_by": "clip-triton",
                    "pretrained": served.public_pretrained,
                    "embed_dim": served.embed_dim,
                    "scoring": served.scoring,
                    "precision": served.precision,
                }
                for name, served in sorted(models.items())
            ],
        }

    async def embeddings(self, body: EmbeddingRequest, request: Request):
        items = [body.input] if isinstance(body.input, str) else list(body.input)
        if not items:
            raise ApiError(400, "input must not be empty", param="input", code="empty_input")
        if len(items) > self.settings.max_items:
            raise ApiError(
                400, f"input has {len(items)} items, over the limit of {self.settings.max_items}", param="input"
            )
        name, served, client = await self.model(request, body.model, "embeddings")
        if body.dimensions is not None and body.dimensions != served.embed_dim:
            raise ApiError(
                400,
                f"dimensions={body.dimensions} is not supported; {name} returns {served.embed_dim}",
                param="dimensions",
            )
        self.check_language(body.language, served)
        kinds = [classify_item(x, i) for i, x in enumerate(items)]
        texts = [(i, with_language(value, body.language)) for i, (kind, value) in enumerate(kinds) if kind == TEXT.kind]
        refs = [(i, value) for i, (kind, value) in enumerate(kinds) if kind == VISION.kind]
        self.check_text(texts, "input")  # before any fetch or model work
        tokens = None if served.token_counts else await self.count_tokens(request, (name, served), texts, "input")
        images = await self.load_images(refs, "input")
        (text_vectors, counts), image_vectors = await owned(  # an empty side returns a (0, D) array
            self.triton_call(client.embed_texts_counted([t for _, t in texts]), [i for i, _ in texts], "input"),
            self.triton_call(client.embed_images(images), [i for i, _ in refs], "input"),
        )
        if tokens is None:
            tokens = int(counts.sum()) if counts is not None else 0
        vectors = np.empty((len(items), served.embed_dim), dtype=np.float32)
        vectors[[i for i, _ in texts]] = text_vectors
        vectors[[i for i, _ in refs]] = image_vectors
        if not np.isfinite(vectors).all():  # the encoders refuse them (STATUS); never render NaN as null
            raise ApiError(
                502, "the model server returned a non-finite embedding", type_="server_error", code="triton_bad_output"
            )
        self.items_total.labels(TEXT.kind, name).inc(len(texts))
        self.items_total.labels(VISION.kind, name).inc(len(refs))
        rows = encode(vectors, body.embedding_type)
        data = [
            {
                "object": "embedding",
                "index": i,
                "embedding": to_base64(row) if body.encoding_format == "base64" else to_json(row, body.embedding_type),
            }
            for i, row in enumerate(rows)
        ]
        answer = {
            "object": "list",
            "data": data,
            "model": name,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
        if body.embedding_type != DEFAULT_EMBEDDING_TYPE:
            answer["embedding_type"] = body.embedding_type
        return rendered(answer)

    @staticmethod
    def check_language(language: str | None, served) -> None:
        """A request's ``language`` is one of the model's codes (NLLB), before any work; a model without
        languages would read the mark as text."""
        problem = served.language_problem(language)
        if problem:
            raise ApiError(400, problem, param="language", code="unknown_language")

    async def classify(self, body: ClassifyRequest, request: Request):
        """Zero-shot scores: for each image, every prompt's cosine and probability, ranked."""
        if len(body.images) > self.settings.max_items or len(body.prompts) > self.settings.max_items:
            raise ApiError(400, f"at most {self.settings.max_items} images and {self.settings.max_items} prompts")
        name, served, client = await self.model(request, body.model, "classify")
        self.check_language(body.language, served)
        templates = body.templates or []
        if len(templates) > self.settings.max_templates:
            raise ApiError(
                400, f"{len(templates)} templates, over the limit of {self.settings.max_templates}", param="templates"
            )
        for index, template in enumerate(templates):
            if template.count("{}") != 1:  # one prompt per text: the expanded size is known before it is built
                raise item_error(index, "needs exactly one {} placeholder for the prompt", "templates")
            if len(template) > self.settings.max_template_chars:
                raise item_error(
                    index,
                    f"{len(template)} characters, over the limit of {self.settings.max_template_chars}",
                    "templates",
                )
        self.check_text(list(enumerate(templates)), "templates")
        n_texts = len(body.prompts) * max(1, len(templates))
        if n_texts > self.settings.max_template_texts:
            raise ApiError(
                400,
                f"{len(body.prompts)} prompts x {len(templates)} templates = {n_texts} texts to "
                f"encode, over the limit of {self.settings.max_template_texts}",
                param="templates",
                code="too_many_texts",
            )
        # Every text's length from the lengths alone, before any is built: 16 templates of 500 `{}`
        # around a 260,000-character prompt once built 2.2 GB of strings before a length check.
        longest_template = max((len(t) - 2 for t in templates), default=0)
        for index, prompt in enumerate(body.prompts):
            if len(prompt) + longest_template > self.settings.max_text_chars:
                raise item_error(
                    index,
                    f"{len(prompt)} characters, {len(prompt) + longest_template} in its longest template, over "
                    f"the limit of {self.settings.max_text_chars}",
                    "prompts",
                )
        for index, ref in enumerate(body.images):
            if not is_image_reference(ref):
                raise item_error(index, "not an image: pass a data:image/...;base64, URL or an http(s) URL", "images")
        texts = template_texts(body.prompts, templates) if templates else list(body.prompts)
        # usage counts what is encoded: every prompt in every template (checked there, named by prompt)
        per_prompt = [(i // max(1, len(templates)), with_language(t, body.language)) for i, t in enumerate(texts)]
        self.check_text(per_prompt, "prompts")
        tokens = (
            None if served.token_counts else await self.count_tokens(request, (name, served), per_prompt, "prompts")
        )
        images = await self.load_images(list(enumerate(body.images)), "images")
        prompt_vectors, counted = await self.triton_call(
            client.prompt_embeddings_counted(body.prompts, templates or None, language=body.language),
            [i for i, _ in per_prompt],
            "prompts",
        )  # a refused text is named by its prompt
        if tokens is None:
            tokens = counted or 0
        image_vectors = await self.triton_call(client.embed_images(images), list(range(len(images))), "images")
        ranked = rank(image_vectors @ prompt_vectors.T, body.prompts, served.logit_scale, served.logit_bias)
        self.items_total.labels(VISION.kind, name).inc(len(images))
        return {
            "object": "list",
            "model": name,
            "logit_scale": served.logit_scale,
            "logit_bias": served.logit_bias,
            "scoring": served.scoring,  # softmax over the prompts (CLIP) or a sigmoid per prompt (SigLIP)
            "data": [{"object": "classification", "index": i, "scores": scores} for i, scores in enumerate(ranked)],
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
