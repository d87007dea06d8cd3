"""Where embeddings are kept (issue 32): Parquet shards (written, resumed, refused when damaged or
foreign, never half-written), the FAISS index beside the exact one, and the LanceDB table. In-process,
against a scripted embedder (the Embedder protocol); the same path through the real tritonserver and
the CLI is test_client.py::test_embed_parquet_then_search_a_folder_of_generated_images."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clip_triton import encodings as E
from clip_triton.client import ItemErrors, JobFailed, JobInterrupted, ServerUnavailable
from clip_triton.client import ann as A
from clip_triton.client import parquet as P
from clip_triton.client.index import EmbeddingIndex
from clip_triton.client.store import open_index, write_ann, write_lancedb
from clip_triton.errors import ClipTritonError
from clip_triton.facts import ServerFacts

from .fakes import fake_embedding

DIM = 16


class ScriptedEmbedder:
    """Answers fake_embedding of each text; refuses texts containing "bad"; ``stop_after`` calls, the
    next one stops the job (``how``: "interrupt" or "fail") after answering its first half."""

    def __init__(self, model: str = "fake-clip", dim: int = DIM, stop_after: int | None = None, how: str = "fail"):
        self.facts = ServerFacts(model=model, pretrained="none", embed_dim=dim, logit_scale=100.0)
        self.calls: list[list[str]] = []
        self.stop_after, self.how = stop_after, how

    def embed_texts(self, texts):
        texts = list(texts)
        self.calls.append(texts)
        rows = np.stack(
            [fake_embedding(t if isinstance(t, bytes) else t.encode(), self.facts.embed_dim) for t in texts]
        )
        errors = {i: "refused: bad text" for i, t in enumerate(texts) if "bad" in str(t)}
        rows[list(errors)] = np.nan
        if self.stop_after is not None and len(self.calls) > self.stop_after:
            answered = [i for i in range(len(texts) // 2) if i not in errors]
            rows[len(texts) // 2 :] = np.nan
            if self.how == "interrupt":
                raise JobInterrupted(rows, answered, errors)
            raise JobFailed(ServerUnavailable("the server went away"), rows, answered, errors)
        if errors:
            raise ItemErrors(errors, rows)
        return rows

    embed_images = embed_texts


def vectors(texts, dim: int = DIM) -> np.ndarray:
    return np.stack([fake_embedding(t.encode(), dim) for t in texts])


TEXTS = [f"caption number {i}" for i in range(23)]


def test_shards_hold_one_row_per_item_with_the_facts(tmp_path):
    items = [*TEXTS[:10], "a bad one", *TEXTS[10:]]
    run = P.embed_parquet(ScriptedEmbedder(), items, "text", tmp_path / "out", shard_size=10)
    assert [p.name for p in run.written] == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    first = pq.read_table(run.written[0])
    assert first.column_names == ["id", "source", "embedding", "status", "reason"]
    assert first.schema.field("embedding").type == pa.list_(pa.float32(), DIM)
    facts = json.loads(first.schema.metadata[P.META_KEY])
    assert facts == {
        "format": 1,
        "model": "fake-clip",
        "pretrained": "none",
        "embed_dim": DIM,
        "kind": "text",
        "embedding_type": "float",
    }
    table = pa.concat_tables(pq.read_table(p) for p in run.written)
    assert table.column("id").to_pylist() == list(range(24)) and table.column("source").to_pylist() == items
    status = table.column("status").to_pylist()
    assert status[10] == "refused" and table.column("reason")[10].as_py() == "refused: bad text"
    assert not any(table.column("embedding")[10].as_py()) and status.count("ok") == 23  # zeros, status says why
    index = run.index
    assert index.items == TEXTS and np.array_equal(index.embeddings, vectors(TEXTS))
    assert index.failed == {"a bad one": "refused: bad text"} and run.refused == index.failed


@pytest.mark.parametrize("name", ["float16", "int8", "uint8", "binary", "ubinary"])
def test_compact_types_are_stored_as_such(tmp_path, name):
    run = P.embed_parquet(ScriptedEmbedder(), TEXTS[:5], "text", tmp_path, embedding_type=name)
    table = pq.read_table(run.written[0])
    column = table.column("embedding").combine_chunks()
    assert column.type.list_size == E.width(name, DIM)
    stored = column.flatten().to_numpy().reshape(5, -1)
    assert np.array_equal(stored.astype(E.dtype(name)), E.encode(vectors(TEXTS[:5]), name))
    index = open_index(tmp_path)
    assert index.embedding_type == name
    assert np.allclose(index.embeddings, E.decode(stored.astype(E.dtype(name)), name, DIM))


def test_a_rerun_embeds_only_what_has_no_row_and_later_rows_win(tmp_path):
    embedder = ScriptedEmbedder()
    P.embed_parquet(embedder, [*TEXTS[:8], "bad at first"], "text", tmp_path, shard_size=4)
    # the refused item becomes good (its text fixed upstream is a new item; here: the server accepts it)
    embedder2 = ScriptedEmbedder()
    embedder2.embed_texts = lambda texts: (embedder2.calls.append(list(texts)), vectors(list(texts)))[1]
    run = P.embed_parquet(embedder2, [*TEXTS[:12], "bad at first"], "text", tmp_path, shard_size=4)
    assert embedder2.calls == [[*TEXTS[8:12]], ["bad at first"]]  # 4 new in one shard, then the retry
    assert run.resumed == 8 and run.embedded == 5
    index = open_index(tmp_path)
    assert index.items == [*TEXTS[:12], "bad at first"] and not index.failed
    ids = pa.concat_tables(pq.read_table(p) for p in P.shard_files(tmp_path)).column("id").to_pylist()
    assert ids.count(8) == 2  # the refused row and the later ok row; the reader keeps the later one


@pytest.mark.parametrize("how", ["fail", "interrupt"])
def test_a_job_that_stops_keeps_every_answered_row(tmp_path, how):
    run = P.embed_parquet(ScriptedEmbedder(stop_after=1, how=how), TEXTS, "text", tmp_path, shard_size=10)
    assert (run.failure is not None) == (how == "fail") and run.interrupted == (how == "interrupt")
    assert len(run.written) == 2  # the whole first shard, then the answered half of the second
    index = open_index(tmp_path)
    assert index.items == TEXTS[:15]
    assert run.unanswered == TEXTS[15:]  # the rest of the second shard and the third, never sent
    again = ScriptedEmbedder()
    rerun = P.embed_parquet(again, TEXTS, "text", tmp_path, shard_size=10)
    assert again.calls == [TEXTS[15:]] and rerun.complete and open_index(tmp_path).items == TEXTS


@pytest.mark.parametrize("how", ["fail", "interrupt"])
def test_the_npy_job_keeps_the_same_rows_as_the_parquet_job(tmp_path, how):
    """embed_into and embed_parquet share one reading of how an embed call ended (resume.attempt)."""
    from clip_triton.client.resume import embed_into

    items = [*TEXTS[:6], "bad one", *TEXTS[6:10]]
    run = embed_into(ScriptedEmbedder(stop_after=0, how=how), items, "text", tmp_path / "idx")
    assert run.index.items == TEXTS[:5] and run.refused == {"bad one": "refused: bad text"}  # the first half
    assert run.unanswered == TEXTS[5:10] and not run.complete
    assert (run.failure is not None) == (how == "fail") and run.interrupted == (how == "interrupt")
    again = embed_into(ScriptedEmbedder(), items, "text", tmp_path / "idx")
    assert again.resumed == 5 and again.refused == {"bad one": "refused: bad text"} and len(again.index) == 10
    parquet = P.embed_parquet(ScriptedEmbedder(stop_after=0, how=how), items, "text", tmp_path / "pq")
    assert parquet.refused == run.refused and parquet.unanswered == run.unanswered


def test_a_job_killed_mid_write_leaves_whole_shards_only(tmp_path, monkeypatch):
    P.embed_parquet(ScriptedEmbedder(), TEXTS[:10], "text", tmp_path, shard_size=10)
    before = (tmp_path / "part-00000.parquet").read_bytes()
    real_replace = os.replace

    def killed(src, dst):  # the process dies between writing the temporary file and renaming it
        raise SystemExit("killed")

    monkeypatch.setattr(P.os, "replace", killed)
    with pytest.raises(SystemExit):
        P.embed_parquet(ScriptedEmbedder(), TEXTS, "text", tmp_path, shard_size=10)
    monkeypatch.setattr(P.os, "replace", real_replace)
    (tmp_path / ".part-00001.parquet.tmp-99999").write_bytes(b"PAR1 half a shard")  # a kill -9 leaves this
    assert [p.name for p in P.shard_files(tmp_path)] == ["part-00000.parquet"]
    assert (tmp_path / "part-00000.parquet").read_bytes() == before and open_index(tmp_path).items == TEXTS[:10]
    again = ScriptedEmbedder()
    P.embed_parquet(again, TEXTS, "text", tmp_path, shard_size=10)
    assert again.calls == [TEXTS[10:20], TEXTS[20:]] and not list(tmp_path.glob(".part-*"))


def _shard(tmp_path, **changes):
    P.embed_parquet(ScriptedEmbedder(**changes), TEXTS[:4], "text", tmp_path / "other")
    return tmp_path / "other" / "part-00000.parquet"


@pytest.mark.parametrize(
    "damage, fragment",
    [
        ("truncated", "is not a readable Parquet shard"),
        ("garbage", "is not a readable Parquet shard"),
        ("other model", "fake-clip-2"),
        ("other size", "8-d"),
        ("width", "need 16 values a row"),
        ("foreign", "was not written by clip-triton embed"),
    ],
)
def test_bad_shards_are_refused_naming_the_file_before_anything_is_sent(tmp_path, damage, fragment):
    out = tmp_path / "out"
    P.embed_parquet(ScriptedEmbedder(), TEXTS[:4], "text", out)
    bad = out / "part-00001.parquet"
    if damage == "truncated":
        data = (out / "part-00000.parquet").read_bytes()
        bad.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        bad.write_bytes(os.urandom(2000))
    elif damage == "other model":
        bad.write_bytes(_shard(tmp_path, model="fake-clip-2").read_bytes())
    elif damage == "other size":
        bad.write_bytes(_shard(tmp_path, dim=8).read_bytes())
    elif damage == "width":  # the metadata says 16 dimensions, the column holds 8 a row
        table = pq.read_table(_shard(tmp_path, dim=8))
        meta = json.loads(table.schema.metadata[P.META_KEY]) | {"embed_dim": DIM}
        pq.write_table(table.replace_schema_metadata({P.META_KEY: json.dumps(meta).encode()}), bad)
    else:
        pq.write_table(pa.table({"x": [1, 2]}), bad)
    embedder = ScriptedEmbedder()
    with pytest.raises(ClipTritonError, match=fragment) as err:
        P.embed_parquet(embedder, TEXTS, "text", out)
    assert str(bad) in err.value.message and embedder.calls == []
    with pytest.raises(ClipTritonError, match=str(bad)):
        open_index(out)


def test_another_encoding_in_the_same_folder_is_refused(tmp_path):
    P.embed_parquet(ScriptedEmbedder(), TEXTS[:4], "text", tmp_path)
    with pytest.raises(ClipTritonError, match="int8") as err:
        P.embed_parquet(ScriptedEmbedder(), TEXTS, "text", tmp_path, embedding_type="int8")
    assert "part-00000.parquet" in err.value.message
    run = P.embed_parquet(ScriptedEmbedder(), TEXTS, "text", tmp_path, embedding_type="int8", force=True)
    assert open_index(tmp_path).embedding_type == "int8" and run.resumed == 0


# -- the ANN index -----------------------------------------------------------------------------------
def clustered(n: int, dim: int = 32, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((64, dim))
    x = centres[rng.integers(0, 64, n)] + 0.5 * rng.standard_normal((n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_the_structure_is_chosen_by_size():
    assert A.choose(9_999)["type"] == "flat" and A.choose(10_000)["type"] == "ivf"
    assert A.choose(100_000)["nlist"] == 256 and A.choose(1_000_000)["nlist"] == 1024
    assert A.choose(10, "hnsw") == {
        "type": "hnsw",
        "M": 32,
        "efConstruction": 64,
        "efSearch": 128,
        "efSearch_cross": 1024,
    }
    ivf = A.choose(4_000_000)
    assert ivf == {"type": "ivf", "nlist": 2048, "nprobe": 64, "nprobe_cross": 512, "train_rows": 131072}
    assert A.choose(500, "ivf")["nlist"] == 16
    with pytest.raises(ClipTritonError, match="auto, flat, hnsw, ivf"):
        A.choose(10, "lsh")


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf"])
def test_ann_search_finds_what_exact_search_finds(tmp_path, kind):
    x = clustered(12_000)
    items = [f"item {i}" for i in range(len(x))]
    index = EmbeddingIndex(items, x, kind="text", model="fake-clip", pretrained="none")
    queries = clustered(50, seed=1)
    exact = [[h.row for h in hits] for hits in index.search_embeddings(queries, 10)]
    write_ann(index, tmp_path / "idx", kind)
    index.save(tmp_path / "idx")
    params = json.loads((tmp_path / "idx.faiss.json").read_text())
    assert params["type"] == kind and params["rows"] == 12_000 and params["file"] == "idx.faiss"
    loaded = open_index(tmp_path / "idx.npy")
    assert loaded.ann is not None
    approx = [[h.row for h in hits] for hits in loaded.search_embeddings(queries, 10)]
    recall = np.mean([len(set(a) & set(e)) / 10 for a, e in zip(approx, exact)])
    assert recall >= (1.0 if kind == "flat" else 0.9), recall
    assert [[h.row for h in hits] for hits in loaded.search_embeddings(queries, 10, exact=True)] == exact


def test_a_stale_ann_index_is_not_used(tmp_path):
    x = clustered(200)
    index = EmbeddingIndex([f"i{i}" for i in range(200)], x, kind="text")
    write_ann(index, tmp_path / "idx")
    index.save(tmp_path / "idx")
    EmbeddingIndex([f"i{i}" for i in range(199)], x[:199], kind="text").save(tmp_path / "idx")  # rows changed
    notes: list[str] = []
    loaded = open_index(tmp_path / "idx", log=notes.append)
    assert loaded.ann is None and "built over other rows" in notes[0]
    (tmp_path / "idx.faiss.json").write_text("{")
    assert open_index(tmp_path / "idx", log=notes.append).ann is None and "damaged" in notes[1]


def test_a_parquet_folder_gets_its_ann_index_inside(tmp_path):
    P.embed_parquet(ScriptedEmbedder(), TEXTS, "text", tmp_path, shard_size=5)
    path = write_ann(open_index(tmp_path), tmp_path)
    assert path == tmp_path / "index.faiss" and open_index(tmp_path).ann is not None
    assert P.shard_files(tmp_path)[-1].name == "part-00004.parquet"  # the ANN files are not shards


def test_lancedb_table_with_a_metadata_filter(tmp_path):
    import lancedb

    items = [f"/photos/{'cats' if i % 2 else 'dogs'}/{i}.jpg" for i in range(40)]
    x = clustered(40)
    name = write_lancedb(EmbeddingIndex(items, x, kind="image", model="fake-clip"), tmp_path / "db")
    assert name == "clip_image"
    table = lancedb.connect(str(tmp_path / "db")).open_table(name)
    assert table.count_rows() == 40
    hits = table.search(x[7]).limit(1).to_list()
    assert hits[0]["source"] == items[7] and hits[0]["id"] == 7
    filtered = table.search(x[7]).where("source LIKE '%/dogs/%'").limit(3).to_list()
    assert len(filtered) == 3 and all("/dogs/" in h["source"] for h in filtered)
    assert json.loads(table.schema.metadata[b"clip_triton"])["model"] == "fake-clip"


def test_queries_of_the_other_kind_get_the_larger_search_effort(monkeypatch):
    """Text over an image index (CLIP's main use) lies outside the indexed distribution: it is searched
    with efSearch_cross / nprobe_cross; an image query with the index's own effort."""
    x = clustered(12_000)
    index = EmbeddingIndex([f"i{i}" for i in range(len(x))], x, kind="image")
    index.client = ScriptedEmbedder(dim=32)
    seen: list = []
    for kind, knob in (("hnsw", "efSearch"), ("ivf", "nprobe")):
        ann = index.build_ann(kind)
        real = ann.index.search

        def spy(q, k, params=None, real=real, knob=knob):
            seen.append(getattr(params, knob))
            return real(q, k, params=params)

        monkeypatch.setattr(ann, "index", type("Spy", (), {"search": staticmethod(spy)})())
        index.search_text("a text query", 5)
        index.search_image(b"an image query", 5)
        index.search_embeddings(x[:1], 5)  # kind unknown: searched as the other kind
        params = ann.params
        assert seen[-3:] == [params[f"{knob}_cross"], params[knob], params[f"{knob}_cross"]]
        assert params[f"{knob}_cross"] > params[knob]


def test_an_index_named_like_the_folder_it_indexes_opens_as_the_index(tmp_path):
    """`embed --images photos/ --out photos` writes photos.npy beside the folder photos/: `--index
    photos` is that index (and its FAISS file photos.faiss), not a Parquet folder."""
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "cat.jpg").write_bytes(b"not read")
    x = clustered(300)
    index = EmbeddingIndex([f"i{i}" for i in range(300)], x, kind="image")
    index.save(tmp_path / "photos")
    write_ann(index, tmp_path / "photos.npy")
    opened = open_index(tmp_path / "photos")
    assert len(opened) == 300 and opened.ann is not None and (tmp_path / "photos.faiss").is_file()
    assert not (tmp_path / "photos" / "index.faiss").exists()
    assert EmbeddingIndex.load(tmp_path / "photos").ann is not None  # the class's own loader attaches it too
    assert EmbeddingIndex.load(tmp_path / "photos", use_ann=False).ann is None
    (tmp_path / "empty").mkdir()
    with pytest.raises(ClipTritonError, match="without Parquet shards"):
        open_index(tmp_path / "empty")
