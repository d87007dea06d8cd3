"""``AsyncClipClient``: the ``ClipClient`` API on ``tritonclient.grpc.aio`` (for asyncio services)."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Iterable, Sequence

import numpy as np

from clip_triton.contract import (
    DEFAULT_EMBEDDING_TYPE,
    DEFAULT_URL,
    IMAGE_ENSEMBLE,
    IMAGE_INPUT,
    RETRY_SECONDS,
    TEXT_ENSEMBLE,
    TEXT_INPUT,
)
from clip_triton.encodings import check_type
from clip_triton.facts import ServerFacts

from .core import (
    TextLengths,
    encode_rows,
    encoded_errors,
    plan_batches,
    record_or_split,
    record_rows,
    retry_delay,
    should_retry,
    split_result,
)
from .errors import ClipClientError, ItemErrors
from .inputs import prepare_images, prepare_texts
from .scoring import PromptCache, ensemble_templates, prompt_set_key, rank, template_texts
from .transport import bytes_input, connect, requested_outputs, urls_of


class AsyncClipClient:
    """Same behaviour as :class:`ClipClient`; every call is a coroutine.

    ``await client.embed_images(items)``, ``await client.embed_texts(texts)``,
    ``await client.classify(images, prompts)``, ``await client.get_facts()``.
    """

    def __init__(
        self,
        url: str | Sequence[str] = DEFAULT_URL,
        *,
        timeout: float = 60.0,
        retries: int = 60,
        backoff: float = 0.5,
        concurrency: int = 4,
        batch_size: int | None = None,
        url_timeout: float = 10.0,
        retry_seconds: float = RETRY_SECONDS,
        prompt_cache_entries: int = 256,
        group_by_length: bool = True,
    ):
        """As :class:`ClipClient <clip_triton.client.ClipClient>` (``group_by_length`` included)."""
        import tritonclient.grpc.aio as aioclient  # noqa: PLC0415

        self._grpc = aioclient
        self.clients = connect(aioclient, urls_of(url, "AsyncClipClient"))
        self._next = itertools.cycle(range(len(self.clients)))
        self.timeout, self.retries, self.backoff, self.retry_seconds = timeout, retries, backoff, retry_seconds
        self.concurrency = max(1, concurrency)
        self.url_timeout = url_timeout
        self._batch_size = batch_size
        self._facts: ServerFacts | None = None
        self._text_cache = PromptCache(prompt_cache_entries)
        self.group_by_length = group_by_length
        self._lengths: TextLengths | None = None

    async def _call(self, fn):
        from tritonclient.utils import InferenceServerException  # noqa: PLC0415

        deadline, attempt = time.monotonic() + self.retry_seconds, 0
        while True:
            try:
                return await fn(self.clients[next(self._next)])
            except InferenceServerException as exc:
                if not should_retry(exc, attempt, self.retries, deadline):
                    raise
                await asyncio.sleep(retry_delay(attempt, self.backoff))
                attempt += 1

    async def get_facts(self) -> ServerFacts:
        if self._facts is None:
            self._facts = ServerFacts.from_config(
                await self._call(lambda c: c.get_model_config(IMAGE_ENSEMBLE, as_json=True))
            )
        return self._facts

    async def _infer(self, model: str, input_name: str, items: list[bytes]) -> tuple[np.ndarray, dict[int, str]]:
        facts = await self.get_facts()
        tensor = bytes_input(self._grpc, input_name, items)
        outputs = requested_outputs(self._grpc, facts)
        result = await self._call(lambda c: c.infer(model, [tensor], outputs=outputs, client_timeout=self.timeout))
        return split_result(result, facts)

    async def _embed(self, model: str, input_name: str, items: list) -> np.ndarray:
        from tritonclient.utils import InferenceServerException  # noqa: PLC0415

        facts = await self.get_facts()
        size = min(self._batch_size or facts.max_batch_size, facts.max_batch_size)
        lengths = None
        if model == TEXT_ENSEMBLE and self.group_by_length:
            if self._lengths is None:
                self._lengths = TextLengths(facts.contract)
            lengths = self._lengths
        out, errors, chunks = plan_batches(items, facts.embed_dim, size, lengths)
        gate = asyncio.Semaphore(self.concurrency)

        async def run(chunk: list[int]) -> None:
            try:
                async with gate:
                    record_rows(out, chunk, await self._infer(model, input_name, [items[i] for i in chunk]), errors, [])
            except InferenceServerException as exc:
                if record_or_split(exc, model, chunk, errors):
                    await asyncio.gather(*(run([i]) for i in chunk))

        await asyncio.gather(*(run(chunk) for chunk in chunks))
        if errors:
            raise ItemErrors(errors, out)
        return out

    async def _embed_as(self, embedding_type: str, model: str, input_name: str, prepare) -> np.ndarray:
        name = check_type(embedding_type)  # before any item is read or sent
        try:
            return encode_rows(await self._embed(model, input_name, prepare()), name)
        except ItemErrors as err:
            raise encoded_errors(err, name) from None

    async def embed_images(self, images: Iterable, *, embedding_type: str = DEFAULT_EMBEDDING_TYPE) -> np.ndarray:
        """As :meth:`ClipClient.embed_images <clip_triton.client.ClipClient.embed_images>`."""
        return await self._embed_as(
            embedding_type, IMAGE_ENSEMBLE, IMAGE_INPUT, lambda: prepare_images(images, self.url_timeout)
        )

    async def embed_texts(self, texts: Iterable[str], *, embedding_type: str = DEFAULT_EMBEDDING_TYPE) -> np.ndarray:
        """As :meth:`ClipClient.embed_texts <clip_triton.client.ClipClient.embed_texts>`."""
        return await self._embed_as(embedding_type, TEXT_ENSEMBLE, TEXT_INPUT, lambda: prepare_texts(texts))

    async def prompt_embeddings(self, prompts: Sequence[str], templates: Sequence[str] | None = None) -> np.ndarray:
        key = prompt_set_key(prompts, templates)
        emb = self._text_cache.get(key)
        if emb is None:
            if templates:
                emb = ensemble_templates(
                    await self.embed_texts(template_texts(prompts, templates)), len(prompts), len(templates)
                )
            else:
                emb = await self.embed_texts(list(prompts))
            self._text_cache.put(key, emb)
        return emb

    async def classify(
        self, images: Sequence, prompts: Sequence[str], templates: Sequence[str] | None = None
    ) -> list[list[dict]]:
        if not prompts:
            raise ValueError("classify needs at least one prompt")
        text = await self.prompt_embeddings(list(prompts), templates)
        image = await self.embed_images(images)
        facts = await self.get_facts()
        return rank(image @ text.T, prompts, facts.logit_scale, facts.logit_bias)

    async def is_ready(self) -> bool:
        """Both ensembles ready on every server."""
        try:
            for client in self.clients:
                if not (await client.is_model_ready(IMAGE_ENSEMBLE) and await client.is_model_ready(TEXT_ENSEMBLE)):
                    return False
            return True
        except Exception:  # noqa: BLE001 (unreachable counts as not ready)
            return False

    async def wait_until_ready(self, timeout: float = 120.0) -> None:
        deadline = asyncio.get_running_loop().time() + timeout
        while asyncio.get_running_loop().time() < deadline:
            if await self.is_ready():
                return
            await asyncio.sleep(0.25)
        raise ClipClientError(f"clip-triton not ready after {timeout:.0f}s")

    async def close(self) -> None:
        for client in self.clients:
            await client.close()

    async def __aenter__(self) -> AsyncClipClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
