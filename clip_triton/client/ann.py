"""An approximate-nearest-neighbour index (FAISS) beside an :class:`~clip_triton.client.EmbeddingIndex`'s
exact search. Needs the ``store`` extra (faiss-cpu).

The structure is chosen by size (:func:`choose`), every parameter recorded next to the index file:

==============  =============================================================================
rows            structure
==============  =============================================================================
< 10,000        ``flat``: exact inner product (an ANN structure buys nothing at this size)
>= 10,000       ``ivf``: IVF-Flat, nlist = the power of two nearest sqrt(rows), trained on at most
                64 x nlist rows; nprobe max(16, nlist / 32) for a query of the index's kind (image
                over images), nlist / 4 for one of the other kind (text over images)
forced          ``hnsw``: HNSW graph, M=32, efConstruction=64; efSearch 128 for a query of the index's
                kind, 1024 for one of the other kind
==============  =============================================================================

Why IVF by default: a text query over an image index (CLIP's main use) lies outside the indexed
distribution (the modality gap), and HNSW's graph walk then misses most true neighbours (recall@10
0.15-0.6 against IVF's 0.8-0.95 on the benchmark's corpora); IVF also builds 30x faster (7 s against
232 s for 1M rows here) in less memory. HNSW stays the fastest for same-kind queries (``--ann hnsw``).

Recall@10 against exact search, build time and memory at 100k and 1M rows: ``python bench/encodings.py
--ann`` (docs/storage.md). Inner product on L2-normalised rows is cosine.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from clip_triton.errors import ClipTritonError

from .files import atomic_write

KINDS = ("auto", "flat", "hnsw", "ivf")
FLAT_BELOW = 10_000
# Search effort by query: a query of the index's own kind (image -> image) finds its neighbours with
# little search; a query of the other kind (text -> image, CLIP's main use) lies outside the indexed
# distribution (the modality gap) and needs several times more (`python bench/encodings.py --ann`).
HNSW = {"M": 32, "efConstruction": 64, "efSearch": 128, "efSearch_cross": 1024}
IVF_PROBE_SHARE = 32  # nprobe = max(16, nlist / 32) for a query of the index's kind
IVF_PROBE_SHARE_CROSS = 4  # nprobe = nlist / 4 for a query of the other kind


def _faiss():
    try:
        import faiss  # noqa: PLC0415
    except ImportError:
        raise ClipTritonError(
            "an ANN index needs faiss", "pip install 'clip-triton[store]' (or pip install faiss-cpu)"
        ) from None
    return faiss


def choose(rows: int, kind: str = "auto") -> dict:
    """The structure and parameters for ``rows`` vectors (``kind`` forces one)."""
    if kind not in KINDS:
        raise ClipTritonError(f"ANN kind {kind!r} is not one of {', '.join(KINDS)}")
    if kind == "auto":
        kind = "flat" if rows < FLAT_BELOW else "ivf"
    if kind == "flat":
        return {"type": "flat"}
    if kind == "hnsw":
        return {"type": "hnsw", **HNSW}
    nlist = max(1, 2 ** round(math.log2(max(1.0, math.sqrt(rows)))))
    return {
        "type": "ivf",
        "nlist": nlist,
        "nprobe": min(nlist, max(16, nlist // IVF_PROBE_SHARE)),
        "nprobe_cross": min(nlist, max(16, nlist // IVF_PROBE_SHARE_CROSS)),
        "train_rows": min(rows, 64 * nlist),
    }


def fingerprint(items: list[str]) -> str:
    """Which rows an ANN index was built over: a stale one (the index changed since) is not used."""
    digest = hashlib.sha256()
    for item in items:
        digest.update(item.encode("utf-8", "surrogatepass") + b"\0")
    return digest.hexdigest()


def ann_paths(index_path: str | os.PathLike) -> tuple[Path, Path]:
    """``(NAME.faiss, NAME.faiss.json)`` beside an index ``NAME`` (``.npy``/``.json``), or
    ``(DIR/index.faiss, DIR/index.faiss.json)`` inside a Parquet folder."""
    path = Path(index_path)
    if path.is_dir():
        return path / "index.faiss", path / "index.faiss.json"
    base = path.with_suffix("") if path.suffix in (".npy", ".json") else path
    return base.with_name(base.name + ".faiss"), base.with_name(base.name + ".faiss.json")


@dataclass
class AnnIndex:
    """A FAISS index over an EmbeddingIndex's rows (row ``i`` is the index's row ``i``)."""

    index: Any  # a faiss.Index
    params: dict

    @classmethod
    def build(cls, embeddings: np.ndarray, items: list[str], kind: str = "auto", seed: int = 0) -> AnnIndex:
        faiss = _faiss()
        x = np.ascontiguousarray(embeddings, dtype=np.float32)
        rows, dim = x.shape
        params = choose(rows, kind)
        if params["type"] == "flat":
            index = faiss.IndexFlatIP(dim)
        elif params["type"] == "hnsw":
            index = faiss.IndexHNSWFlat(dim, params["M"], faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = params["efConstruction"]
        else:
            if rows < params["nlist"]:
                raise ClipTritonError(f"an IVF index of {params['nlist']} lists needs at least that many rows")
            index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, params["nlist"], faiss.METRIC_INNER_PRODUCT)
            sample = np.random.default_rng(seed).choice(rows, params["train_rows"], replace=False)
            index.train(x[np.sort(sample)])
        index.add(x)
        return cls(index, {**params, "rows": rows, "dim": dim, "fingerprint": fingerprint(items)})

    def search(self, queries: np.ndarray, k: int, *, cross_modal: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """``(rows, scores)``, each ``(Q, k)``, best first; fewer rows than ``k`` pad with -1.
        ``cross_modal``: the queries are of the other kind than the rows (text queries over images):
        the larger search effort recorded for them (``efSearch_cross``, ``nprobe_cross``)."""
        faiss = _faiss()
        q = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        suffix = "_cross" if cross_modal else ""
        kind = self.params.get("type")
        if kind == "hnsw":
            effort = self.params.get(f"efSearch{suffix}", self.params.get("efSearch", HNSW["efSearch"]))
            scores, rows = self.index.search(q, k, params=faiss.SearchParametersHNSW(efSearch=max(k, effort)))
        elif kind == "ivf":
            probes = self.params.get(f"nprobe{suffix}", self.params.get("nprobe", 1))
            scores, rows = self.index.search(q, k, params=faiss.SearchParametersIVF(nprobe=probes))
        else:
            scores, rows = self.index.search(q, k)
        return rows, scores

    def save(self, index_path: str | os.PathLike) -> Path:
        faiss = _faiss()
        file, meta = ann_paths(index_path)
        atomic_write(file, lambda handle: handle.write(faiss.serialize_index(self.index).tobytes()))
        document = json.dumps({**self.params, "file": file.name}, indent=1) + "\n"
        atomic_write(meta, lambda handle: handle.write(document.encode()))
        return file

    @classmethod
    def load(cls, index_path: str | os.PathLike, items: list[str]) -> tuple[AnnIndex | None, str]:
        """The ANN index beside ``index_path`` if there is one built over exactly ``items``;
        else ``(None, why not)`` ("" where there is none)."""
        file, meta = ann_paths(index_path)
        if not file.is_file() or not meta.is_file():
            return None, ""
        try:
            params = json.loads(meta.read_text())
        except ValueError as exc:
            return None, f"{meta} is damaged ({exc})"
        if params.get("rows") != len(items) or params.get("fingerprint") != fingerprint(items):
            return None, f"{file} was built over other rows than the index now holds (rebuild it: --ann)"
        faiss = _faiss()
        try:
            index = faiss.read_index(str(file))
        except RuntimeError as exc:
            return None, f"{file} could not be read ({str(exc).splitlines()[0][:160]})"
        return cls(index, params), ""
