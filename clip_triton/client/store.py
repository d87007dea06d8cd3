"""Where an index lives, whatever its format: :func:`open_index` reads ``NAME.npy`` + ``NAME.json`` or a
folder of Parquet shards and attaches the FAISS index beside it; :func:`write_ann` builds one there;
:func:`write_lancedb` copies the rows into a LanceDB table (an embedded vector store with metadata
filters). ``clip-triton embed`` and ``clip-triton search`` are these functions with flags.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

from clip_triton.errors import ClipTritonError

from .index import Embedder, EmbeddingIndex, index_paths
from .parquet import is_parquet_store, read_shards


def open_index(
    path: str | os.PathLike,
    *,
    client: Embedder | None = None,
    use_ann: bool = True,
    log: Callable[[str], None] | None = None,
) -> EmbeddingIndex:
    """The index at ``path`` (``NAME.npy``/``NAME`` or a Parquet folder or file), with its ANN index
    attached where one was built over exactly these rows (``use_ann=False``: exact search only).
    ``log`` hears why an ANN index beside it is not used (stale, damaged, or faiss missing)."""
    npy, _ = index_paths(path)
    if is_parquet_store(path):
        index = read_shards(path).index()
        index.client = client
        if use_ann:
            index.attach_ann(path, log)
        return index
    if npy.is_file() or not Path(path).is_dir():  # NAME may also name a folder (the images it indexes)
        return EmbeddingIndex.load(npy, client=client, use_ann=use_ann, log=log)
    raise ClipTritonError(
        f"{path} is a folder without Parquet shards (part-NNNNN.parquet), and {npy} does not exist",
        "pass the folder `clip-triton embed --format parquet --out` wrote, or NAME.npy",
    )


def write_ann(index: EmbeddingIndex, path: str | os.PathLike, kind: str = "auto") -> Path:
    """Build a FAISS index over ``index``'s rows and save it beside the index at ``path``."""
    return index.build_ann(kind).save(path)


def write_lancedb(index: EmbeddingIndex, folder: str | os.PathLike, table: str | None = None) -> str:
    """Write ``index``'s rows into the LanceDB database ``folder`` as table ``table`` (default
    ``clip_image`` / ``clip_text``), replacing a table of that name. Columns: ``id`` (row), ``source``
    (path, URL or text), ``vector`` (float32). The model facts are in the schema metadata. Returns the
    table name. Query it with lancedb: ``db.open_table(name).search(vector).where("source LIKE
    '%cats%'").limit(5)``."""
    try:
        import lancedb  # noqa: PLC0415
        import pyarrow as pa  # noqa: PLC0415
    except ImportError:
        raise ClipTritonError(
            "--lancedb needs lancedb", "pip install 'clip-triton[store]' (or pip install lancedb)"
        ) from None
    name = table or f"clip_{index.kind}"
    dim = index.embed_dim
    facts = {"model": index.model, "pretrained": index.pretrained, "kind": index.kind, "embed_dim": dim}
    schema = pa.schema(
        [("id", pa.int64()), ("source", pa.string()), ("vector", pa.list_(pa.float32(), dim))],
        metadata={b"clip_triton": json.dumps(facts).encode()},
    )
    data = pa.Table.from_arrays(
        [
            pa.array(range(len(index)), pa.int64()),
            pa.array(index.items, pa.string()),
            pa.FixedSizeListArray.from_arrays(pa.array(index.embeddings.reshape(-1), pa.float32()), dim),
        ],
        schema=schema,
    )
    database = lancedb.connect(os.fspath(folder))
    database.create_table(name, data=data, mode="overwrite")
    return name
