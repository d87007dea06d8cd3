"""``ClipClient``: a thin client for the clip-triton ensembles over Triton gRPC.

numpy, pillow and tritonclient only. Facts that depend on the deployment (embedding size,
``logit_scale``, ``max_batch_size``, model name) are read from the server's model config, never
hard-coded. Large inputs are split into batches no larger than the server's ``max_batch_size`` and
sent several at a time; results come back in input order.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import os
import random
import re
import threading
import time
import urllib.request
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from clip_triton.contract import (
    DEFAULT_URL,
    EMBEDDING_OUTPUT,
    IMAGE_ENSEMBLE,
    IMAGE_INPUT,
    STATUS_OUTPUT,
    STUB_NOT_HEALTHY,
    TEXT_ENSEMBLE,
    TEXT_INPUT,
)
from clip_triton.errors import ClipTritonError
from clip_triton.facts import ServerFacts

from .index import EmbeddingIndex

RETRYABLE = ("StatusCode.UNAVAILABLE", "StatusCode.RESOURCE_EXHAUSTED")
# A (re)starting server accepts gRPC before its models are loaded and answers NOT_FOUND with this.
LOADING = "has no available versions"
# A python-backend stub that died answers INTERNAL with this until the server is restarted (by
# `clip-triton serve`'s watchdog or the orchestrator's liveness probe): worth waiting for.
STUB_DOWN = STUB_NOT_HEALTHY
MAX_URL_BYTES = 20 * 1024 * 1024
# Transient failures (server restarting, overloaded, a stub being replaced) are retried for this long
# by default: a tritonserver restart takes ~60 s on a 2-core machine, and a job should ride it out.
RETRY_SECONDS = 150.0
MAX_BACKOFF_S = 5.0
# Per-request deadlines when ``timeout`` is None ("auto"). A request waits behind every item in flight,
# so its deadline scales with them: DEADLINE_SAFETY x the job's measured seconds per item x the items
# in flight when it is sent, never under AUTO_DEADLINE_FLOOR_S. Until the first answer measures the
# server, FIRST_SECONDS_PER_ITEM per item is assumed (generous: a CPU-served ViT-L needs ~1 s).
AUTO_DEADLINE_FLOOR_S = 60.0
FIRST_SECONDS_PER_ITEM = 2.0
DEADLINE_SAFETY = 4.0
DEADLINE_HINT = (
    "the server is busy, not down: raise --timeout (seconds per request; timeout= in Python) "
    "or lower --batch-size / --concurrency"
)


class ClipClientError(ClipTritonError):
    """A request failed for a reason other than bad items (server down, deadline, misconfiguration).

    A :class:`~clip_triton.errors.ClipTritonError`: ``message`` says what happened, ``hint`` what to do.
    """

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message, hint)


class ServerUnavailable(ClipClientError):
    """The server could not be reached (or stayed unreachable for ``retry_seconds``)."""


class DeadlineExceeded(ClipClientError):
    """A request missed its deadline: the server is slower than the deadline allowed, not down."""


class ItemErrors(ClipClientError):
    """Some items were refused. ``errors`` maps input index -> reason; ``embeddings`` holds the
    other rows (rows of failed items are NaN), so good results are never lost."""

    def __init__(self, errors: dict[int, str], embeddings: np.ndarray):
        self.errors = dict(sorted(errors.items()))
        self.embeddings = embeddings
        first = next(iter(self.errors.items()))
        super().__init__(f"{len(self.errors)} of {len(embeddings)} items failed; first: index {first[0]}: {first[1]}")

    def __reduce__(self):
        return (type(self), (self.errors, self.embeddings))


class JobFailed(ClipClientError):
    """A job stopped on a failure that retries did not outlast. Nothing answered is lost:
    ``embeddings`` holds every row answered (others NaN), ``answered`` their indices, ``errors`` the
    items refused so far; ``cause`` is the failure (a :class:`ClipClientError` with its hint)."""

    def __init__(self, cause: ClipClientError, embeddings: np.ndarray, answered: list[int], errors: dict[int, str]):
        super().__init__(f"{cause.message} ({len(answered)} of {len(embeddings)} items answered before it)", cause.hint)
        self.cause = cause
        self.embeddings, self.answered, self.errors = embeddings, sorted(answered), dict(sorted(errors.items()))

    def __reduce__(self):
        return (type(self), (self.cause, self.embeddings, self.answered, self.errors))


class JobInterrupted(KeyboardInterrupt):
    """Ctrl-C (or any interruption) during a job: queued requests were dropped and in-flight ones
    cancelled at once. A ``KeyboardInterrupt``, so callers that do not look stop as usual; those that
    do find every row answered before it in ``embeddings`` (others NaN), ``answered`` and ``errors``."""

    def __init__(self, embeddings: np.ndarray, answered: list[int], errors: dict[int, str]):
        super().__init__(f"interrupted: {len(answered)} of {len(embeddings)} items answered")
        self.embeddings, self.answered, self.errors = embeddings, sorted(answered), dict(sorted(errors.items()))


def retry_delay(attempt: int, backoff: float) -> float:
    """Exponential backoff with jitter, capped at MAX_BACKOFF_S."""
    return min(backoff * (2**attempt), MAX_BACKOFF_S) * (0.5 + random.random())


def should_retry(exc, attempt: int, retries: int, deadline: float) -> bool:
    return retryable(exc) and attempt < retries and time.monotonic() < deadline


def requested_outputs(grpc, facts: ServerFacts) -> list:
    names = [EMBEDDING_OUTPUT, STATUS_OUTPUT] if facts.item_status else [EMBEDDING_OUTPUT]
    return [grpc.InferRequestedOutput(name) for name in names]


def split_result(result, facts: ServerFacts) -> tuple[np.ndarray, dict[int, str]]:
    """(embeddings, {row: reason}) of one answer: rows flagged in STATUS are the refused items.

    An answer without an output this client asked for is refused with a clear error, never read as
    data: Triton's response cache ignores which outputs a request names, so a cached ensemble that
    clients call directly (a repository from before issue 25, or a raw request to the internal
    ``clip_*_cached`` naming one output) can hand a client the entry a request for fewer outputs left."""
    embeddings = result.as_numpy(EMBEDDING_OUTPUT)
    statuses = result.as_numpy(STATUS_OUTPUT) if facts.item_status else None
    missing = [name for name, value in ((EMBEDDING_OUTPUT, embeddings), (STATUS_OUTPUT, statuses)) if value is None]
    if missing and not (missing == [STATUS_OUTPUT] and not facts.item_status):
        raise ClipClientError(
            f"the server answered without its {' and '.join(missing)} output, which this client asked for "
            "(Triton's response cache ignores which outputs a request names: another client asked for fewer)",
            "rewrite the repository with this version's `clip-triton repo` (its cache sits behind a step that "
            "asks for both), have raw clients ask the internal clip_*_cached models for both outputs or none, or "
            "restart the server to empty its cache",
        )
    if statuses is not None and statuses.size != len(embeddings):
        raise ClipClientError(
            f"the server answered {len(embeddings)} embeddings but {statuses.size} STATUS rows",
            "check that the repository was written by `clip-triton repo`",
        )
    failed = {}
    if statuses is not None:
        for row, status in enumerate(statuses.reshape(-1)):
            if status:
                failed[row] = item_reason(
                    status.decode("utf-8", "replace") if isinstance(status, bytes) else str(status)
                )
    return embeddings, failed


def record_rows(
    out: np.ndarray,
    chunk: list[int],
    answer: tuple[np.ndarray, dict[int, str]],
    errors: dict[int, str],
    answered: list[int],
) -> None:
    """Put one answer's rows in place: good rows into ``out``, flagged ones into ``errors`` (NaN rows)."""
    embeddings, failed = answer
    for row, index in enumerate(chunk):
        if row in failed:
            errors[index] = failed[row]
        else:
            out[index] = embeddings[row]
            answered.append(index)


def prepare_images(images: Iterable, url_timeout: float) -> list[bytes | Exception]:
    prepared: list[bytes | Exception] = []
    for item in images:
        try:
            prepared.append(image_bytes(item, url_timeout))
        except (OSError, ValueError, TypeError) as exc:
            prepared.append(exc)
    return prepared


def text_bytes(text) -> bytes:
    if not isinstance(text, str):
        raise TypeError(f"not a string: {text!r:.80}")
    return text.encode("utf-8")


def prepare_texts(texts: Iterable[str]) -> list[bytes | Exception]:
    prepared: list[bytes | Exception] = []
    for text in texts:
        try:
            prepared.append(text_bytes(text))
        except TypeError as exc:
            prepared.append(exc)
    return prepared


def template_texts(prompts: Sequence[str], templates: Sequence[str]) -> list[str]:
    """Every prompt in every template, ``{}`` replaced literally: never ``str.format``, so a template's
    other braces (``{:>30000000}``, ``{0.__class__}``) are plain text."""
    return [t.replace("{}", p) for p in prompts for t in templates]


DEFAULT_PROMPT_CACHE_BYTES = 64 * 1024 * 1024


def prompt_set_key(prompts: Sequence[str], templates: Sequence[str] | None) -> bytes:
    """A prompt set's cache key: the SHA-256 of its prompts and templates, each length-prefixed (so no two
    sets share a key by concatenation). 32 bytes, whatever the set holds: keys holding the strings made
    each cached set of 256 long prompts cost +64 MB."""
    digest = hashlib.sha256()
    for group in (prompts, templates or ()):
        digest.update(len(group).to_bytes(8, "little"))
        for text in group:
            data = text.encode("utf-8", "surrogatepass")
            digest.update(len(data).to_bytes(8, "little") + data)
    return digest.digest()


class PromptCache:
    """Prompt-set embeddings (keyed by :func:`prompt_set_key`), least recently used first out: bounded
    in entries and in bytes (the arrays plus their keys), however many and however large the prompt
    sets callers send. A value larger than the whole budget is not kept."""

    def __init__(self, entries: int = 256, max_bytes: int = DEFAULT_PROMPT_CACHE_BYTES):
        self.entries, self.max_bytes = entries, max_bytes
        self._data: OrderedDict = OrderedDict()
        self.bytes = 0

    def get(self, key):
        value = self._data.get(key)
        if value is not None:
            self._data.move_to_end(key)
        return value

    @staticmethod
    def _size(key, value) -> int:
        return int(getattr(value, "nbytes", 0)) + len(key)

    def put(self, key, value) -> None:
        size = self._size(key, value)
        if size > self.max_bytes or self.entries <= 0:
            return
        if key in self._data:
            self.bytes -= self._size(key, self._data.pop(key))
        self._data[key] = value
        self.bytes += size
        while len(self._data) > self.entries or self.bytes > self.max_bytes:
            self.bytes -= self._size(*self._data.popitem(last=False))

    def __len__(self) -> int:
        return len(self._data)


def ensemble_templates(embeddings: np.ndarray, n_prompts: int, n_templates: int) -> np.ndarray:
    mean = embeddings.reshape(n_prompts, n_templates, -1).mean(axis=1)
    return mean / np.linalg.norm(mean, axis=-1, keepdims=True)


def item_reason(text: str) -> str:
    """The server's reason for one item, without what precedes it ("[ensemble ...] item 3: ")."""
    return re.split(r"item \d+: ", text, maxsplit=1)[-1]


def item_error(exc) -> str:
    """The server's reason for a single-item request, without the ensemble prefix."""
    message = exc.message() if callable(getattr(exc, "message", None)) else str(exc)
    return item_reason(message or str(exc))


def plan_batches(items: list, embed_dim: int, batch_size: int) -> tuple[np.ndarray, dict[int, str], list[list[int]]]:
    """NaN-filled output rows, the items that already failed on the client (index -> reason), and
    the other indices split into batches of ``batch_size``."""
    out = np.full((len(items), embed_dim), np.nan, dtype=np.float32)
    errors = {i: str(x) for i, x in enumerate(items) if isinstance(x, Exception)}
    good = [i for i in range(len(items)) if i not in errors]
    return out, errors, [good[i : i + batch_size] for i in range(0, len(good), batch_size)]


def record_or_split(exc, model: str, chunk: list[int], errors: dict[int, str], target: str = "") -> bool:
    """After a failed batch: True means resend its items one by one to find the bad one(s).

    INVALID_ARGUMENT on a single item records that item's reason; any other status is a transport
    or server failure and raises :class:`ClipClientError`.
    """
    if _status(exc) != "StatusCode.INVALID_ARGUMENT":
        raise transport_error(exc, model, target) from exc
    if len(chunk) == 1:
        errors[chunk[0]] = item_error(exc)
        return False
    return True


def fetch_url(url: str, timeout: float = 10.0, max_bytes: int = MAX_URL_BYTES) -> bytes:
    """Download an http(s) image with a time and size limit."""
    if not url.lower().startswith(("http://", "https://")):
        raise ValueError(f"not an http(s) URL: {url[:80]}")
    request = urllib.request.Request(url, headers={"User-Agent": "clip-triton"})  # noqa: S310 (http(s) checked above)
    with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310
        length = response.headers.get("Content-Length")
        if length and int(length) > max_bytes:
            raise ValueError(f"{url} is {length} bytes, over the {max_bytes} byte limit")
        data = response.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ValueError(f"{url} is over the {max_bytes} byte limit")
    return data


def image_bytes(item, url_timeout: float = 10.0) -> bytes:
    """Encoded bytes for a path, bytes, PIL image or http(s) URL."""
    if isinstance(item, (bytes, bytearray, memoryview)):
        return bytes(item)
    if isinstance(item, (str, os.PathLike)):
        text = os.fspath(item)
        if text.lower().startswith(("http://", "https://")):
            return fetch_url(text, timeout=url_timeout)
        return Path(text).read_bytes()
    if hasattr(item, "save") and hasattr(item, "mode"):  # PIL image: lossless PNG keeps its pixels
        buffer = io.BytesIO()
        item.save(buffer, format="PNG")
        return buffer.getvalue()
    raise TypeError(f"unsupported image item of type {type(item).__name__}")


def _status(exc) -> str:
    status = getattr(exc, "status", None)
    return str(status() if callable(status) else status)


def retryable(exc) -> bool:
    """Transient: server unreachable, overloaded, or still loading its models."""
    status = _status(exc)
    return (
        status in RETRYABLE
        or (status == "StatusCode.NOT_FOUND" and LOADING in str(exc))
        or (status == "StatusCode.INTERNAL" and STUB_DOWN in str(exc))
    )


def transport_error(exc, model: str, target: str = "") -> ClipClientError:
    """The :class:`ClipClientError` for a failure that is not a bad item, with the next step in its hint."""
    message = exc.message() if callable(getattr(exc, "message", None)) else str(exc)
    status = _status(exc)
    if status == "StatusCode.DEADLINE_EXCEEDED":
        return DeadlineExceeded(f"{model}: request missed its deadline ({message})", DEADLINE_HINT)
    if status == "StatusCode.UNAVAILABLE":
        where = f" at {target}" if target else ""
        return ServerUnavailable(
            f"{model}: no server reachable{where} ({message})", "is the server up? check --url (or $CLIP_TRITON_URL)"
        )
    return ClipClientError(f"{model}: {message}")


class DeadlinePolicy:
    """Deadlines per request: fixed (``timeout`` seconds) or, with ``timeout=None``, scaled to the work
    in front of each request (see ``AUTO_DEADLINE_FLOOR_S``). Thread-safe."""

    def __init__(self, timeout: float | None, clock=time.monotonic):
        if timeout is not None and timeout <= 0:
            raise ValueError(f"timeout must be positive seconds or None (auto), not {timeout}")
        self.fixed, self._clock, self._lock = timeout, clock, threading.Lock()
        self._started: float | None = None
        self._items_done = 0

    @property
    def auto(self) -> bool:
        return self.fixed is None

    def seconds_per_item(self) -> float | None:
        """The job's measured service time per item (wall time since the first send / items answered)."""
        with self._lock:
            if not self._items_done or self._started is None:
                return None
            return (self._clock() - self._started) / self._items_done

    def deadline(self, items_in_flight: int) -> float:
        """Seconds the request about to be sent may take, ``items_in_flight`` counting its own items."""
        with self._lock:
            if self._started is None:
                self._started = self._clock()
        if self.fixed is not None:
            return self.fixed
        per_item = self.seconds_per_item() or FIRST_SECONDS_PER_ITEM
        return max(AUTO_DEADLINE_FLOOR_S, DEADLINE_SAFETY * per_item * max(1, items_in_flight))

    def answered(self, items: int) -> None:
        with self._lock:
            self._items_done += items


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
        chunks = [list(range(i, min(i + self.size, n))) for i in range(0, n, self.size)]
        kind = "images" if self.model == IMAGE_ENSEMBLE else "texts"
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
        array = np.array(payload, dtype=object).reshape(-1, 1)
        tensor = grpc.InferInput(self.input_name, list(array.shape), "BYTES")
        tensor.set_data_from_numpy(array)
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
                    if _status(exc) == "StatusCode.DEADLINE_EXCEEDED":
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
    ):
        """``timeout``: seconds per request, or None (default) for deadlines scaled to the items in flight
        and the server's measured speed (see :class:`DeadlinePolicy`). ``progress``: a bar on stderr
        (None: only when stderr is a terminal)."""
        import tritonclient.grpc as grpcclient  # noqa: PLC0415

        self._grpc = grpcclient
        urls = [url] if isinstance(url, str) else list(url)
        if not urls:
            raise ValueError("ClipClient needs at least one server URL")
        DeadlinePolicy(timeout)  # validates
        self.target = ",".join(urls)
        self.clients = []
        for target in urls:
            args = [("grpc.lb_policy_name", "round_robin")] if target.startswith("dns:") else None
            self.clients.append(grpcclient.InferenceServerClient(target, channel_args=args))
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
        self._facts: ServerFacts | None = None
        self._text_cache = PromptCache(prompt_cache_entries)

    # -- server facts ------------------------------------------------------------------------
    def _client(self):
        with self._lock:
            return self.clients[next(self._next)]

    def readiness(self) -> str | None:
        """None when both ensembles are ready on every server, else what is missing, in words."""
        for target, client in zip(self.target.split(","), self.clients):
            try:
                if not client.is_server_live():
                    return f"the server at {target} is not live"
                missing = [m for m in (IMAGE_ENSEMBLE, TEXT_ENSEMBLE) if not client.is_model_ready(m)]
            except Exception as exc:  # noqa: BLE001 (connection refused, DNS, TLS: all mean unreachable)
                message = getattr(exc, "message", None)
                text = message() if callable(message) else str(exc)
                return f"no server answers at {target} ({(text or type(exc).__name__).splitlines()[0]})"
            if missing:
                return f"the server at {target} is up but {' and '.join(missing)} is not ready (still loading?)"
        return None

    def wait_until_ready(self, timeout: float = 120.0) -> None:
        """Wait until both ensembles answer ready on every server; the error says what was missing."""
        deadline = time.monotonic() + timeout
        while True:
            reason = self.readiness()
            if reason is None:
                return
            if time.monotonic() >= deadline:
                hint = (
                    "start it with `clip-triton serve --repo REPO`, or check --url / $CLIP_TRITON_URL"
                    if reason.startswith("no server")
                    else "wait longer (--ready-timeout) or read the server log"
                )
                raise ServerUnavailable(f"clip-triton not ready after {timeout:.0f} s: {reason}", hint)
            time.sleep(0.25)

    @property
    def facts(self) -> ServerFacts:
        from tritonclient.utils import InferenceServerException  # noqa: PLC0415

        if self._facts is None:
            try:
                config = self._call(lambda c: c.get_model_config(IMAGE_ENSEMBLE, as_json=True))
            except InferenceServerException as exc:
                raise transport_error(exc, IMAGE_ENSEMBLE, self.target) from None
            self._facts = ServerFacts.from_config(config)
        return self._facts

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
    def embed_images(self, images: Iterable) -> np.ndarray:
        """``(N, D)`` float32 L2-normalised embeddings of paths, bytes, PIL images or http(s) URLs."""
        return self._embed(IMAGE_ENSEMBLE, IMAGE_INPUT, list(images), lambda item: image_bytes(item, self.url_timeout))

    def embed_texts(self, texts: Iterable[str]) -> np.ndarray:
        """``(N, D)`` float32 L2-normalised embeddings of strings (tokenized on the server)."""
        return self._embed(TEXT_ENSEMBLE, TEXT_INPUT, list(texts), text_bytes)

    def prompt_embeddings(self, prompts: Sequence[str], templates: Sequence[str] | None = None) -> np.ndarray:
        """One embedding per prompt (the normalised mean over templates), cached per prompt set."""
        key = prompt_set_key(prompts, templates)
        emb = self._text_cache.get(key)
        if emb is None:
            if templates:
                texts = template_texts(prompts, templates)
                emb = ensemble_templates(self.embed_texts(texts), len(prompts), len(templates))
            else:
                emb = self.embed_texts(list(prompts))
            self._text_cache.put(key, emb)
        return emb

    def classify(
        self, images: Sequence, prompts: Sequence[str], templates: Sequence[str] | None = None
    ) -> list[list[dict]]:
        """Zero-shot scores: per image, every prompt's cosine and probability, ranked.

        Probabilities use the server's ``logit_scale``: a softmax over the prompts for CLIP models, an
        independent sigmoid per prompt with ``logit_bias`` for SigLIP models (``facts.scoring`` says which).
        """
        if not prompts:
            raise ValueError("classify needs at least one prompt")
        text = self.prompt_embeddings(list(prompts), templates)
        image = self.embed_images(images)
        return rank(image @ text.T, prompts, self.facts.logit_scale, self.facts.logit_bias)

    def index_folder(self, folder: str | os.PathLike, *, all_files: bool = False) -> EmbeddingIndex:
        """Embed every image under ``folder`` (recursive, sorted) into an :class:`EmbeddingIndex`:
        ``index.search("a red car", k=5)``, ``index.save("photos")``. Refused files are in ``index.failed``."""
        return EmbeddingIndex.from_folder(self, folder, all_files=all_files)

    @staticmethod
    def search(query: np.ndarray, index: np.ndarray, k: int = 5) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` rows of ``index`` by cosine to each query row: ``(indices, scores)``."""
        query = np.atleast_2d(np.asarray(query, dtype=np.float32))
        scores = query @ np.asarray(index, dtype=np.float32).T
        k = min(k, scores.shape[1])
        top = np.argsort(-scores, axis=1)[:, :k]
        return top, np.take_along_axis(scores, top, axis=1)

    def close(self) -> None:
        for client in self.clients:
            client.close()

    def __enter__(self) -> ClipClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def rank(
    cosines: np.ndarray, prompts: Sequence[str], logit_scale: float, logit_bias: float | None = None
) -> list[list[dict]]:
    """Per row of ``cosines``: prompts ranked by probability, as the model was trained to score them.

    CLIP (no ``logit_bias``): ``softmax(logit_scale * cos)`` over the prompts, summing to 1. SigLIP
    (a learned ``logit_bias``): ``sigmoid(logit_scale * cos + logit_bias)`` for each prompt on its
    own: a probability that the prompt matches, independent of the other prompts (open_clip's
    ``SigLipLoss``); a softmax there would invent a competition the model never learned."""
    logits = logit_scale * cosines + (logit_bias or 0.0)
    if logit_bias is not None:
        probs = 0.5 * (1.0 + np.tanh(0.5 * logits))  # the sigmoid, without overflow for large |logits|
    else:
        logits = logits - logits.max(axis=1, keepdims=True)
        probs = np.exp(logits)
        probs /= probs.sum(axis=1, keepdims=True)
    results = []
    for row_cos, row_prob in zip(cosines, probs):
        order = np.argsort(-row_prob, kind="stable")
        results.append(
            [{"prompt": prompts[j], "cosine": float(row_cos[j]), "probability": float(row_prob[j])} for j in order]
        )
    return results
