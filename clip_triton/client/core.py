"""The clients' sans-I/O core: retry policy, deadlines, batch plans, and reading answers.

Shared by :class:`~clip_triton.client.grpc_client.ClipClient` (threads) and
:class:`~clip_triton.client.aio_client.AsyncClipClient` (asyncio): every function here decides from its
arguments (an exception, an answer, a clock) and does no I/O, so the fast tests drive it directly.
"""

from __future__ import annotations

import functools
import random
import re
import threading
import time
from collections.abc import Callable, Iterable
from typing import NamedTuple

import numpy as np

from clip_triton.contract import (
    DEFAULT_EMBEDDING_TYPE,
    EMBEDDING_OUTPUT,
    STATUS_OUTPUT,
    STUB_NOT_HEALTHY,
    TOKENS_OUTPUT,
    ModelNames,
    served_slug,
    with_language,
)
from clip_triton.encodings import encode
from clip_triton.facts import ServerFacts, resolve_alias

from .errors import DEADLINE_HINT, ClipClientError, DeadlineExceeded, ItemErrors, ServerUnavailable, UnknownLanguage

RETRYABLE = ("StatusCode.UNAVAILABLE", "StatusCode.RESOURCE_EXHAUSTED")
# A (re)starting server accepts gRPC before its models are loaded and answers NOT_FOUND with this.
LOADING = "has no available versions"
# A python-backend stub that died answers INTERNAL with this until the server is restarted (by
# `clip-triton serve`'s watchdog or the orchestrator's liveness probe): worth waiting for.
STUB_DOWN = STUB_NOT_HEALTHY
MAX_BACKOFF_S = 5.0
# Per-request deadlines when ``timeout`` is None ("auto"). A request waits behind every item in flight,
# so its deadline scales with them: DEADLINE_SAFETY x the job's measured seconds per item x the items
# in flight when it is sent, never under AUTO_DEADLINE_FLOOR_S. Until the first answer measures the
# server, FIRST_SECONDS_PER_ITEM per item is assumed (generous: a CPU-served ViT-L needs ~1 s).
AUTO_DEADLINE_FLOOR_S = 60.0
FIRST_SECONDS_PER_ITEM = 2.0
DEADLINE_SAFETY = 4.0


class Readiness(NamedTuple):
    """Where a deployment stands before a job: ``ready``, ``loading`` (it answers, models not ready)
    or ``unreachable`` (nothing answers at the address); ``reason`` in words (None when ready)."""

    state: str
    reason: str | None


def retry_delay(attempt: int, backoff: float) -> float:
    """Exponential backoff with jitter, capped at MAX_BACKOFF_S."""
    return min(backoff * (2**attempt), MAX_BACKOFF_S) * (0.5 + random.random())


def should_retry(exc, attempt: int, retries: int, deadline: float) -> bool:
    return retryable(exc) and attempt < retries and time.monotonic() < deadline


def output_names(facts: ServerFacts, tokens: bool = False) -> list[str]:
    """The outputs every request asks for: EMBEDDING, and STATUS where the server has it; ``tokens``:
    each text's token count too, where the server counts them (``facts.token_counts``)."""
    names = [EMBEDDING_OUTPUT, STATUS_OUTPUT] if facts.item_status else [EMBEDDING_OUTPUT]
    return [*names, TOKENS_OUTPUT] if tokens and facts.token_counts else names


def token_counts(result, rows: int) -> np.ndarray:
    """The TOKENS output of an answer this client asked it of, one count per row."""
    counts = result.as_numpy(TOKENS_OUTPUT)
    if counts is None or counts.size != rows:
        raise ClipClientError(
            f"the server answered {'no' if counts is None else counts.size} TOKENS rows for {rows} texts",
            "check that the repository was written by this version's `clip-triton repo`",
        )
    return counts.reshape(-1).astype(np.int64)


# -- which served model (issue 30) ------------------------------------------------------------------
class ServedModel(NamedTuple):
    """One model a server serves: its Triton names and its facts."""

    names: ModelNames
    facts: ServerFacts


def index_names(response) -> list[str]:
    """The ready models' names in a ``get_inference_statistics(as_json=True)`` answer (all models: no
    name asked). Statistics, not the repository index: deployments restrict Triton's model-repository
    API (it also loads and unloads) to an admin header, and keep statistics open (clip_triton/server.py
    ADMIN_APIS); Triton answers an unnamed statistics request with every ready model (core
    tritonserver.cc ``TRITONSERVER_ServerModelStatistics``)."""
    models = response.get("model_stats", []) if isinstance(response, dict) else getattr(response, "model_stats", [])
    return [m["name"] if isinstance(m, dict) else m.name for m in models]


def catalog(index: Iterable[str], read_facts: Callable[[str], ServerFacts]) -> dict[str, ServedModel]:
    """Every served model, by public id, from the ready models' names and each image ensemble's facts."""
    models: dict[str, ServedModel] = {}
    for names in ModelNames.served_in(index):
        facts = read_facts(names.image)
        models[facts.public_id] = ServedModel(names, facts)
    return models


def choose_model(models: dict[str, ServedModel], wanted: str | None, target: str) -> ServedModel:
    """The served model a client asked for (``wanted``; None: the only one). Never a silent default:
    a server of several models refuses a client that names none, and an unknown name lists the others."""
    listed = ", ".join(repr(name) for name in sorted(models))
    if not models:
        raise ClipClientError(
            f"the server at {target} serves no clip-triton model (no clip_image ensemble is ready there)",
            "point the client at a clip-triton server (`clip-triton serve --repo REPO`)",
        )
    if wanted is None:
        if len(models) == 1:
            return next(iter(models.values()))
        raise ClipClientError(
            f"the server at {target} serves {len(models)} models ({listed}): say which one",
            "ClipClient(url, model=NAME), or --served-model NAME on the command line",
        )
    if wanted in models:
        return models[wanted]
    alias = resolve_alias(wanted, {name: m.facts for name, m in models.items()})  # "ARCH/TAG"
    if alias is not None:
        return models[alias]
    raise ClipClientError(
        f"model {wanted!r} is not served at {target}; it serves {listed}", "pass one of those names as the model"
    )


def readiness_candidates(
    index: Iterable[str] | None, wanted: str | None, served: ServedModel | None = None
) -> list[ModelNames]:
    """The served models whose ensembles a readiness check waits for: the one a client already resolved
    (``served``; no ``index`` needed), else, before their facts are read, the wanted one in ``index``
    (its multi-model names, or the single-model names), else every one there."""
    if served is not None:
        return [served.names]
    found = ModelNames.served_in(index or ())
    if wanted is not None:
        own = [names for names in found if names.slug in (served_slug(wanted), "")]
        if own:
            return own
    return found  # an unknown name is refused once they load


def in_language(texts: list[str], language: str | None, facts: ServerFacts) -> list[str]:
    """``texts`` marked with a source-language code (``>>code<< text``, contract ``with_language``), checked
    against the model's codes before any request: a model without languages would read the mark as text."""
    problem = facts.language_problem(language)
    if problem:
        raise UnknownLanguage(problem, "pass one of client.facts.languages, or no language (the model's default)")
    return [with_language(text, language) for text in texts]


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


def item_reason(text: str) -> str:
    """The server's reason for one item, without what precedes it ("[ensemble ...] item 3: ")."""
    return re.split(r"item \d+: ", text, maxsplit=1)[-1]


def item_error(exc) -> str:
    """The server's reason for a single-item request, without the ensemble prefix."""
    message = exc.message() if callable(getattr(exc, "message", None)) else str(exc)
    return item_reason(message or str(exc))


def plan_batches(
    items: list, embed_dim: int, batch_size: int, lengths: TextLengths | None = None
) -> tuple[np.ndarray, dict[int, str], list[list[int]]]:
    """NaN-filled output rows, the items that already failed on the client (index -> reason), and
    the other indices split into batches of ``batch_size`` (texts: one length bucket a batch, where
    ``lengths`` says the server's text graph has buckets)."""
    out = np.full((len(items), embed_dim), np.nan, dtype=np.float32)
    errors = {i: str(x) for i, x in enumerate(items) if isinstance(x, Exception)}
    good = [i for i in range(len(items)) if i not in errors]
    if lengths is not None and lengths.groups:
        keys = [lengths.key(item) if i not in errors else (0, 0) for i, item in enumerate(items)]
        return out, errors, length_batches(keys, good, batch_size)
    return out, errors, [good[i : i + batch_size] for i in range(0, len(good), batch_size)]


def record_or_split(exc, model: str, chunk: list[int], errors: dict[int, str], target: str = "") -> bool:
    """After a failed batch: True means resend its items one by one to find the bad one(s).

    INVALID_ARGUMENT on a single item records that item's reason; any other status is a transport
    or server failure and raises :class:`ClipClientError`.
    """
    if status_of(exc) != "StatusCode.INVALID_ARGUMENT":
        raise transport_error(exc, model, target) from exc
    if len(chunk) == 1:
        errors[chunk[0]] = item_error(exc)
        return False
    return True


def status_of(exc) -> str:
    """The gRPC status of a tritonclient error, as text (``StatusCode.UNAVAILABLE``)."""
    status = getattr(exc, "status", None)
    return str(status() if callable(status) else status)


def retryable(exc) -> bool:
    """Transient: server unreachable, overloaded, or still loading its models."""
    status = status_of(exc)
    return (
        status in RETRYABLE
        or (status == "StatusCode.NOT_FOUND" and LOADING in str(exc))
        or (status == "StatusCode.INTERNAL" and STUB_DOWN in str(exc))
    )


def transport_error(exc, model: str, target: str = "") -> ClipClientError:
    """The :class:`ClipClientError` for a failure that is not a bad item, with the next step in its hint."""
    message = exc.message() if callable(getattr(exc, "message", None)) else str(exc)
    status = status_of(exc)
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


# -- compact encodings -----------------------------------------------------------------------------
def encode_rows(vectors: np.ndarray, embedding_type: str) -> np.ndarray:
    """An embed call's float32 rows in ``embedding_type`` (:mod:`clip_triton.encodings`); a refused
    item's NaN row encodes as zeros (its index is in the error either way)."""
    if embedding_type == DEFAULT_EMBEDDING_TYPE:
        return vectors
    return encode(np.nan_to_num(vectors, nan=0.0), embedding_type)


def encoded_errors(err: ItemErrors, embedding_type: str) -> ItemErrors:
    """``err`` with its answered rows in ``embedding_type``."""
    return ItemErrors(err.errors, encode_rows(err.embeddings, embedding_type))


# -- length-aware batching (issue 33) --------------------------------------------------------------
class TextLengths:
    """The sequence-length bucket each text will be served at, so that a request never pads short texts
    to a long neighbour's bucket (the server cuts each request to the bucket of its longest text).

    CLIP's BPE ships with the package (no torch): its counts are exact. A Hugging Face tokenizer's
    ``tokenizer.json`` lives on the server, not here: texts are then ordered by their UTF-8 length, a
    close proxy, in one group. A static text graph (no buckets) pads every text alike: nothing to group.
    """

    def __init__(self, contract_json: str):
        from clip_triton.contract import ModelContract, TokenizerSpec  # noqa: PLC0415

        self.spec = ModelContract.from_json(contract_json).tokenizer if contract_json else TokenizerSpec()
        self._bpe = None
        if self.spec.dynamic and self.spec.kind == "clip-bpe":
            from clip_triton.tokenizer import ClipTokenizer  # noqa: PLC0415

            self._bpe = ClipTokenizer(self.spec)

    @property
    def groups(self) -> bool:
        """Whether grouping by length changes what the server computes."""
        return self.spec.dynamic

    def key(self, item) -> tuple[int, int]:
        """The sort key that makes texts of one bucket adjacent: ``(bucket, 0)`` with CLIP's BPE, so a
        stable sort keeps the input order inside a bucket (a list of one bucket is sent exactly as a raw
        client sends it, and hits the same response-cache entries); ``(0, UTF-8 length)`` where only the
        proxy is known."""
        if isinstance(item, (bytes, bytearray)):
            size = len(item)
            text = bytes(item).decode("utf-8", "replace") if self._bpe is not None else ""
        elif isinstance(item, str):
            size, text = len(item.encode("utf-8", "surrogatepass")), item
        else:  # refused on the client before it is sent: its place in the order does not matter
            return (0, 0)
        if self._bpe is None:
            return (0, size)
        return (self.bucket(text), 0)

    def bucket(self, text: str) -> int:
        """The served length of ``text`` alone (CLIP's BPE): the shortest bucket holding it and its
        start and end tokens; at most context_length - 1 ids matter (a longer text is truncated)."""
        assert self._bpe is not None
        context = self.spec.context_length
        return self.spec.bucket(min(len(self._bpe.encode(text, limit=context - 1)) + 2, context))


@functools.lru_cache(maxsize=8)
def text_lengths(contract_json: str) -> TextLengths:
    """The :class:`TextLengths` of a served contract, made once per contract (both clients share it)."""
    return TextLengths(contract_json)


def client_grouping(group_by_length: bool | None, facts) -> TextLengths | None:
    """How a client orders texts for ``facts``' server: the :class:`TextLengths` to group them by, or
    None to send them in input order. ``group_by_length`` None (the default) groups only where the
    server does not split a request by length itself (``facts.text_split``: a repository written before
    the split); there the server's exact split already runs each text at its own bucket, and grouping
    on the client would only add a tokenization per text and more requests."""
    if group_by_length is False or (group_by_length is None and facts.text_split):
        return None
    return text_lengths(facts.contract)


def length_batches(keys: list[tuple[int, int]], indices: list[int], batch_size: int) -> list[list[int]]:
    """``indices`` in batches of at most ``batch_size`` whose texts share one bucket, buckets in
    ascending order, the input order kept inside each (a stable sort by ``keys``): the answer rows
    are written back by index, so the caller's order is kept."""
    batches: list[list[int]] = []
    current: list[int] = []
    for index in sorted(indices, key=lambda i: keys[i]):
        if current and (keys[index][0] != keys[current[0]][0] or len(current) == batch_size):
            batches.append(current)
            current = []
        current.append(index)
    if current:
        batches.append(current)
    return batches
