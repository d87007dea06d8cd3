"""Embeddings as Parquet shards: ``clip-triton embed --format parquet --out DIR`` and
:func:`embed_parquet`. Needs the ``store`` extra (pyarrow).

``DIR/part-00000.parquet``, ``part-00001.parquet``, ...: one row per item, written a shard at a time
(``shard_size`` items), so a job of any size holds one shard's rows in memory. Columns:

=========  ===============================================================================
id         int64: the item's place in the job's input (duplicates removed), stable across reruns
source     string: the image path or URL, or the text itself
embedding  fixed_size_list<float32 | float16 | int8 | uint8>[width]; zeros where status is not ok
           (pyarrow 21 writes a null fixed-size list that it cannot read back)
status     string: ``ok``, ``refused`` (the server refused the item) or ``unanswered``
reason     string: why, where status is not ``ok``
=========  ===============================================================================

The file's key-value metadata ``clip_triton`` holds the facts as JSON (model, pretrained, embed_dim,
kind, embedding_type, format). Each shard is written to a hidden temporary file and renamed, so a
killed job leaves whole shards only. A rerun reads every shard, keeps the ``ok`` rows and embeds the
rest into new shards; a later shard's row for a source replaces an earlier one. A shard that cannot be
read, was written for another model, kind or encoding, or whose width is not the embedding size's, is
refused with its file name before anything is sent.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from clip_triton.contract import DEFAULT_EMBEDDING_TYPE
from clip_triton.encodings import check_type, decode, dtype, encode, width
from clip_triton.errors import ClipTritonError

from .errors import JobFailed
from .files import atomic_write
from .index import Embedder, EmbeddingIndex
from .resume import attempt

FORMAT = 1
META_KEY = b"clip_triton"
SHARD = re.compile(r"part-(\d{5,})\.parquet")
OK, REFUSED, UNANSWERED = "ok", "refused", "unanswered"
DEFAULT_SHARD_SIZE = 10_000
ARROW_TYPES = {"<f4": "float32", "<f2": "float16", "i1": "int8", "u1": "uint8"}


def _arrow():
    try:
        import pyarrow  # noqa: PLC0415
        import pyarrow.parquet  # noqa: PLC0415
    except ImportError:
        raise ClipTritonError(
            "Parquet output needs pyarrow", "pip install 'clip-triton[store]' (or pip install pyarrow)"
        ) from None
    return pyarrow


@dataclass(frozen=True)
class ShardFacts:
    """What every shard of one folder must agree on."""

    model: str
    pretrained: str
    embed_dim: int
    kind: str
    embedding_type: str = DEFAULT_EMBEDDING_TYPE

    def to_json(self) -> str:
        return json.dumps({"format": FORMAT, **self.__dict__}, sort_keys=True)

    @classmethod
    def of(cls, facts, kind: str, embedding_type: str) -> ShardFacts:
        return cls(facts.model, facts.pretrained, int(facts.embed_dim), kind, embedding_type)

    def describe(self) -> str:
        return f"{self.kind} embeddings of {self.model} ({self.pretrained}), {self.embed_dim}-d, {self.embedding_type}"


@dataclass
class ParquetRows:
    """Every shard of a folder, read and checked: the latest row per source."""

    facts: ShardFacts | None
    shards: list[Path]
    ids: dict[str, int] = field(default_factory=dict)
    status: dict[str, str] = field(default_factory=dict)
    reason: dict[str, str] = field(default_factory=dict)
    rows: dict[str, np.ndarray] = field(default_factory=dict)  # source -> encoded row, ok rows only

    @property
    def done(self) -> set[str]:
        return {source for source, status in self.status.items() if status == OK}

    def index(self) -> EmbeddingIndex:
        """The ok rows as an :class:`EmbeddingIndex` (float32; compact types decoded) in id order."""
        facts = self.facts
        if facts is None:
            raise ClipTritonError(f"{self.folder_name()} holds no shards", "write it with `clip-triton embed`")
        sources = sorted(self.rows, key=lambda s: self.ids[s])
        encoded = np.stack([self.rows[s] for s in sources]) if sources else np.zeros((0, 0))
        vectors = (
            decode(encoded, facts.embedding_type, facts.embed_dim)
            if sources
            else np.zeros((0, facts.embed_dim), np.float32)
        )
        failed = {s: self.reason.get(s, "") for s, st in self.status.items() if st == REFUSED}
        unanswered = [s for s, st in self.status.items() if st == UNANSWERED]
        return EmbeddingIndex(
            sources,
            vectors,
            kind=facts.kind,
            model=facts.model,
            pretrained=facts.pretrained,
            failed=failed,
            unanswered=unanswered,
            embedding_type=facts.embedding_type,
        )

    def folder_name(self) -> str:
        return str(self.shards[0].parent) if self.shards else "the folder"


def shard_files(folder: str | os.PathLike) -> list[Path]:
    """The folder's shards in write order (temporary files of a killed job are not shards)."""
    root = Path(folder)
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if SHARD.fullmatch(p.name)), key=shard_number)


def shard_number(path: Path) -> int:
    match = SHARD.fullmatch(path.name)
    return int(match[1]) if match else -1


def is_parquet_store(path: str | os.PathLike) -> bool:
    """``path`` is a folder of shards, or one shard."""
    p = Path(path)
    return bool(shard_files(p)) or (p.is_file() and p.suffix == ".parquet")


def read_shards(folder: str | os.PathLike, expect: ShardFacts | None = None) -> ParquetRows:
    """Read and check every shard of ``folder`` (or one ``.parquet`` file). ``expect``: the facts a
    resuming job writes; a shard with others is refused naming its file."""
    pa = _arrow()
    import pyarrow.parquet as pq  # noqa: PLC0415

    path = Path(folder)
    files = [path] if path.is_file() else shard_files(path)
    out = ParquetRows(facts=expect, shards=files)
    for file in files:
        try:
            table = pq.read_table(file)
        except (OSError, pa.ArrowException) as exc:
            raise ClipTritonError(
                f"{file} is not a readable Parquet shard ({str(exc).splitlines()[0][:200]})",
                "it was damaged or cut short: delete that file and rerun the same command (its items are "
                "embedded again)",
            ) from None
        facts = _facts_of(file, table)
        if out.facts is None:
            out.facts = facts
        elif facts != out.facts:
            raise ClipTritonError(
                f"{file} holds {facts.describe()}; "
                + ("this job writes " if expect is not None else "the folder's first shard holds ")
                + out.facts.describe(),
                "write to another folder, or --force to start over",
            )
        column = table.column("embedding").combine_chunks()
        expected = width(facts.embedding_type, facts.embed_dim)
        if not pa.types.is_fixed_size_list(column.type) or column.type.list_size != expected:
            raise ClipTritonError(
                f"{file}: embeddings of {facts.embed_dim} dimensions as {facts.embedding_type} need {expected} "
                f"values a row; the column holds {column.type}",
                "the shard was not written by clip-triton embed: delete it and rerun",
            )
        flat = column.flatten().to_numpy(zero_copy_only=False).astype(dtype(facts.embedding_type), copy=False)
        valid = column.is_valid().to_numpy(zero_copy_only=False)
        if column.null_count or len(flat) != len(column) * expected:
            raise ClipTritonError(
                f"{file}: {column.null_count} rows without an embedding array",
                "the shard was not written by clip-triton embed: delete it and rerun",
            )
        for i, (id_, source, status, reason) in enumerate(
            zip(*(table.column(name).to_pylist() for name in ("id", "source", "status", "reason")))
        ):
            out.ids[source], out.status[source] = int(id_), status
            out.reason.pop(source, None)
            out.rows.pop(source, None)
            if reason:
                out.reason[source] = reason
            if status == OK and valid[i]:
                out.rows[source] = flat[i * expected : (i + 1) * expected]
    return out


def _facts_of(file: Path, table) -> ShardFacts:
    raw = (table.schema.metadata or {}).get(META_KEY)
    names = set(table.column_names)
    if raw is None or not {"id", "source", "embedding", "status", "reason"} <= names:
        raise ClipTritonError(
            f"{file} was not written by clip-triton embed (no {META_KEY.decode()} metadata or columns)",
            "keep only clip-triton's part-NNNNN.parquet shards in the folder",
        )
    try:
        document = json.loads(raw)
        return ShardFacts(
            document["model"],
            document["pretrained"],
            int(document["embed_dim"]),
            document["kind"],
            check_type(document["embedding_type"]),
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise ClipTritonError(f"{file}: its clip_triton metadata is damaged ({exc})", "delete it and rerun") from None


def write_shard(folder: Path, number: int, facts: ShardFacts, records: list[tuple]) -> Path:
    """Write one shard atomically: a hidden temporary file in the folder, fsync, rename.
    ``records``: ``(id, source, encoded row or None, status, reason)``."""
    pa = _arrow()
    import pyarrow.parquet as pq  # noqa: PLC0415

    size = width(facts.embedding_type, facts.embed_dim)
    value_type = getattr(pa, ARROW_TYPES[dtype(facts.embedding_type).str.lstrip("|=")])()
    dense = np.zeros((len(records), size), dtype=dtype(facts.embedding_type))  # zeros where not embedded
    for i, record in enumerate(records):
        if record[2] is not None:
            dense[i] = record[2]
    embedding = pa.FixedSizeListArray.from_arrays(pa.array(dense.reshape(-1), type=value_type), size)
    schema = pa.schema(
        [
            ("id", pa.int64()),
            ("source", pa.string()),
            ("embedding", pa.list_(value_type, size)),
            ("status", pa.string()),
            ("reason", pa.string()),
        ],
        metadata={META_KEY: facts.to_json().encode()},
    )
    table = pa.Table.from_arrays(
        [
            pa.array([r[0] for r in records], pa.int64()),
            pa.array([r[1] for r in records], pa.string()),
            embedding,
            pa.array([r[3] for r in records], pa.string()),
            pa.array([r[4] for r in records], pa.string()),
        ],
        schema=schema,
    )
    target = folder / f"part-{number:05d}.parquet"
    atomic_write(target, lambda handle: pq.write_table(table, handle))
    return target


@dataclass
class ParquetRun:
    """What one :func:`embed_parquet` call did (counts; :attr:`index` reads the folder back)."""

    folder: Path
    facts: ShardFacts
    resumed: int = 0
    embedded: int = 0
    written: list[Path] = field(default_factory=list)
    refused: dict[str, str] = field(default_factory=dict)
    unanswered: list[str] = field(default_factory=list)
    failure: JobFailed | None = None
    interrupted: bool = False

    @property
    def complete(self) -> bool:
        return not (self.refused or self.unanswered or self.interrupted)

    def read(self) -> ParquetRows:
        """Every shard of the folder, as a later search reads them."""
        return read_shards(self.folder, self.facts) if shard_files(self.folder) else ParquetRows(self.facts, [])

    @property
    def index(self) -> EmbeddingIndex:
        return self.read().index()


def existing_shards(
    out: str | os.PathLike, facts: ShardFacts | None = None, *, force: bool = False
) -> ParquetRows | None:
    """The shards already in ``out`` that a run would resume, read and checked (None where there are
    none, or ``force``). Without ``facts`` only the shards' agreement with each other is checked."""
    if force or not shard_files(out):
        return None
    return read_shards(out, facts)


def embed_parquet(
    client: Embedder,
    items: Sequence[str],
    kind: str,
    out: str | os.PathLike,
    *,
    shard_size: int = DEFAULT_SHARD_SIZE,
    embedding_type: str = DEFAULT_EMBEDDING_TYPE,
    force: bool = False,
    log: Callable[[str], None] | None = None,
) -> ParquetRun:
    """Embed ``items`` into Parquet shards in the folder ``out``, ``shard_size`` items a shard, resuming
    the shards already there unless ``force`` (which deletes them first)."""
    say = log or (lambda line: None)
    name = check_type(embedding_type)
    if shard_size < 1:
        raise ClipTritonError(f"shard size {shard_size}: expected a positive number")
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob(".part-*.tmp-*"):  # a killed job's unfinished shard: its items are redone
        stale.unlink(missing_ok=True)
    facts = ShardFacts.of(client.facts, kind, name)
    if force:
        for shard in shard_files(folder):
            shard.unlink()
    previous = existing_shards(folder, facts)
    done = previous.done if previous is not None else set()
    unique = list(dict.fromkeys(items))
    todo = [(i, item) for i, item in enumerate(unique) if item not in done]
    run = ParquetRun(folder=folder, facts=facts, resumed=len(unique) - len(todo), embedded=len(todo))
    if done:
        say(f"resuming {folder}: {run.resumed} of {len(unique)} items already embedded; embedding {len(todo)}")
    shards = shard_files(folder)
    number = shard_number(shards[-1]) + 1 if shards else 0
    for start in range(0, len(todo), shard_size):
        chunk = todo[start : start + shard_size]
        result = attempt(client, kind, [item for _, item in chunk])
        if result.failure is not None:
            run.failure = result.failure
        run.interrupted = run.interrupted or result.interrupted
        stop = result.failure is not None or result.interrupted
        why = result.failure.cause.message if result.failure is not None else "interrupted"
        refused, missing = result.refused, {i: why for i in result.unanswered}
        rows = encode(np.nan_to_num(result.rows, nan=0.0), name)
        records = []
        for i, (id_, source) in enumerate(chunk):
            if i in refused:
                records.append((id_, source, None, REFUSED, refused[i]))
                run.refused[source] = refused[i]
            elif i in missing:
                records.append((id_, source, None, UNANSWERED, missing[i]))
                run.unanswered.append(source)
            else:
                records.append((id_, source, rows[i], OK, ""))
        path = write_shard(folder, number, facts, records)
        run.written.append(path)
        number += 1
        say(f"wrote {path.name}: {len(records)} rows ({len(records) - len(refused) - len(missing)} embedded)")
        if stop:
            run.unanswered += [item for _, item in todo[start + shard_size :]]
            break
    return run
