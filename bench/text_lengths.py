"""Text encoding at the sequence-length buckets vs the whole context, one run, one model:

    python bench/text_lengths.py [--model ViT-B-32] [--json FILE]

Random weights (offline). Two exports of the same weights: ``static`` (the text graph takes all 77
tokens, as before buckets) and ``bucketed`` (the contract's buckets; the tokenizer cuts each request
to the shortest bucket that holds its longest text). Tables:

1. the bucketed text graph's forward at each sequence length (ONNX Runtime fp32, in-process, batch
   ``--batch``): what the bucket choice trades (texts/s per length, ratio to the whole context);
2. three workloads, static vs bucketed, in-process (tokenizer + cut + forward, ``--batch`` texts per
   call) and served (the Triton ensembles with ONNX Runtime python encoders, ``ClipClient`` with
   ``--request-batch`` texts per request at ``--concurrency``), with a parity column: the bucketed
   path's embeddings vs open_clip PyTorch ``encode_text`` over all 77 tokens (min cosine, max |diff|).

Workloads: short prompts (the sample prompts), a realistic zero-shot mix (ImageNet's 80 OpenAI
templates x class names, shuffled) and long captions (> 32 tokens: no bucket below the context).
Steps run one after another so they do not compete for the CPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import bench_repo_options, prepared_export

from clip_triton.contract import TEXT, ModelContract
from clip_triton.fidelity import cosine
from clip_triton.samples import BENCH_PROMPTS


def workloads(count: int, seed: int = 0) -> dict[str, list[str]]:
    from importlib import resources

    data = json.loads(resources.files("clip_triton").joinpath("assets", "imagenet_zeroshot.json").read_text())
    rng = np.random.default_rng(seed)
    classes, templates = data["classnames"], data["templates"]["openai"]
    mix = [templates[i % len(templates)].format(classes[int(rng.integers(len(classes)))]) for i in range(count)]
    words = [w for name in classes for w in name.split()]
    long = [
        "a photograph of "
        + " ".join(words[int(j)] for j in rng.integers(0, len(words), size=int(rng.integers(40, 60))))
        for _ in range(count)
    ]
    short = [BENCH_PROMPTS[i % len(BENCH_PROMPTS)] for i in range(count)]
    return {"short prompts": short, "templates x classes": mix, "long captions": long}


def forward_rate(session, name: str, ids: np.ndarray, seconds: float) -> float:
    session.run(None, {name: ids})
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or done < 3 * len(ids):
        session.run(None, {name: ids})
        done += len(ids)
    return done / (time.perf_counter() - start)


def in_process_rate(session, name: str, contract: ModelContract, texts: list[str], batch: int, cut: bool):
    """texts/s of tokenize + (cut) + forward over ``texts`` in batches; returns (rate, embeddings)."""
    from clip_triton.tokenizer import ClipTokenizer, cut_to_bucket

    tokenizer = ClipTokenizer(contract.tokenizer)
    start, outputs = time.perf_counter(), []
    for i in range(0, len(texts), batch):
        ids = tokenizer(texts[i : i + batch])
        outputs.append(session.run(None, {name: cut_to_bucket(ids, contract.tokenizer) if cut else ids})[0])
    return len(texts) / (time.perf_counter() - start), np.concatenate(outputs)


def served_rates(dirs: dict[str, Path], work: Path, sets: dict[str, list[str]], args) -> dict[str, dict[str, float]]:
    """texts/s of each workload on each export's server, both servers up and measured in turn
    (``--repeats`` rounds, the median kept), so drift on this shared machine hits both alike."""
    import contextlib
    import statistics

    from clip_triton.client import ClipClient
    from clip_triton.repository import write_repository
    from clip_triton.server import TritonServer

    samples: dict[str, dict[str, list[float]]] = {label: {name: [] for name in sets} for label in dirs}
    with contextlib.ExitStack() as stack:
        clients = {}
        for label, onnx_dir in dirs.items():
            # No response cache: repeated prompts would be answered from it, not by the encoder measured.
            options = bench_repo_options()
            repo = write_repository(work / f"repo-{label}", onnx_dir=onnx_dir, options=options, force=True)
            server = stack.enter_context(
                TritonServer(repo, log_file=work / f"triton-{label}.log", response_cache_mib=0)
            )
            clients[label] = stack.enter_context(
                ClipClient(
                    server.grpc_url,
                    batch_size=args.request_batch,
                    concurrency=args.concurrency,
                    prompt_cache_entries=0,
                )
            )
            clients[label].embed_texts(sets["short prompts"][: args.request_batch * args.concurrency])  # warm-up
        for _ in range(args.repeats):
            for name, texts in sets.items():
                for label, client in clients.items():
                    t0 = time.perf_counter()
                    client.embed_texts(texts)
                    samples[label][name].append(len(texts) / (time.perf_counter() - t0))
    return {label: {name: statistics.median(v) for name, v in rates.items()} for label, rates in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--batch", type=int, default=32, help="texts per in-process forward")
    parser.add_argument("--lengths", default="8,12,16,24,32,48,64,77", help="sequence lengths of table 1")
    parser.add_argument("--texts", type=int, default=256, help="texts per workload")
    parser.add_argument("--seconds", type=float, default=4.0, help="per table-1 measurement")
    parser.add_argument("--request-batch", type=int, default=16, help="texts per request (served rows)")
    parser.add_argument("--concurrency", type=int, default=4, help="requests in flight (served rows)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of each workload (median kept)")
    parser.add_argument("--no-served", action="store_true", help="skip the Triton rows")
    parser.add_argument("--workdir", default=".clip-triton/bench")
    parser.add_argument("--json", default=None, help="also write every figure to this file")
    args = parser.parse_args()

    import onnxruntime  # noqa: F401 (fail early when the export extra is missing)

    # Everything the later steps import, imported now: the run takes minutes.
    import clip_triton.client
    import clip_triton.repository
    import clip_triton.server  # noqa: F401
    from clip_triton.export import export_model
    from clip_triton.ortutil import make_session
    from clip_triton.tokenizer import ClipTokenizer, cut_to_bucket

    work = Path(args.workdir)
    bucketed_dir = prepared_export(args.model, work)
    static_dir = work / f"onnx-{Path(args.model).stem}-static"
    export_model(args.model, "none", static_dir, reuse=True, text_buckets=())
    manifest = json.loads((bucketed_dir / "manifest.json").read_text())
    contract = ModelContract.from_dict(manifest["contract"])
    static_contract = ModelContract.from_dict(json.loads((static_dir / "manifest.json").read_text())["contract"])
    name = contract.input_ids.name
    bucketed = make_session(bucketed_dir / TEXT.onnx_file)
    static = make_session(static_dir / TEXT.onnx_file)
    report: dict = {"model": manifest["model"], "buckets": list(contract.tokenizer.lengths), "batch": args.batch}

    # -- 1. forward by sequence length --------------------------------------------------------
    rng = np.random.default_rng(0)
    tok = contract.tokenizer
    lengths = [int(v) for v in args.lengths.split(",")]
    per_length = {}
    for length in lengths:
        ids = np.zeros((args.batch, length), np.int32)
        ids[:, 0] = tok.sot_token_id
        ids[:, 1 : length - 1] = rng.integers(1, tok.sot_token_id, size=(args.batch, length - 2))
        ids[:, length - 1] = tok.eot_token_id
        per_length[length] = forward_rate(bucketed, name, ids, args.seconds)
    full = per_length[max(lengths)]
    print(f"\n{manifest['model']} text graph, ONNX Runtime fp32, batch {args.batch}, in-process")
    print(f"{'tokens':>8}{'texts/s':>10}{'x 77':>8}")
    for length, rate in per_length.items():
        print(f"{length:>8}{rate:>10.1f}{rate / full:>8.2f}")
    report["forward_by_length"] = {str(k): v for k, v in per_length.items()}

    # -- 2. workloads, static vs bucketed ------------------------------------------------------
    sets = workloads(args.texts)
    tokenizer = ClipTokenizer(tok)
    import torch

    from clip_triton.export.graphs import tower_module
    from clip_triton.export.verify import padded
    from clip_triton.export.weights import load_model

    reference_model = load_model(args.model, "none", seed=int(manifest.get("seed") or 0)).model
    module = tower_module(reference_model, TEXT.name)
    rows = {}
    for label, texts in sets.items():
        share = {}
        for i in range(0, len(texts), args.request_batch):
            length = cut_to_bucket(tokenizer(texts[i : i + args.request_batch]), tok).shape[1]
            share[length] = share.get(length, 0) + 1
        before, after = [], []
        for _ in range(args.repeats):  # in turn, the median kept: drift hits both alike
            before.append(in_process_rate(static, name, static_contract, texts, args.batch, cut=False)[0])
            rate, embeddings = in_process_rate(bucketed, name, contract, texts, args.batch, cut=True)
            after.append(rate)
        with torch.no_grad():
            expected = module(torch.from_numpy(padded(tokenizer(texts), tok.context_length))).numpy()
        rows[label] = {
            "in_process_static": statistics.median(before),
            "in_process_bucketed": statistics.median(after),
            "requests_by_length": {str(k): v for k, v in sorted(share.items())},
            "min_cosine": float(cosine(expected, embeddings).min()),
            "max_abs_diff": float(np.abs(expected - embeddings).max()),
        }
    del reference_model, module
    if not args.no_served:
        served = served_rates({"static": static_dir, "bucketed": bucketed_dir}, work, sets, args)
        for label in sets:
            rows[label]["served_static"] = served["static"][label]
            rows[label]["served_bucketed"] = served["bucketed"][label]
    report["workloads"] = rows

    print(
        f"\n{manifest['model']}: static (77 tokens) vs bucketed {list(tok.lengths)}; texts/s; parity: bucketed vs "
        "open_clip encode_text over 77 tokens"
    )
    header = f"{'workload':<22}{'requests by length':<26}{'in-process':>22}{'ratio':>7}"
    if not args.no_served:
        header += f"{'served (Triton)':>22}{'ratio':>7}"
    print(header + f"{'min cosine':>13}{'max |diff|':>12}")
    for label, row in rows.items():
        spread = " ".join(f"{k}:{v}" for k, v in row["requests_by_length"].items())
        line = (
            f"{label:<22}{spread:<26}{row['in_process_static']:>10.1f} -> {row['in_process_bucketed']:>7.1f}"
            f"{row['in_process_bucketed'] / row['in_process_static']:>7.2f}"
        )
        if not args.no_served:
            line += (
                f"{row['served_static']:>10.1f} -> {row['served_bucketed']:>7.1f}"
                f"{row['served_bucketed'] / row['served_static']:>7.2f}"
            )
        print(line + f"{row['min_cosine']:>13.7f}{row['max_abs_diff']:>12.2e}")
    print(
        f"(in-process: {args.batch} texts per call; served: ClipClient, {args.request_batch} texts per request, "
        f"concurrency {args.concurrency}, python-backend ONNX Runtime encoders; median of {args.repeats} rounds, "
        "static and bucketed in turn)"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
