"""Recall@10 of each compact embedding type, and of the FAISS index, against float32 exact search:

    python bench/encodings.py [--model ViT-B-32] [--rows 100000] [--ann-rows 100000,1000000] [--json FILE]

The corpus is synthetic with a CLIP model's statistics (random weights, offline): ``--seed-items`` image
embeddings (variations of the bundled photographs) and text embeddings (captions and prompts) from
open_clip, then two corpora of ``--rows`` image-side vectors, each L2-normalised:

- ``gaussian``: one Gaussian with the seeds' mean and covariance (shrunk 10% towards isotropic). It
  keeps the anisotropy of CLIP embeddings (a large shared mean direction) but has no neighbourhoods:
  the hardest case for search;
- ``clustered``: each vector a random seed plus ``--spread`` times that Gaussian's noise: clusters
  around the model's real outputs, as a collection of related photos has.

Two query sets for each: text-side vectors (text->image, the cross-modal search CLIP is used for) and
fresh image-side vectors (image->image). Tables:

1. the synthetic corpus against its seeds (how CLIP-like it is);
2. each ``embedding_type`` (clip_triton/encodings.py), and variants: bytes per vector and recall@10 of
   the top 10 by the type's own scores (integer dot products, Hamming for binary);
3. with ``--ann``: the FAISS structures (clip_triton/client/ann.py) at each of ``--ann-rows`` and
   corpus: build time, index bytes, peak RSS growth, and ms per query and recall@10 at the default
   search parameter, half of it, and two and four times it.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from text_lengths import workloads

from clip_triton import encodings as E
from clip_triton.contract import EMBEDDING_TYPES

K = 10
SINGLE = 100  # queries timed one at a time


def seed_embeddings(
    model_name: str, count: int, seed: int = 0, pretrained: str | None = None
) -> tuple[np.ndarray, np.ndarray]:
    import open_clip
    import torch
    from PIL import Image, ImageEnhance

    from clip_triton.export.adapter import register_model_config
    from clip_triton.samples import image_paths

    model_name = register_model_config(model_name)  # a config file's path, or an open_clip name as it is
    torch.manual_seed(seed)
    model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=pretrained)
    tokenizer = open_clip.get_tokenizer(model_name)
    model.eval()
    rng = np.random.default_rng(seed)
    sources = [Image.open(p).convert("RGB") for p in image_paths()]
    images = []
    for i in range(count):
        image = ImageEnhance.Brightness(sources[i % len(sources)]).enhance(0.6 + rng.random() * 0.8)
        image = image.rotate(int(rng.integers(-20, 20)))
        w, h = image.size
        x, y = int(rng.integers(0, w // 3)), int(rng.integers(0, h // 3))
        images.append(
            preprocess(
                image.crop((x, y, x + w // 2 + int(rng.integers(0, w // 3)), y + h // 2 + int(rng.integers(0, h // 3))))
            )
        )
    texts = [t for group in workloads(count).values() for t in group]
    texts = [texts[int(i)] for i in rng.permutation(len(texts))[:count]]
    with torch.no_grad():
        image_rows = torch.cat([model.encode_image(torch.stack(images[i : i + 64])) for i in range(0, count, 64)])
        text_rows = torch.cat([model.encode_text(tokenizer(texts[i : i + 64])) for i in range(0, count, 64)])
    normalise = torch.nn.functional.normalize
    return normalise(image_rows, dim=-1).numpy(), normalise(text_rows, dim=-1).numpy()


class Generator:
    """Unit vectors with a seed set's statistics. ``spread=None``: one Gaussian with the seeds' mean and
    covariance (shrunk 10% towards isotropic): no neighbourhood structure, the hardest case for search.
    ``spread=h``: each vector is a random seed plus ``h`` times that Gaussian's centred noise (a kernel
    density estimate): clusters around the model's real outputs, as a collection of related photos has."""

    def __init__(self, seeds: np.ndarray, spread: float | None = None, shrink: float = 0.1):
        d = seeds.shape[1]
        self.seeds, self.spread = seeds.astype(np.float32), spread
        self.mean = seeds.mean(0)
        centred = seeds - self.mean
        cov = centred.T @ centred / len(seeds)
        cov = (1 - shrink) * cov + shrink * np.trace(cov) / d * np.eye(d)
        self.factor = np.linalg.cholesky(cov).astype(np.float32)

    def sample(self, n: int, rng: np.random.Generator, chunk: int = 100_000) -> np.ndarray:
        out = np.empty((n, len(self.mean)), np.float32)
        for start in range(0, n, chunk):
            m = min(chunk, n - start)
            noise = rng.standard_normal((m, len(self.mean)), dtype=np.float32) @ self.factor.T
            if self.spread is None:
                x = self.mean + noise
            else:
                x = self.seeds[rng.integers(0, len(self.seeds), m)] + self.spread * noise
            out[start : start + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
        return out


def stats(x: np.ndarray) -> dict:
    sample = x[:1000]
    pairwise = sample @ sample.T
    off = pairwise[~np.eye(len(sample), dtype=bool)]
    return {
        "mean vector norm": float(np.linalg.norm(x.mean(0))),
        "mean pairwise cosine": float(off.mean()),
        "max abs component x sqrt(D)": float(np.abs(x).max() * np.sqrt(x.shape[1])),
        "share clipped by int8": float((np.abs(x) > E.INT8_RANGE_RMS / np.sqrt(x.shape[1])).mean()),
    }


def top_k_of(scores_fn, queries, k: int = K, chunk: int = 100) -> np.ndarray:
    out = []
    for start in range(0, len(queries), chunk):
        s = scores_fn(queries[start : start + chunk])
        part = np.argpartition(-s, k, axis=1)[:, :k]
        order = np.take_along_axis(s, part, axis=1).argsort(axis=1)[:, ::-1]
        out.append(np.take_along_axis(part, order, axis=1))
    return np.concatenate(out)


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / K for a, b in zip(found, truth)]))


def exact_top(db: np.ndarray, queries: np.ndarray) -> np.ndarray:
    return top_k_of(lambda q: q @ db.T, queries)


def int8_with(x: np.ndarray, range_rms: float) -> np.ndarray:
    scale = 127 * np.sqrt(x.shape[1]) / range_rms
    return np.clip(np.rint(x * scale), -127, 127).astype(np.int8)


def binary_top(db_bits: np.ndarray, query_bits: np.ndarray, k: int) -> np.ndarray:
    """Top ``k`` by Hamming distance (faiss's popcount; the same order as encodings.scores)."""
    import faiss

    index = faiss.IndexBinaryFlat(db_bits.shape[1] * 8)
    index.add(np.ascontiguousarray(db_bits))
    return index.search(np.ascontiguousarray(query_bits), k)[1]


def encoding_recalls(db: np.ndarray, queries: np.ndarray) -> dict[str, float]:
    """recall@10 of each type (and variants) for one corpus and one query set."""
    truth = exact_top(db, queries)
    dim = db.shape[1]
    out = {}
    for name in ("float", "float16", "int8", "uint8"):
        encoded_db, encoded_q = E.encode(db, name), E.encode(queries, name)
        out[name] = recall(top_k_of(lambda q, e=encoded_db, n=name: E.scores(q, e, n), encoded_q), truth)
    int8_rows = E.decode(E.encode(db, "int8"), "int8", dim)  # a store that keeps int8 rows, queried in float
    out["int8 rows, float32 query"] = recall(top_k_of(lambda q, rows=int8_rows: q @ rows.T, queries), truth)
    bits_db, bits_q = E.encode(db, "ubinary"), E.encode(queries, "ubinary")
    out["binary"] = out["ubinary"] = recall(binary_top(bits_db, bits_q, K), truth)
    int8_db = E.encode(db, "int8")
    wide = binary_top(bits_db, bits_q, 100)
    rescored = [row[np.argsort(-(E.decode(int8_db[row], "int8", dim) @ q))[:K]] for row, q in zip(wide, queries)]
    out["ubinary top 100, rescored with int8"] = recall(np.array(rescored), truth)
    for factor in ALTERNATIVE_RANGES:
        q8, d8 = int8_with(queries, factor).astype(np.float64), int8_with(db, factor).astype(np.float64)
        out[f"int8 with R = {factor:g}/sqrt(D)"] = recall(top_k_of(lambda q, d=d8: q @ d.T, q8), truth)
    return out


ALTERNATIVE_RANGES = tuple(r for r in (4.0, 8.0, 16.0) if r != E.INT8_RANGE_RMS)  # int8 with other R, to compare
TYPE_ROWS = (
    "float",
    "float16",
    "int8",
    "int8 rows, float32 query",
    "uint8",
    "binary",
    "ubinary",
    "ubinary top 100, rescored with int8",
    *(f"int8 with R = {r:g}/sqrt(D)" for r in ALTERNATIVE_RANGES),
)


def type_bytes(name: str, dim: int) -> int:
    if name in EMBEDDING_TYPES:
        return E.width(name, dim) * E.dtype(name).itemsize
    if name.startswith("ubinary top"):
        return E.width("ubinary", dim) + dim
    return dim  # the int8 variants


def encodings_table(corpora: dict, query_sets: dict, dim: int) -> list[dict]:
    columns = {}
    for corpus_name, db in corpora.items():
        for query_name, queries in query_sets[corpus_name].items():
            print(f"encodings: {corpus_name}, {query_name}", file=sys.stderr, flush=True)
            columns[f"{corpus_name}, {query_name}"] = encoding_recalls(db, queries)
    return [
        {
            "type": name,
            "bytes/vector": type_bytes(name, dim),
            **{column: round(values[name], 4) for column, values in columns.items()},
        }
        for name in TYPE_ROWS
    ]


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def ann_table(generators: dict, query_sets: dict, sizes: list[int], seed: int) -> list[dict]:
    """Each structure at each size and corpus; the search parameter swept after one build."""
    import faiss

    from clip_triton.client.ann import AnnIndex, choose

    rows = []
    for n in sizes:
        for corpus_name, gen in generators.items():
            db = gen.sample(n, np.random.default_rng(seed + n))
            queries = query_sets[corpus_name]
            truths, exact = (
                {},
                {
                    "rows": n,
                    "corpus": corpus_name,
                    "structure": "exact (every row)",
                    "search parameter": "",
                    "build s": 0.0,
                    "index MiB": round(db.nbytes / 2**20, 1),
                    "peak RSS growth MiB": None,
                },
            )
            for name, q in queries.items():
                start = time.perf_counter()
                truths[name] = exact_top(db, q)
                exact[f"ms/query, {name}"] = round((time.perf_counter() - start) / len(q) * 1000, 3)
                exact[f"recall@10, {name}"] = 1.0
            single = queries["text->image"][:SINGLE]
            start = time.perf_counter()
            for q in single:  # one query at a time, as `clip-triton search` asks: every row read per query
                scores = db @ q
                np.argpartition(-scores, K)[:K]
            exact["ms, one text query alone"] = round((time.perf_counter() - start) / len(single) * 1000, 2)
            rows.append(exact)
            items = [str(i) for i in range(n)]
            auto = choose(n)["type"]
            for kind in dict.fromkeys([auto, "hnsw", "ivf"]):
                before = rss_mib()
                start = time.perf_counter()
                ann = AnnIndex.build(db, items, kind)
                built = time.perf_counter() - start
                grew = rss_mib() - before
                size = len(faiss.serialize_index(ann.index)) / 2**20
                knob = "efSearch" if kind == "hnsw" else "nprobe"
                same, cross = ann.params[knob], ann.params[f"{knob}_cross"]
                limit = ann.params.get("nlist", 1 << 30)
                for value in sorted({same // 2, same, same * 4, cross // 2, cross, min(cross * 2, limit)}):
                    label = (
                        " (default, same kind)" if value == same else " (default, other kind)" if value == cross else ""
                    )
                    params = (
                        faiss.SearchParametersHNSW(efSearch=max(K, value))
                        if kind == "hnsw"
                        else faiss.SearchParametersIVF(nprobe=value)
                    )
                    row = {
                        "rows": n,
                        "corpus": corpus_name,
                        "structure": kind + (" (auto)" if kind == auto else ""),
                        "search parameter": f"{knob}={value}{label}",
                        "build s": round(built, 1),
                        "index MiB": round(size, 1),
                        "peak RSS growth MiB": round(max(grew, 0.0), 1),
                    }
                    for query_name, q in queries.items():
                        start = time.perf_counter()
                        found = ann.index.search(np.ascontiguousarray(q), K, params=params)[1]
                        row[f"ms/query, {query_name}"] = round((time.perf_counter() - start) / len(q) * 1000, 3)
                        row[f"recall@10, {query_name}"] = round(recall(found, truths[query_name]), 4)
                    start = time.perf_counter()
                    for q in single:
                        ann.index.search(q[None], K, params=params)
                    row["ms, one text query alone"] = round((time.perf_counter() - start) / len(single) * 1000, 2)
                    rows.append(row)
                    print(row, file=sys.stderr, flush=True)
                del ann
            del db
    return rows


def markdown(rows: list[dict]) -> str:
    heads = list(rows[0])
    lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    lines += ["| " + " | ".join("" if r[h] is None else str(r[h]) for h in heads) + " |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-B-32", help="open_clip model name or a model config JSON")
    parser.add_argument(
        "--pretrained",
        default=None,
        help="weights: an open_clip tag (needs the hub) or a checkpoint file; default: random weights (offline)",
    )
    parser.add_argument("--seed-items", type=int, default=512)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--ann", action="store_true", help="also measure the FAISS structures")
    parser.add_argument("--ann-rows", default="100000,1000000")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--spread", type=float, default=0.5, help="the clustered corpus's kernel width")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    weights = args.pretrained or "random weights"
    print(f"embedding {args.seed_items} images and texts with {args.model} ({weights})", file=sys.stderr)
    image_seeds, text_seeds = seed_embeddings(args.model, args.seed_items, args.seed, args.pretrained)
    generators = {
        "gaussian": (Generator(image_seeds), Generator(text_seeds)),
        "clustered": (Generator(image_seeds, args.spread), Generator(text_seeds, args.spread)),
    }
    rng = np.random.default_rng(args.seed)
    corpora = {name: images.sample(args.rows, rng) for name, (images, _) in generators.items()}
    query_sets = {
        name: {"text->image": texts.sample(args.queries, rng), "image->image": images.sample(args.queries, rng)}
        for name, (images, texts) in generators.items()
    }
    corpus = [
        {"set": name, **{k: round(v, 4) for k, v in stats(x).items()}}
        for name, x in (
            ("image seeds", image_seeds),
            ("text seeds", text_seeds),
            *((f"{name} database", db) for name, db in corpora.items()),
            *((f"{name} text queries", q["text->image"]) for name, q in query_sets.items()),
        )
    ]
    dim = image_seeds.shape[1]
    report = {
        "model": args.model,
        "weights": weights,
        "dim": int(dim),
        "rows": args.rows,
        "queries": args.queries,
        "spread": args.spread,
        "corpus": corpus,
        "encodings": encodings_table(corpora, query_sets, dim),
    }
    print(f"\n{args.model} ({weights}), D={dim}; corpus statistics\n\n{markdown(corpus)}")
    print(f"\nrecall@10 vs float32 exact search, {args.rows:,} rows, {args.queries} queries a set\n")
    print(markdown(report["encodings"]))
    if args.ann:
        del corpora
        sizes = [int(s) for s in args.ann_rows.split(",")]
        report["ann"] = ann_table({k: v[0] for k, v in generators.items()}, query_sets, sizes, args.seed)
        print(f"\nFAISS index vs exact search, {args.queries} queries a set\n\n{markdown(report['ann'])}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
