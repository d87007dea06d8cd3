"""``EmbeddingIndex``: embeddings with the items they belong to, saved as ``NAME.npy`` + ``NAME.json``.

Build one from a folder of images, a list of texts, or arrays; save and load it; search it with a
text, an image or an embedding. ``clip-triton embed`` writes this format and ``clip-triton search``
reads it, so an index built in Python is searchable from the command line and back.

numpy only (the client is needed only to embed a query or build from items).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from clip_triton.contract import TEXT, TOWERS, VISION
from clip_triton.errors import ClipTritonError
from clip_triton.facts import ServerFacts

from .ann import AnnIndex, ann_paths
from .errors import ItemErrors
from .files import atomic_write
from .scoring import top_k


class Embedder(Protocol):
    """What an index needs of a client (:class:`~clip_triton.client.ClipClient` is one): the index
    module depends on this shape, not on the client, so the two never import each other."""

    @property
    def facts(self) -> ServerFacts: ...

    def embed_images(self, images: Iterable) -> np.ndarray: ...

    def embed_texts(self, texts: Iterable[str]) -> np.ndarray: ...


FORMAT = 1
KINDS = tuple(tower.kind for tower in TOWERS)  # what an index holds: image or text embeddings
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})


@dataclass(frozen=True)
class Hit:
    """One search result: the item (path or text), its cosine to the query, and its row in the index."""

    item: str
    score: float
    row: int


def index_paths(path: str | os.PathLike) -> tuple[Path, Path]:
    """``(NAME.npy, NAME.json)`` for ``NAME``, ``NAME.npy`` or ``NAME.json``."""
    path = Path(path)
    base = path.with_suffix("") if path.suffix in (".npy", ".json") else path
    return base.with_name(base.name + ".npy"), base.with_name(base.name + ".json")


def image_files(
    folder: str | os.PathLike, *, all_files: bool = False, suffixes: Iterable[str] = IMAGE_SUFFIXES
) -> tuple[list[Path], dict[str, str]]:
    """Files under ``folder`` (recursive, sorted) to embed, and those skipped by suffix with the reason.

    ``all_files``: every file; the server decides by content and refuses non-images item by item.
    """
    root = Path(folder)
    if not root.is_dir():
        raise ClipTritonError(f"{root} is not a folder", "pass a folder of images")
    files = sorted(p for p in root.rglob("*") if p.is_file())
    if all_files:
        return files, {}
    allowed = {s.lower() for s in suffixes}
    keep = [p for p in files if p.suffix.lower() in allowed]
    skipped = {
        str(p): f"suffix {p.suffix or '(none)'} is not an image suffix"
        for p in files
        if p.suffix.lower() not in allowed
    }
    return keep, skipped


@dataclass
class EmbeddingIndex:
    """Items and their L2-normalised embeddings (row ``i`` belongs to ``items[i]``).

    ``failed`` (item -> reason), ``unanswered`` and ``skipped`` record what a build left out;
    ``model``/``pretrained`` the deployment that embedded it (queries through another are refused).
    """

    items: list[str]
    embeddings: np.ndarray
    kind: str = VISION.kind
    model: str = ""
    pretrained: str = ""
    served_model: str = ""  # the served model's public name that embedded it (a server may serve several)
    failed: dict[str, str] = field(default_factory=dict)
    unanswered: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    interrupted: bool = False
    client: Embedder | None = field(default=None, repr=False, compare=False)
    embedding_type: str = "float"  # what the rows were stored as (a Parquet store's compact rows are decoded)
    ann: AnnIndex | None = field(default=None, repr=False, compare=False)  # searched instead of all rows when set

    def __post_init__(self):
        self.embeddings = np.asarray(self.embeddings, dtype=np.float32)
        if self.embeddings.ndim != 2 or self.embeddings.shape[0] != len(self.items):
            raise ValueError(
                f"{len(self.items)} items need an (N, D) array with N = {len(self.items)}, "
                f"got shape {self.embeddings.shape}"
            )
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, not {self.kind!r}")
        self.items = [str(item) for item in self.items]

    # -- building --------------------------------------------------------------------------
    @classmethod
    def from_arrays(
        cls,
        items: Sequence,
        embeddings: np.ndarray,
        *,
        kind: str = VISION.kind,
        model: str = "",
        pretrained: str = "",
        client: Embedder | None = None,
    ) -> EmbeddingIndex:
        return cls(list(items), embeddings, kind=kind, model=model, pretrained=pretrained, client=client)

    @classmethod
    def from_folder(cls, client: Embedder, folder: str | os.PathLike, *, all_files: bool = False) -> EmbeddingIndex:
        """Embed every image under ``folder``; items the server refuses go to ``failed``, not to rows."""
        files, skipped = image_files(folder, all_files=all_files)
        index = cls._embed(client, [str(p) for p in files], VISION.kind)
        index.skipped = skipped
        return index

    @classmethod
    def from_texts(cls, client: Embedder, texts: Sequence[str]) -> EmbeddingIndex:
        return cls._embed(client, list(texts), TEXT.kind)

    @classmethod
    def _embed(cls, client: Embedder, items: list[str], kind: str) -> EmbeddingIndex:
        embed = client.embed_images if kind == VISION.kind else client.embed_texts
        refused: dict[int, str] = {}
        try:
            rows = embed(items)
        except ItemErrors as err:
            rows, refused = err.embeddings, err.errors
        keep = [i for i in range(len(items)) if i not in refused]
        failed = {items[i]: reason for i, reason in refused.items()}
        facts = client.facts
        return cls(
            [items[i] for i in keep],
            rows[keep],
            kind=kind,
            model=facts.model,
            pretrained=facts.pretrained,
            served_model=facts.public_id,
            failed=failed,
            client=client,
        )

    # -- files -----------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> tuple[Path, Path]:
        """Write ``NAME.npy`` and ``NAME.json`` (each atomically); returns both paths."""
        npy, meta = index_paths(path)
        npy.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(npy, lambda handle: np.save(handle, self.embeddings))
        document = {
            "format": FORMAT,
            "kind": self.kind,
            "rows": len(self.items),
            "model": self.model,
            "pretrained": self.pretrained,
            "served_model": self.served_model,
            "embed_dim": int(self.embeddings.shape[1]),
            "items": self.items,
            "failed": self.failed,
            "unanswered": self.unanswered,
            "skipped": self.skipped,
            "interrupted": self.interrupted,
        }
        atomic_write(meta, lambda handle: handle.write(json.dumps(document, indent=1, ensure_ascii=False).encode()))
        if self.ann is not None:
            self.ann.save(npy)
        return npy, meta

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        *,
        client: Embedder | None = None,
        use_ann: bool = True,
        log: Callable[[str], None] | None = None,
    ) -> EmbeddingIndex:
        """The index ``NAME.npy`` + ``NAME.json``, with the FAISS index ``NAME.faiss`` attached where one
        was built over exactly these rows (``use_ann=False``: exact search only; ``log`` hears why one
        beside it is not used). :func:`clip_triton.client.store.open_index` also reads a Parquet folder."""
        npy, meta = index_paths(path)
        if Path(path).is_dir() and not npy.is_file():
            raise ClipTritonError(
                f"{path} is a folder and {npy} does not exist",
                "a Parquet folder opens with clip_triton.client.store.open_index(path)",
            )
        for file in (npy, meta):
            if not file.is_file():
                raise ClipTritonError(
                    f"{file} not found", "write an index with `clip-triton embed` or EmbeddingIndex.save()"
                )
        try:
            document = json.loads(meta.read_text(encoding="utf-8"))
            embeddings = np.load(npy, allow_pickle=False)
        except (ValueError, OSError) as exc:
            raise ClipTritonError(
                f"{npy} / {meta} could not be read ({exc})", "the files are damaged: write the index again"
            ) from None
        items = document.get("items", [])
        if embeddings.ndim != 2 or embeddings.shape[0] != len(items):
            raise ClipTritonError(
                f"{npy} has {embeddings.shape[0] if embeddings.ndim else 0} rows but {meta} lists {len(items)} items",
                "the pair was not written together: write the index again",
            )
        index = cls(
            items,
            embeddings,
            kind=document.get("kind", VISION.kind),
            model=document.get("model", ""),
            served_model=document.get("served_model", ""),
            pretrained=document.get("pretrained", ""),
            failed=document.get("failed", {}),
            unanswered=document.get("unanswered", []),
            skipped=document.get("skipped", {}),
            interrupted=bool(document.get("interrupted", False)),
            client=client,
        )
        if use_ann:
            index.attach_ann(npy, log)
        return index

    def attach_ann(self, path: str | os.PathLike, log: Callable[[str], None] | None = None) -> None:
        """Attach the FAISS index saved beside ``path`` if it was built over exactly these rows; else
        search stays exact and ``log`` hears why (stale, damaged, or faiss not installed)."""
        file, _ = ann_paths(path)
        if not file.exists():
            return
        try:
            self.ann, why = AnnIndex.load(path, self.items)
        except ClipTritonError as exc:  # faiss is not installed: exact search still answers
            self.ann, why = None, f"{file} is not used: {exc.message} ({exc.hint})"
        if why and log is not None:
            log(f"note: {why}; searching every row exactly")

    # -- searching -------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.items)

    @property
    def embed_dim(self) -> int:
        return int(self.embeddings.shape[1])

    def search(self, query, k: int = 5) -> list[Hit]:
        """The ``k`` items closest to ``query`` (cosine), best first.

        ``query``: a ``str`` is a text; a ``Path``, bytes or PIL image is an image (use
        :meth:`search_image` for an image path given as ``str``); a 1-d array is an embedding.
        """
        if isinstance(query, np.ndarray):
            return self.search_embeddings(query, k)[0]
        if isinstance(query, str):
            return self.search_text(query, k)
        return self.search_image(query, k)

    def search_text(self, text: str, k: int = 5) -> list[Hit]:
        return self.search_embeddings(self._query_client().embed_texts([text]), k, query_kind=TEXT.kind)[0]

    def search_image(self, image, k: int = 5) -> list[Hit]:
        return self.search_embeddings(self._query_client().embed_images([image]), k, query_kind=VISION.kind)[0]

    def build_ann(self, kind: str = "auto") -> AnnIndex:
        """Build (and keep) a FAISS index over the rows, chosen by size (:mod:`clip_triton.client.ann`);
        :meth:`save` writes it beside the index and searches use it until ``exact=True``."""
        self.ann = AnnIndex.build(self.embeddings, self.items, kind)
        return self.ann

    def search_embeddings(
        self, queries: np.ndarray, k: int = 5, *, exact: bool = False, query_kind: str | None = None
    ) -> list[list[Hit]]:
        """Top-``k`` hits for each row of ``queries`` (``(D,)`` or ``(Q, D)``): through the ANN index
        where one is attached (unless ``exact``), else every row. ``query_kind`` (``image``/``text``):
        a query of the index's own kind needs less ANN search effort; unknown (None) is searched as
        one of the other kind, the larger effort."""
        queries = np.atleast_2d(np.asarray(queries, dtype=np.float32))
        if queries.shape[1] != self.embed_dim:
            raise ClipTritonError(
                f"query has {queries.shape[1]} dimensions, the index {self.embed_dim}",
                "query with the model that built the index",
            )
        if not len(self.items):
            return [[] for _ in queries]
        if self.ann is not None and not exact:
            top, scores = self.ann.search(queries, min(k, len(self.items)), cross_modal=query_kind != self.kind)
        else:
            top, scores = top_k(queries, self.embeddings, k)
        return [
            [Hit(self.items[j], float(s), int(j)) for j, s in zip(row, row_scores) if j >= 0]
            for row, row_scores in zip(top, scores)
        ]

    def _query_client(self) -> Embedder:
        if self.client is None:
            raise ClipTritonError(
                "this index has no client to embed the query",
                "EmbeddingIndex.load(path, client=client), or search with an embedding",
            )
        facts = self.client.facts
        if self.model and (facts.model, facts.pretrained) != (self.model, self.pretrained):
            served = f" (served as {self.served_model!r})" if self.served_model else ""
            raise ClipTritonError(
                f"the index was embedded by {self.model} ({self.pretrained}){served}; the client uses "
                f"{facts.public_id!r}: {facts.model} ({facts.pretrained})",
                f"query the served model that built the index (--served-model {self.served_model}, "
                f"ClipClient(url, model={self.served_model!r})), or rebuild the index"
                if self.served_model
                else "query the deployment that built the index, or rebuild the index",
            )
        return self.client
