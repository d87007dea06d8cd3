"""``ClipClient``: a thin client for the clip-triton ensembles over Triton gRPC.

numpy, pillow and tritonclient only. Facts that depend on the deployment (embedding size,
``logit_scale``, ``max_batch_size``, model name) are read from the server's model config, never
hard-coded. Large inputs are split into batches no larger than the server's ``max_batch_size`` and
sent several at a time; results come back in input order.
"""

from __future__ import annotations

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
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from clip_triton.contract import EMBEDDING_OUTPUT, IMAGE_ENSEMBLE, IMAGE_INPUT, STATUS_OUTPUT, TEXT_ENSEMBLE, TEXT_INPUT

RETRYABLE = ("StatusCode.UNAVAILABLE", "StatusCode.RESOURCE_EXHAUSTED")
# A (re)starting server accepts gRPC before its models are loaded and answers NOT_FOUND with this.
LOADING = "has no available versions"
# A python-backend stub that died answers INTERNAL with this until the server is restarted (by
# `clip-triton serve`'s watchdog or the orchestrator's liveness probe): worth waiting for.
STUB_DOWN = "is not healthy"
MAX_URL_BYTES = 20 * 1024 * 1024
# Transient failures (server restarting, overloaded, a stub being replaced) are retried for this long
# by default: a tritonserver restart takes ~60 s on a 2-core machine, and a job should ride it out.
RETRY_SECONDS = 150.0
MAX_BACKOFF_S = 5.0


class ClipClientError(Exception):
    """A request failed for a reason other than bad items (server down, timeout, misconfiguration)."""


class ItemErrors(ClipClientError):
    """Some items were refused. ``errors`` maps input index -> reason; ``embeddings`` holds the
    other rows (rows of failed items are NaN), so good results are never lost."""

    def __init__(self, errors: dict[int, str], embeddings: np.ndarray):
        self.errors = dict(sorted(errors.items()))
        self.embeddings = embeddings
        first = next(iter(self.errors.items()))
        super().__init__(f"{len(self.errors)} of {len(embeddings)} items failed; first: index {first[0]}: {first[1]}")


class JobFailed(ClipClientError):
    """A job stopped on a failure that retries did not outlast. Nothing answered is lost:
    ``embeddings`` holds every row answered (others NaN), ``answered`` their indices, ``errors`` the
    items refused so far."""

    def __init__(self, message: str, embeddings: np.ndarray, answered: list[int], errors: dict[int, str]):
        super().__init__(f"{message} ({len(answered)} of {len(embeddings)} items answered before it)")
        self.embeddings, self.answered, self.errors = embeddings, sorted(answered), dict(sorted(errors.items()))


def retry_delay(attempt: int, backoff: float) -> float:
    """Exponential backoff with jitter, capped at MAX_BACKOFF_S."""
    return min(backoff * (2**attempt), MAX_BACKOFF_S) * (0.5 + random.random())


def should_retry(exc, attempt: int, retries: int, deadline: float) -> bool:
    return retryable(exc) and attempt < retries and time.monotonic() < deadline


@dataclass(frozen=True)
class ServerFacts:
    model: str
    pretrained: str
    embed_dim: int
    logit_scale: float
    logit_bias: float | None
    max_batch_size: int
    random_weights: bool
    contract: str = ""  # the served ModelContract as JSON (tokenizer, preprocessing, tensor specs)
    item_status: bool = False  # the ensembles answer a batch with bad items whole, flagging them in STATUS


def facts_from_config(response: dict) -> ServerFacts:
    """Read the deployment's facts from ``get_model_config(clip_image, as_json=True)``."""
    config = response.get("config", response)
    params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
    return ServerFacts(
        model=params["model"],
        pretrained=params["pretrained"],
        embed_dim=int(params["embed_dim"]),
        logit_scale=float(params["logit_scale"]),
        logit_bias=float(params["logit_bias"]) if params.get("logit_bias") else None,
        max_batch_size=int(config.get("max_batch_size", 1)),
        random_weights=params.get("random_weights") == "true",
        contract=params.get("contract", ""),
        item_status=any(o.get("name") == STATUS_OUTPUT for o in config.get("output", [])),
    )


def requested_outputs(grpc, facts: ServerFacts) -> list:
    names = [EMBEDDING_OUTPUT, STATUS_OUTPUT] if facts.item_status else [EMBEDDING_OUTPUT]
    return [grpc.InferRequestedOutput(name) for name in names]


def split_result(result, facts: ServerFacts) -> tuple[np.ndarray, dict[int, str]]:
    """(embeddings, {row: reason}) of one answer: rows flagged in STATUS are the refused items."""
    embeddings = result.as_numpy(EMBEDDING_OUTPUT)
    failed = {}
    if facts.item_status:
        for row, status in enumerate(result.as_numpy(STATUS_OUTPUT).reshape(-1)):
            if status:
                failed[row] = item_reason(status.decode("utf-8", "replace") if isinstance(status, bytes) else str(status))
    return embeddings, failed


def record_rows(out: np.ndarray, chunk: list[int], answer: tuple[np.ndarray, dict[int, str]],
                errors: dict[int, str], answered: list[int]) -> None:
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


def prepare_texts(texts: Iterable[str]) -> list[bytes | Exception]:
    return [t.encode("utf-8") if isinstance(t, str) else TypeError(f"not a string: {t!r}") for t in texts]


def template_texts(prompts: Sequence[str], templates: Sequence[str]) -> list[str]:
    """Every prompt in every template, ``{}`` replaced literally: never ``str.format``, so a template's
    other braces (``{:>30000000}``, ``{0.__class__}``) are plain text."""
    return [t.replace("{}", p) for p in prompts for t in templates]


class PromptCache:
    """Prompt-set embeddings, least recently used first out: bounded however many distinct prompt sets
    callers send."""

    def __init__(self, entries: int = 256):
        self.entries, self._data = entries, OrderedDict()

    def get(self, key):
        value = self._data.get(key)
        if value is not None:
            self._data.move_to_end(key)
        return value

    def put(self, key, value) -> None:
        self._data[key] = value
        self._data.move_to_end(key)
        while len(self._data) > self.entries:
            self._data.popitem(last=False)

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


def record_or_split(exc, model: str, chunk: list[int], errors: dict[int, str]) -> bool:
    """After a failed batch: True means resend its items one by one to find the bad one(s).

    INVALID_ARGUMENT on a single item records that item's reason; any other status is a transport
    or server failure and raises :class:`ClipClientError`.
    """
    if _status(exc) != "StatusCode.INVALID_ARGUMENT":
        raise ClipClientError(f"{model}: {exc.message()}") from exc
    if len(chunk) == 1:
        errors[chunk[0]] = item_error(exc)
        return False
    return True


def fetch_url(url: str, timeout: float = 10.0, max_bytes: int = MAX_URL_BYTES) -> bytes:
    """Download an http(s) image with a time and size limit."""
    if not url.lower().startswith(("http://", "https://")):
        raise ValueError(f"not an http(s) URL: {url[:80]}")
    request = urllib.request.Request(url, headers={"User-Agent": "clip-triton"})
    with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 (scheme checked above)
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
    return (status in RETRYABLE or (status == "StatusCode.NOT_FOUND" and LOADING in str(exc))
            or (status == "StatusCode.INTERNAL" and STUB_DOWN in str(exc)))


class ClipClient:
    """Embed images and texts, classify zero-shot, search, through the clip-triton ensembles.

    ``url`` is ``host:port``, a ``dns:///host:port`` target (gRPC round-robin over every address the
    name resolves to: one per pod behind a headless Kubernetes Service), or a list of URLs used in
    turn (one gRPC connection pins to one server, so spreading needs several).
    """

    def __init__(self, url: str | Sequence[str] = "localhost:8001", *, timeout: float = 60.0, retries: int = 60,
                 backoff: float = 0.5, concurrency: int = 4, batch_size: int | None = None,
                 url_timeout: float = 10.0, progress: bool = False, retry_seconds: float = RETRY_SECONDS,
                 prompt_cache_entries: int = 256):
        import tritonclient.grpc as grpcclient  # noqa: PLC0415

        self._grpc = grpcclient
        urls = [url] if isinstance(url, str) else list(url)
        if not urls:
            raise ValueError("ClipClient needs at least one server URL")
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

    def wait_until_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            try:
                if all(c.is_model_ready(IMAGE_ENSEMBLE) and c.is_model_ready(TEXT_ENSEMBLE) for c in self.clients):
                    return
            except Exception as exc:  # noqa: BLE001 (not up yet: connection refused and friends)
                last = exc
            time.sleep(0.25)
        raise ClipClientError(f"clip-triton not ready after {timeout:.0f}s ({last})")

    @property
    def facts(self) -> ServerFacts:
        if self._facts is None:
            self._facts = facts_from_config(self._call(lambda c: c.get_model_config(IMAGE_ENSEMBLE, as_json=True)))
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

    def _infer(self, model: str, input_name: str, items: list[bytes]) -> tuple[np.ndarray, dict[int, str]]:
        array = np.array(items, dtype=object).reshape(-1, 1)
        tensor = self._grpc.InferInput(input_name, list(array.shape), "BYTES")
        tensor.set_data_from_numpy(array)
        outputs = requested_outputs(self._grpc, self.facts)
        result = self._call(lambda c: c.infer(model, [tensor], outputs=outputs, client_timeout=self.timeout))
        return split_result(result, self.facts)

    def _embed(self, model: str, input_name: str, items: list[bytes | Exception]) -> np.ndarray:
        """Embed items in batches, several in flight; bad items are isolated and reported by index."""
        from tritonclient.utils import InferenceServerException  # noqa: PLC0415

        size = self.batch_size
        out, errors, chunks = plan_batches(items, self.facts.embed_dim, size)
        total = sum(len(chunk) for chunk in chunks)

        answered: list[int] = []
        failure: list[ClipClientError] = []

        def run(chunk: list[int]) -> None:
            if failure:
                return  # the job already failed: queued batches are not sent
            try:
                record_rows(out, chunk, self._infer(model, input_name, [items[i] for i in chunk]), errors, answered)
            except InferenceServerException as exc:
                try:
                    split = record_or_split(exc, model, chunk, errors)
                except ClipClientError as err:
                    failure.append(err)
                    return
                if split:
                    for index in chunk:  # isolate the bad item(s); the others still get embeddings
                        run([index])

        done = 0
        with ThreadPoolExecutor(self.concurrency) as pool:
            for _ in pool.map(run, chunks):
                done += 1
                if self.progress:
                    print(f"\r{model}: {min(done * size, total)}/{total} items", end="", flush=True)
        if self.progress and chunks:
            print()
        if failure:
            raise JobFailed(str(failure[0]), out, answered, errors) from failure[0]
        if errors:
            raise ItemErrors(errors, out)
        return out

    # -- public API --------------------------------------------------------------------------
    def embed_images(self, images: Iterable) -> np.ndarray:
        """``(N, D)`` float32 L2-normalised embeddings of paths, bytes, PIL images or http(s) URLs."""
        return self._embed(IMAGE_ENSEMBLE, IMAGE_INPUT, prepare_images(images, self.url_timeout))

    def embed_texts(self, texts: Iterable[str]) -> np.ndarray:
        """``(N, D)`` float32 L2-normalised embeddings of strings (tokenized on the server)."""
        return self._embed(TEXT_ENSEMBLE, TEXT_INPUT, prepare_texts(texts))

    def prompt_embeddings(self, prompts: Sequence[str], templates: Sequence[str] | None = None) -> np.ndarray:
        """One embedding per prompt (the normalised mean over templates), cached per prompt set."""
        key = (*prompts, "\x00", *(templates or ()))
        emb = self._text_cache.get(key)
        if emb is None:
            if templates:
                texts = template_texts(prompts, templates)
                emb = ensemble_templates(self.embed_texts(texts), len(prompts), len(templates))
            else:
                emb = self.embed_texts(list(prompts))
            self._text_cache.put(key, emb)
        return emb

    def classify(self, images: Sequence, prompts: Sequence[str], templates: Sequence[str] | None = None) -> list[list[dict]]:
        """Zero-shot scores: per image, every prompt's cosine and softmax probability, ranked.

        Probabilities use the server's ``logit_scale`` (and ``logit_bias`` where the model has one).
        """
        if not prompts:
            raise ValueError("classify needs at least one prompt")
        text = self.prompt_embeddings(list(prompts), templates)
        image = self.embed_images(images)
        return rank(image @ text.T, prompts, self.facts.logit_scale, self.facts.logit_bias)

    def index_folder(self, folder: str | os.PathLike, suffixes: Iterable[str] = (".jpg", ".jpeg", ".png", ".webp",
                     ".bmp", ".gif", ".tif", ".tiff")) -> tuple[list[Path], np.ndarray]:
        """Embed every image under ``folder`` (recursive, sorted): ``(paths, embeddings)`` for :meth:`search`."""
        allowed = {s.lower() for s in suffixes}
        paths = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in allowed)
        return paths, self.embed_images(paths)

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

    def __enter__(self) -> "ClipClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def rank(cosines: np.ndarray, prompts: Sequence[str], logit_scale: float, logit_bias: float | None = None) -> list[list[dict]]:
    """Per row of ``cosines``: prompts ranked by probability, ``softmax(logit_scale * cos + bias)``."""
    logits = logit_scale * cosines + (logit_bias or 0.0)
    logits = logits - logits.max(axis=1, keepdims=True)
    probs = np.exp(logits)
    probs /= probs.sum(axis=1, keepdims=True)
    results = []
    for row_cos, row_prob in zip(cosines, probs):
        order = np.argsort(-row_prob, kind="stable")
        results.append([{"prompt": prompts[j], "cosine": float(row_cos[j]), "probability": float(row_prob[j])}
                        for j in order])
    return results
