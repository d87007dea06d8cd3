"""``ClipClient``: a thin client for the clip-triton ensembles over Triton gRPC.

numpy, pillow and tritonclient only. Facts that depend on the deployment (embedding size,
``logit_scale``, ``max_batch_size``, model name) are read from the server's model config, never
hard-coded. Large inputs are split into batches no larger than the server's ``max_batch_size`` and
sent several at a time; results come back in input order.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from clip_triton.contract import (
    CONNECT_SECONDS,
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
    DeadlinePolicy,
    Readiness,
    ServedModel,
    catalog,
    choose_model,
    client_grouping,
    encode_rows,
    encoded_errors,
    in_language,
    index_names,
    length_batches,
    readiness_candidates,
    record_or_split,
    record_rows,
    retry_delay,
    should_retry,
    split_result,
    status_of,
    transport_error,
)
from .errors import (
    DEADLINE_HINT,
    ClipClientError,
    DeadlineExceeded,
    ItemErrors,
    JobFailed,
    JobInterrupted,
    ServerUnavailable,
)
from .index import EmbeddingIndex
from .inputs import image_bytes, text_bytes
from .scoring import PromptCache, ensemble_templates, prompt_set_key, rank, template_texts, top_k
from .transport import bytes_input, connect, requested_outputs, urls_of


class _Cancelled(Exception):
    """Internal: the job was stopped while this request was in flight or waiting to retry."""


class _Job:
    """One ``embed_*`` call: lazy item preparation in the workers (bounded memory), requests sent with
    ``async_infer`` so that in-flight ones can be cancelled, bad items isolated, progress shown."""

    def __init__(self, client: ClipClient, model: str, input_name: str, items: list, prepare):
        self.client, self.model, self.input_name, self.items, self.prepare = client, model, input_name, items, prepare
        self.facts = client.facts
        self.size = client.batch_size
        self.out = np.full((len(items), self.facts.embed_dim), np.nan, dtype=np.float32)
        self.errors: dict[int, str] = {}
        self.answered: list[int] = []
        self.failure: list[ClipClientError] = []
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.calls: set = set()
        self.in_flight = 0
        self.deadlines = DeadlinePolicy(client.timeout)
        self.bar: Any = None  # the progress bar, made by run()

    def run(self) -> np.ndarray:
        from clip_triton.progress import bar  # noqa: PLC0415

        n = len(self.items)
        text = self.input_name == TEXT_INPUT
        lengths = client_grouping(self.client.group_by_length, self.facts) if text else None
        if lengths is not None and lengths.groups:  # one length bucket a request (issue 33)
            chunks = length_batches([lengths.key(item) for item in self.items], list(range(n)), self.size)
        else:
            chunks = [list(range(i, min(i + self.size, n))) for i in range(0, n, self.size)]
        kind = "texts" if text else "images"
        self.bar = bar(n, f"embedding {kind}", unit=kind[:-1], enabled=self.client.progress if n else False)
        pool = ThreadPoolExecutor(self.client.concurrency, thread_name_prefix="clip-triton")
        try:
            self._wait([pool.submit(self.run_chunk, chunk) for chunk in chunks])
        except BaseException as exc:
            self.cancel()
            pool.shutdown(wait=True, cancel_futures=True)
            self.bar.close()
            if isinstance(exc, KeyboardInterrupt):
                raise JobInterrupted(self.out, self.answered, self.errors) from None
            raise
        pool.shutdown(wait=True)
        self.bar.close()
        if self.failure:
            raise JobFailed(self.failure[0], self.out, self.answered, self.errors) from self.failure[0]
        if self.errors:
            raise ItemErrors(self.errors, self.out)
        return self.out

    @staticmethod
    def _wait(futures) -> None:
        for future in futures:  # short waits keep the main thread responsive to Ctrl-C
            while True:
                try:
                    future.result(timeout=0.5)
                    break
                except TimeoutError:
                    continue

    def cancel(self) -> None:
        """Drop queued work and cancel every request in flight."""
        self.stop.set()
        with self.lock:
            calls = list(self.calls)
        for call in calls:
            call.cancel()

    def run_chunk(self, chunk: list[int]) -> None:
        if self.stop.is_set() or self.failure:
            return  # the job is over: queued batches are not sent
        rows, payload = [], []
        for index in chunk:
            try:
                payload.append(self.prepare(self.items[index]))
                rows.append(index)
            except (OSError, ValueError, TypeError) as exc:
                with self.lock:
                    self.errors[index] = str(exc)
        if rows:
            self.send(rows, payload)
        with self.lock:
            self.bar.update(len(chunk))

    def send(self, rows: list[int], payload: list[bytes]) -> None:
        from tritonclient.utils import InferenceServerException  # noqa: PLC0415

        try:
            answer = self.request(payload)
        except _Cancelled:
            return
        except ClipClientError as err:
            self.failure.append(err)
            return
        except InferenceServerException as exc:
            if self.stop.is_set():
                return
            try:
                with self.lock:
                    split = record_or_split(exc, self.model, rows, self.errors, self.client.target)
            except ClipClientError as err:
                self.failure.append(err)
                return
            if split:  # a server without STATUS: isolate the bad item(s)
                for row, item in zip(rows, payload):
                    self.send([row], [item])
            return
        with self.lock:
            record_rows(self.out, rows, answer, self.errors, self.answered)

    def request(self, payload: list[bytes]) -> tuple[np.ndarray, dict[int, str]]:
        """One request, retried on transient failures; raises DeadlineExceeded with its figures."""
        from tritonclient.utils import InferenceServerException  # noqa: PLC0415

        grpc, client = self.client._grpc, self.client
        tensor = bytes_input(grpc, self.input_name, payload)
        outputs = requested_outputs(grpc, self.facts)
        with self.lock:
            self.in_flight += len(payload)
            in_flight = self.in_flight
        try:
            deadline = self.deadlines.deadline(in_flight)
            give_up, attempt = time.monotonic() + client.retry_seconds, 0
            while True:
                try:
                    result = self.call(tensor, outputs, deadline)
                    self.deadlines.answered(len(payload))
                    return split_result(result, self.facts)
                except InferenceServerException as exc:
                    if self.stop.is_set():
                        raise _Cancelled from None
                    if status_of(exc) == "StatusCode.DEADLINE_EXCEEDED":
                        how = "automatic deadline" if self.deadlines.auto else "deadline (--timeout)"
                        raise DeadlineExceeded(
                            f"{self.model}: a request of {len(payload)} items missed its {deadline:.4g} s {how}, "
                            f"with {in_flight} items in flight",
                            DEADLINE_HINT,
                        ) from None
                    if not should_retry(exc, attempt, client.retries, give_up):
                        raise
                    if self.stop.wait(retry_delay(attempt, client.backoff)):
                        raise _Cancelled from None
                    attempt += 1
        finally:
            with self.lock:
                self.in_flight -= len(payload)

    def call(self, tensor, outputs, deadline: float):
        """``async_infer`` and wait: the call is registered so that :meth:`cancel` can end it at once."""
        done, box = threading.Event(), []

        def callback(result, error):
            box.append((result, error))
            done.set()

        call = self.client._client().async_infer(
            self.model, [tensor], callback, outputs=outputs, client_timeout=deadline
        )
        with self.lock:
            self.calls.add(call)
        if self.stop.is_set():
            call.cancel()
        done.wait()
        with self.lock:
            self.calls.discard(call)
        result, error = box[0]
        if error is not None:
            raise error
        return result


class ClipClient:
    """Embed images and texts, classify zero-shot, search, through the clip-triton ensembles.

    ``url`` is ``host:port``, a ``dns:///host:port`` target (gRPC round-robin over every address the
    name resolves to: one per pod behind a headless Kubernetes Service), or a list of URLs used in
    turn (one gRPC connection pins to one server, so spreading needs several).
    """

    def __init__(
        self,
        url: str | Sequence[str] = DEFAULT_URL,
        *,
        timeout: float | None = None,
        retries: int = 60,
        backoff: float = 0.5,
        concurrency: int = 4,
        batch_size: int | None = None,
        url_timeout: float = 10.0,
        progress: bool | None = False,
        retry_seconds: float = RETRY_SECONDS,
        prompt_cache_entries: int = 256,
        group_by_length: bool | None = None,
        model: str | None = None,
    ):
        """``model``: the served model to use, by its public name (``facts.public_id``); needed where the
        server serves several (without it such a client refuses, listing them). ``timeout``: seconds per request, or None (default) for deadlines scaled to the items in flight
        and the server's measured speed (see :class:`DeadlinePolicy`). ``progress``: a bar on stderr
        (None: only when stderr is a terminal). ``group_by_length``: True sends texts in requests of one
        sequence-length bucket each (their rows still come back in input order); False sends them in
        input order; None (default) groups only where the server does not split requests by length
        itself (``facts.text_split``, repositories written before the split)."""
        import tritonclient.grpc as grpcclient  # noqa: PLC0415

        self._grpc = grpcclient
        urls = urls_of(url, "ClipClient")
        DeadlinePolicy(timeout)  # validates
        self.target = ",".join(urls)
        self.clients = connect(grpcclient, urls)
        self._next = itertools.cycle(range(len(self.clients)))
        self._lock = threading.Lock()
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.retry_seconds = retry_seconds
        self.concurrency = max(1, concurrency)
        self.url_timeout = url_timeout
        self.progress = progress
        self._batch_size = batch_size
        self._text_cache = PromptCache(prompt_cache_entries)
        self.group_by_length = group_by_length
        self.model = model
        self._served: ServedModel | None = None

    # -- server facts ------------------------------------------------------------------------
    def _client(self):
        with self._lock:
            return self.clients[next(self._next)]

    def readiness_state(self) -> Readiness:
        """Where the servers stand: ``ready`` (both ensembles on every server), ``loading`` (a server
        answers but is not live or a model is not ready) or ``unreachable`` (nothing answers at an
        address: connection refused, no such name, TLS), with the reason in words."""
        for target, client in zip(self.target.split(","), self.clients):
            try:
                if not client.is_server_live():
                    return Readiness("loading", f"the server at {target} is not live")
                index = None if self._served else index_names(client.get_inference_statistics(as_json=True))
                candidates = readiness_candidates(index, self.model, self._served)
                if not candidates:
                    return Readiness("loading", f"the server at {target} is up but lists no clip_image ensemble yet")
                wanted = [name for names in candidates for name in (names.image, names.text)]
                missing = [m for m in wanted if not client.is_model_ready(m)]
            except Exception as exc:  # noqa: BLE001 (connection refused, DNS, TLS: all mean unreachable)
                message = getattr(exc, "message", None)
                text = message() if callable(message) else str(exc)
                return Readiness(
                    "unreachable", f"nothing answers at {target} ({(text or type(exc).__name__).splitlines()[0]})"
                )
            if missing:
                return Readiness(
                    "loading", f"the server at {target} is up but {' and '.join(missing)} is not ready (still loading?)"
                )
        return Readiness("ready", None)

    def readiness(self) -> str | None:
        """None when both ensembles are ready on every server, else what is missing, in words."""
        return self.readiness_state().reason

    def wait_until_ready(
        self,
        timeout: float = 120.0,
        *,
        connect_timeout: float = CONNECT_SECONDS,
        on_wait: Callable[[Readiness, float], None] | None = None,
    ) -> None:
        """Wait until both ensembles answer ready on every server; the error says what was missing.

        A server that answers but is still loading is waited for up to ``timeout`` seconds. An address
        where nothing answers fails after ``connect_timeout`` (the most common first mistake: no server
        started, or on other ports), not after the whole ``timeout``. ``on_wait(state, seconds_left)``
        is called between polls (the CLI's countdown). Jobs already running ride out restarts through
        their retry budget instead (``retry_seconds``)."""
        started = time.monotonic()
        deadline = started + timeout
        while True:
            state = self.readiness_state()
            if state.state == "ready":
                return
            now = time.monotonic()
            if state.state == "unreachable" and now - started >= min(connect_timeout, timeout):
                raise ServerUnavailable(
                    state.reason or "nothing answers",
                    'start the server: `clip-triton serve --repo REPO` (it prints "ready" once it answers), '
                    "or point --url / $CLIP_TRITON_URL at the one that runs",
                )
            if now >= deadline:
                raise ServerUnavailable(
                    f"clip-triton not ready after {timeout:.0f} s: {state.reason}",
                    "wait longer (--ready-timeout) or read the server log",
                )
            if on_wait is not None:
                on_wait(state, deadline - now)
            time.sleep(0.25)

    def served_models(self) -> dict[str, ServerFacts]:
        """Every model the server serves, by public name (``model=`` takes these), with its facts."""
        return {name: served.facts for name, served in self._catalog().items()}

    def _catalog(self) -> dict[str, ServedModel]:
        from tritonclient.utils import InferenceServerException  # noqa: PLC0415

        where = "the ready models (statistics)"
        try:
            index = index_names(self._call(lambda c: c.get_inference_statistics(as_json=True)))

            def read(ensemble: str) -> ServerFacts:
                nonlocal where
                where = ensemble
                return ServerFacts.from_config(self._call(lambda c: c.get_model_config(ensemble, as_json=True)))

            return catalog(index, read)
        except InferenceServerException as exc:
            raise transport_error(exc, where, self.target) from None

    @property
    def served(self) -> ServedModel:
        """The served model this client uses: its Triton model names and facts (read once)."""
        if self._served is None:
            self._served = choose_model(self._catalog(), self.model, self.target)
        return self._served

    @property
    def names(self) -> ModelNames:
        return self.served.names

    @property
    def facts(self) -> ServerFacts:
        return self.served.facts

    @property
    def batch_size(self) -> int:
        return min(self._batch_size or self.facts.max_batch_size, self.facts.max_batch_size)

    # -- transport ---------------------------------------------------------------------------
    def _call(self, fn):
        """Run ``fn(client)``, retrying transient failures (:func:`retryable`) with capped exponential
        backoff, up to ``retries`` times within ``retry_seconds``."""
        from tritonclient.utils import InferenceServerException  # noqa: PLC0415

        deadline, attempt = time.monotonic() + self.retry_seconds, 0
        while True:
            try:
                return fn(self._client())
            except InferenceServerException as exc:
                if not should_retry(exc, attempt, self.retries, deadline):
                    raise
                time.sleep(retry_delay(attempt, self.backoff))
                attempt += 1

    def _embed(self, model: str, input_name: str, items: list, prepare) -> np.ndarray:
        """Embed items in batches, several in flight; bad items are isolated and reported by index.
        Items are prepared (files read, URLs fetched) by the worker that sends them."""
        return _Job(self, model, input_name, items, prepare).run()

    # -- public API --------------------------------------------------------------------------
    def _embed_as(self, embedding_type: str, model: str, input_name: str, items: list, prepare) -> np.ndarray:
        name = check_type(embedding_type)  # before any request
        try:
            return encode_rows(self._embed(model, input_name, items, prepare), name)
        except ItemErrors as err:
            raise encoded_errors(err, name) from None

    def embed_images(self, images: Iterable, *, embedding_type: str = DEFAULT_EMBEDDING_TYPE) -> np.ndarray:
        """``(N, D)`` float32 L2-normalised embeddings of paths, bytes, PIL images or http(s) URLs.

        ``embedding_type``: ``float16``, ``int8``, ``uint8``, ``binary`` or ``ubinary`` returns the rows
        in that compact encoding (:mod:`clip_triton.encodings`; an :class:`ItemErrors` carries them so too).
        """
        return self._embed_as(
            embedding_type,
            self.names.image,
            IMAGE_INPUT,
            list(images),
            lambda item: image_bytes(item, self.url_timeout),
        )

    def embed_texts(
        self, texts: Iterable[str], *, embedding_type: str = DEFAULT_EMBEDDING_TYPE, language: str | None = None
    ) -> np.ndarray:
        """``(N, D)`` float32 L2-normalised embeddings of strings (tokenized on the server);
        ``embedding_type`` as for :meth:`embed_images`. ``language``: the source-language code of every
        text for NLLB models (``fra_Latn``; a text may also start with ``>>fra_Latn<<``), checked first."""
        items = list(texts) if language is None else in_language(list(texts), language, self.facts)
        return self._embed_as(embedding_type, self.names.text, TEXT_INPUT, items, text_bytes)

    def prompt_embeddings(
        self, prompts: Sequence[str], templates: Sequence[str] | None = None, *, language: str | None = None
    ) -> np.ndarray:
        """One embedding per prompt (the normalised mean over templates), cached per prompt set."""
        key = prompt_set_key(prompts, templates, language)
        emb = self._text_cache.get(key)
        if emb is None:
            if templates:
                texts = template_texts(prompts, templates)
                emb = ensemble_templates(self.embed_texts(texts, language=language), len(prompts), len(templates))
            else:
                emb = self.embed_texts(list(prompts), language=language)
            self._text_cache.put(key, emb)
        return emb

    def classify(
        self,
        images: Sequence,
        prompts: Sequence[str],
        templates: Sequence[str] | None = None,
        *,
        language: str | None = None,
    ) -> list[list[dict]]:
        """Zero-shot scores: per image, every prompt's cosine and probability, ranked.

        Probabilities use the server's ``logit_scale``: a softmax over the prompts for CLIP models, an
        independent sigmoid per prompt with ``logit_bias`` for SigLIP models (``facts.scoring`` says which).
        """
        if not prompts:
            raise ValueError("classify needs at least one prompt")
        text = self.prompt_embeddings(list(prompts), templates, language=language)
        image = self.embed_images(images)
        return rank(image @ text.T, prompts, self.facts.logit_scale, self.facts.logit_bias)

    def index_folder(self, folder: str | os.PathLike, *, all_files: bool = False) -> EmbeddingIndex:
        """Embed every image under ``folder`` (recursive, sorted) into an :class:`EmbeddingIndex`:
        ``index.search("a red car", k=5)``, ``index.save("photos")``. Refused files are in ``index.failed``."""
        return EmbeddingIndex.from_folder(self, folder, all_files=all_files)

    @staticmethod
    def search(query: np.ndarray, index: np.ndarray, k: int = 5) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` rows of ``index`` by cosine to each query row: ``(indices, scores)``."""
        return top_k(query, index, k)

    def close(self) -> None:
        for client in self.clients:
            client.close()

    def __enter__(self) -> ClipClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
