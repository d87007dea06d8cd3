"""``AsyncClipClient``: the ``ClipClient`` API on ``tritonclient.grpc.aio`` (for asyncio services)."""

from __future__ import annotations

import asyncio
import copy
import itertools
import time
from collections.abc import Iterable, Sequence

import numpy as np

from clip_triton.contract import (
    DEFAULT_EMBEDDING_TYPE,
    DEFAULT_URL,
    IMAGE_INPUT,
    RETRY_SECONDS,
    TEXT_INPUT,
    ModelNames,
)
from clip_triton.encodings import check_type
from clip_triton.facts import ServerFacts

from .core import (
    ServedModel,
    catalog,
    choose_model,
    client_grouping,
    encode_rows,
    encoded_errors,
    in_language,
    index_names,
    plan_batches,
    readiness_candidates,
    record_or_split,
    record_rows,
    retry_delay,
    should_retry,
    split_result,
    token_counts,
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
        group_by_length: bool | None = None,
        model: str | None = None,
    ):
        """As :class:`ClipClient <clip_triton.client.ClipClient>` (``group_by_length`` and ``model`` included)."""
        import tritonclient.grpc.aio as aioclient  # noqa: PLC0415

        self._grpc = aioclient
        self.clients = connect(aioclient, urls_of(url, "AsyncClipClient"))
        self._next = itertools.cycle(range(len(self.clients)))
        self.timeout, self.retries, self.backoff, self.retry_seconds = timeout, retries, backoff, retry_seconds
        self.concurrency = max(1, concurrency)
        self.url_timeout = url_timeout
        self._batch_size = batch_size
        self._text_cache = PromptCache(prompt_cache_entries)
        self._prompt_cache_entries = prompt_cache_entries
        self.group_by_length = group_by_length
        self.model = model
        self._served: ServedModel | None = None
        self._owns_connections = True
        self.target = ",".join(urls_of(url, "AsyncClipClient"))

    def for_model(self, model: str) -> AsyncClipClient:
        """A client of another served model on the same connections (its own facts and prompt cache);
        closing it leaves the connections to this one."""
        other = copy.copy(self)
        other.model, other._served = model, None
        other._text_cache = PromptCache(self._prompt_cache_entries)
        other._owns_connections = False
        return other

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

    async def served_models(self) -> dict[str, ServerFacts]:
        """Every model the server serves, by public name (``model=`` and :meth:`for_model` take these)."""
        return {name: served.facts for name, served in (await self._catalog()).items()}

    async def _catalog(self) -> dict[str, ServedModel]:
        index = index_names(await self._call(lambda c: c.get_inference_statistics(as_json=True)))
        facts = {}
        for names in ModelNames.served_in(index):  # read here (awaited); catalog() arranges them
            facts[names.image] = ServerFacts.from_config(
                await self._call(lambda c, e=names.image: c.get_model_config(e, as_json=True))
            )
        return catalog(index, facts.__getitem__)

    async def served(self) -> ServedModel:
        """The served model this client uses: its Triton model names and facts (read once)."""
        if self._served is None:
            self._served = choose_model(await self._catalog(), self.model, self.target)
        return self._served

    async def get_facts(self) -> ServerFacts:
        return (await self.served()).facts

    async def _infer(
        self, model: str, input_name: str, items: list[bytes], tokens: bool = False
    ) -> tuple[np.ndarray, dict[int, str], np.ndarray | None]:
        facts = await self.get_facts()
        tensor = bytes_input(self._grpc, input_name, items)
        outputs = requested_outputs(self._grpc, facts, tokens)
        result = await self._call(lambda c: c.infer(model, [tensor], outputs=outputs, client_timeout=self.timeout))
        counts = token_counts(result, len(items)) if tokens and facts.token_counts else None
        return (*split_result(result, facts), counts)

    async def _embed(self, input_name: str, items: list, counts: np.ndarray | None = None) -> np.ndarray:
        """Embed ``items``; ``counts`` (texts, where the server counts tokens): each item's token count
        is written there."""
        from tritonclient.utils import InferenceServerException  # noqa: PLC0415

        served = await self.served()
        facts, text = served.facts, input_name == TEXT_INPUT
        model = served.names.text if text else served.names.image
        size = min(self._batch_size or facts.max_batch_size, facts.max_batch_size)
        lengths = client_grouping(self.group_by_length, facts) if text else None
        out, errors, chunks = plan_batches(items, facts.embed_dim, size, lengths)
        gate = asyncio.Semaphore(self.concurrency)

        async def run(chunk: list[int]) -> None:
            try:
                async with gate:
                    embeddings, failed, tokens = await self._infer(
                        model, input_name, [items[i] for i in chunk], counts is not None
                    )
                record_rows(out, chunk, (embeddings, failed), errors, [])
                if tokens is not None and counts is not None:
                    counts[chunk] = tokens
            except InferenceServerException as exc:
                if record_or_split(exc, model, chunk, errors):
                    await asyncio.gather(*(run([i]) for i in chunk))

        await asyncio.gather(*(run(chunk) for chunk in chunks))
        if errors:
            raise ItemErrors(errors, out)
        return out

    async def _embed_as(self, embedding_type: str, input_name: str, prepare) -> np.ndarray:
        name = check_type(embedding_type)  # before any item is read or sent
        try:
            return encode_rows(await self._embed(input_name, prepare()), name)
        except ItemErrors as err:
            raise encoded_errors(err, name) from None

    async def embed_images(self, images: Iterable, *, embedding_type: str = DEFAULT_EMBEDDING_TYPE) -> np.ndarray:
        """As :meth:`ClipClient.embed_images <clip_triton.client.ClipClient.embed_images>`."""
        return await self._embed_as(embedding_type, IMAGE_INPUT, lambda: prepare_images(images, self.url_timeout))

    async def embed_texts(
        self, texts: Iterable[str], *, embedding_type: str = DEFAULT_EMBEDDING_TYPE, language: str | None = None
    ) -> np.ndarray:
        """As :meth:`ClipClient.embed_texts <clip_triton.client.ClipClient.embed_texts>`."""
        texts = await self._in_language(texts, language)
        return await self._embed_as(embedding_type, TEXT_INPUT, lambda: prepare_texts(texts))

    async def _in_language(self, texts: Iterable[str], language: str | None) -> Iterable[str]:
        return texts if language is None else in_language(list(texts), language, await self.get_facts())

    async def embed_texts_counted(
        self, texts: Iterable[str], *, language: str | None = None
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """``(embeddings, tokens)``: float32 embeddings as :meth:`embed_texts`, and each text's token
        count as the server's tokenizer counts it (start/end tokens included, padding not), or None where
        the server does not count (a repository from before issue 30). The gateway's ``usage``."""
        items = prepare_texts(await self._in_language(texts, language))
        counts = np.zeros(len(items), dtype=np.int64) if (await self.get_facts()).token_counts else None
        return await self._embed(TEXT_INPUT, items, counts), counts

    async def prompt_embeddings_counted(
        self, prompts: Sequence[str], templates: Sequence[str] | None = None, *, language: str | None = None
    ) -> tuple[np.ndarray, int | None]:
        """One embedding per prompt (the normalised mean over templates), cached per prompt set, and
        the tokens of every text encoded for it (None where the server does not count)."""
        key = prompt_set_key(prompts, templates, language)
        cached = self._text_cache.get(key)
        if cached is None:
            texts = template_texts(prompts, templates) if templates else list(prompts)
            vectors, counts = await self.embed_texts_counted(texts, language=language)
            emb = ensemble_templates(vectors, len(prompts), len(templates)) if templates else vectors
            cached = (emb, None if counts is None else np.array(int(counts.sum())))
            self._text_cache.put(key, cached)
        emb, total = cached
        return emb, None if total is None else int(total)

    async def prompt_embeddings(
        self, prompts: Sequence[str], templates: Sequence[str] | None = None, *, language: str | None = None
    ) -> np.ndarray:
        return (await self.prompt_embeddings_counted(prompts, templates, language=language))[0]

    async def classify(
        self,
        images: Sequence,
        prompts: Sequence[str],
        templates: Sequence[str] | None = None,
        *,
        language: str | None = None,
    ) -> list[list[dict]]:
        if not prompts:
            raise ValueError("classify needs at least one prompt")
        text = await self.prompt_embeddings(list(prompts), templates, language=language)
        image = await self.embed_images(images)
        facts = await self.get_facts()
        return rank(image @ text.T, prompts, facts.logit_scale, facts.logit_bias)

    async def is_ready(self) -> bool:
        """Both ensembles of the served model (every served model, before one is chosen) ready on every
        server."""
        try:
            for client in self.clients:
                index = None if self._served else index_names(await client.get_inference_statistics(as_json=True))
                candidates = readiness_candidates(index, self.model, self._served)
                if not candidates:
                    return False
                for names in candidates:
                    if not (await client.is_model_ready(names.image) and await client.is_model_ready(names.text)):
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
        if self._owns_connections:
            for client in self.clients:
                await client.close()

    async def __aenter__(self) -> AsyncClipClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
