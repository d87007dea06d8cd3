"""A resumable embedding job: embed items into an index file, keep every row answered whatever stops
the job (a refused item, a server that stayed down, Ctrl-C), and on a rerun embed only the items
without a row. ``clip-triton embed`` is this function with flags; Python users call it directly::

    with ClipClient(url) as client:
        run = embed_into(client, texts, "text", "captions")   # captions.npy + captions.json
        if not run.complete: ...                              # run.refused, run.unanswered, run.failure
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from clip_triton.contract import VISION
from clip_triton.errors import ClipTritonError

from .errors import ItemErrors, JobFailed, JobInterrupted
from .index import Embedder, EmbeddingIndex, index_paths


@dataclass
class EmbedRun:
    """What one :func:`embed_into` call did. ``index`` is what was saved."""

    index: EmbeddingIndex
    resumed: int = 0  # items that already had a row in the index
    embedded: int = 0  # items sent to the server by this run
    refused: dict[str, str] = field(default_factory=dict)  # item -> the server's reason
    unanswered: list[str] = field(default_factory=list)  # items a failure or an interruption left without a row
    failure: JobFailed | None = None  # the failure retries did not outlast, if one stopped the job
    interrupted: bool = False  # Ctrl-C stopped the job (what was answered is saved)

    @property
    def complete(self) -> bool:
        """Every item has a row."""
        return not (self.refused or self.unanswered or self.interrupted)


@dataclass
class Attempt:
    """One embed call of a job, whatever ended it: ``rows`` (NaN where not answered), ``refused``
    (index -> the server's reason), ``unanswered`` (indices a failure or an interruption left)."""

    rows: np.ndarray
    refused: dict[int, str] = field(default_factory=dict)
    unanswered: list[int] = field(default_factory=list)
    failure: JobFailed | None = None
    interrupted: bool = False


def attempt(client: Embedder, kind: str, items: list[str]) -> Attempt:
    """Embed ``items`` (images or texts by ``kind``) once; every way the call can end is an Attempt."""
    embed = client.embed_images if kind == VISION.kind else client.embed_texts

    def left(answered: list[int], errors: dict[int, str]) -> list[int]:
        return sorted(set(range(len(items))) - set(answered) - set(errors))

    try:
        return Attempt(embed(items))
    except JobInterrupted as err:
        return Attempt(err.embeddings, err.errors, left(err.answered, err.errors), interrupted=True)
    except JobFailed as err:  # retries did not outlast the failure: keep every row answered
        return Attempt(err.embeddings, err.errors, left(err.answered, err.errors), failure=err)
    except ItemErrors as err:
        return Attempt(err.embeddings, err.errors)


def existing_index(out: str | os.PathLike, kind: str, *, force: bool = False) -> EmbeddingIndex | None:
    """The index already at ``out`` that a run would resume, read and checked without a server: None
    where there is none (or ``force`` replaces it); an index of the other kind, or a damaged one, is
    refused."""
    if force or not any(path.exists() for path in index_paths(out)):
        return None
    previous = EmbeddingIndex.load(out)
    if previous.kind != kind:
        raise ClipTritonError(
            f"{index_paths(out)[0]} holds {previous.kind} embeddings, not {kind}",
            "choose another --out, or --force to replace it",
        )
    return previous


def embed_into(
    client: Embedder,
    items: Sequence[str],
    kind: str,
    out: str | os.PathLike,
    *,
    force: bool = False,
    skipped: dict[str, str] | None = None,
    log: Callable[[str], None] | None = None,
    previous: EmbeddingIndex | None = None,
) -> EmbedRun:
    """Embed ``items`` (image paths or URLs for ``kind="image"``, texts for ``"text"``) into the index
    ``out`` (``out.npy`` + ``out.json``), resuming an index already there unless ``force``.

    An index of the other kind, or one embedded by another model than the server's, is refused (a
    :class:`~clip_triton.errors.ClipTritonError` saying what to do). Duplicate items get one row.
    ``skipped`` (file -> why) is recorded in the side-car. ``log`` receives progress lines.
    ``previous``: the index :func:`existing_index` already read (not read a second time); None reads it.
    """
    say = log or (lambda line: None)
    npy, _ = index_paths(out)
    unique = list(dict.fromkeys(items))
    if previous is None:
        previous = existing_index(out, kind, force=force)
    done = {item: row for row, item in enumerate(previous.items)} if previous is not None else {}
    facts = client.facts
    if previous is not None and (previous.model, previous.pretrained) != (facts.model, facts.pretrained):
        raise ClipTritonError(
            f"{npy} was embedded by {previous.model} ({previous.pretrained}); the server serves "
            f"{facts.model} ({facts.pretrained})",
            "choose another --out, or --force to replace it",
        )
    todo = [item for item in unique if item not in done]
    if done:
        say(f"resuming {npy}: {len(unique) - len(todo)} of {len(unique)} items already embedded; embedding {len(todo)}")
    run = EmbedRun(index=None, resumed=len(unique) - len(todo), embedded=len(todo))  # type: ignore[arg-type]
    answered: dict[str, np.ndarray] = {}
    if todo:
        result = attempt(client, kind, todo)
        run.interrupted, run.failure = result.interrupted, result.failure
        run.refused = {todo[i]: reason for i, reason in result.refused.items()}
        run.unanswered = [todo[i] for i in result.unanswered]
        missing = set(run.refused) | set(run.unanswered)
        answered = {item: result.rows[i] for i, item in enumerate(todo) if item not in missing}
    keep = [item for item in unique if item in done or item in answered]
    vectors = [previous.embeddings[done[item]] if item in done else answered[item] for item in keep]  # type: ignore[union-attr]
    run.index = EmbeddingIndex(
        keep,
        np.stack(vectors) if vectors else np.zeros((0, facts.embed_dim), dtype=np.float32),
        kind=kind,
        model=facts.model,
        pretrained=facts.pretrained,
        served_model=facts.public_id,
        failed=run.refused,
        unanswered=run.unanswered,
        skipped=dict(skipped or {}),
        interrupted=run.interrupted,
    )
    run.index.save(out)
    return run
