"""Triton's response cache on ``clip_text``, one run, one model (random weights, offline):

    python bench/response_cache.py [--model ViT-B-32] [--rounds 10] [--json FILE]

Three servers in turn on the same export (python-backend ONNX Runtime encoders): the cache off
(``repo --response-cache none``, no ``--cache-config``); on at the inner ``clip_text_cached`` ensemble
behind the public ``clip_text`` (what ``clip-triton repo`` writes, 256 MiB: every entry holds both
outputs, clip_triton/repository.py ``cached_towers``); and on at the public ``clip_text`` itself (the
layout before issue 25, whose entries hold only the outputs the first request named: kept to price the
extra ensemble layer). Two workloads through ``ClipClient`` (its own prompt cache off, so every request
reaches the server), ``--request-batch`` prompts per request at ``--concurrency``:

* repeated prompts: zero-shot classification's pattern, the same prompt set (ImageNet templates x
  class names) sent ``--rounds`` times, one call each: only the first round misses;
* unique prompts: every request new (all misses): what the cache costs when it never hits.

Rows: texts/s of each layout, the ratios to the cache off, and the hit rate Triton reports
(``cache_hit`` of the cached ensemble over the public ensemble's requests).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import prepared_export

from clip_triton.contract import TEXT_CACHED, TEXT_ENSEMBLE


def prompt_sets(count: int, rounds: int) -> dict[str, list[list[str]]]:
    """Each workload's rounds: one ``embed_texts`` call each, as an application sends its prompt set
    per request (within one call the client groups texts by length, which reorders repeats)."""
    from importlib import resources

    data = json.loads(resources.files("clip_triton").joinpath("assets", "imagenet_zeroshot.json").read_text())
    templates, classes = data["templates"]["openai"], data["classnames"]
    prompts = [templates[i % len(templates)].format(classes[i // len(templates)]) for i in range(count)]
    unique = [
        templates[i % len(templates)].format(classes[(i // len(templates)) % len(classes)]) + f" #{i}"
        for i in range(count * rounds)
    ]
    return {
        "repeated prompts": [prompts] * rounds,
        "unique prompts": [unique[r * count : (r + 1) * count] for r in range(rounds)],
    }


def planned_requests(client, texts: list[str], batch: int) -> int:
    """How many requests ``client.embed_texts(texts)`` sends: one length bucket a request."""
    from clip_triton.client.core import client_grouping, length_batches

    lengths = client_grouping(client.group_by_length, client.facts)
    if lengths is None or not lengths.groups:
        return -(-len(texts) // batch)
    return len(length_batches([lengths.key(t) for t in texts], list(range(len(texts))), batch))


LAYOUTS = ("off", "nested", "public")  # "nested": what `clip-triton repo` writes


def public_layout(repo: Path) -> None:
    """Rewrite an uncached repository to cache the public clip_text ensemble (the old layout)."""
    from clip_triton.repository import parse, render

    path = repo / TEXT_ENSEMBLE / "config.pbtxt"
    config = parse(path.read_text())
    config.response_cache.enable = True
    path.write_text(render(config))


def run(onnx_dir: Path, work: Path, layout: str, sets, request_batch: int, concurrency: int) -> dict:
    from clip_triton.client import ClipClient
    from clip_triton.repository import RepoOptions, write_repository
    from clip_triton.server import DEFAULT_RESPONSE_CACHE_MIB, TritonServer

    label, cached = layout, layout != "off"
    options = RepoOptions(
        runtime="python", cpu_runtime="onnxruntime", response_cache="text" if layout == "nested" else "none"
    )
    repo = write_repository(work / f"cache-repo-{label}", onnx_dir=onnx_dir, options=options, force=True)
    if layout == "public":
        public_layout(repo)
    hits_at = TEXT_CACHED if layout == "nested" else TEXT_ENSEMBLE
    mib = DEFAULT_RESPONSE_CACHE_MIB if cached else 0
    rows = {}
    with (
        TritonServer(repo, log_file=work / f"cache-triton-{label}.log", response_cache_mib=mib) as server,
        ClipClient(
            server.grpc_url, batch_size=request_batch, concurrency=concurrency, prompt_cache_entries=0
        ) as client,
    ):
        client.embed_texts([f"warm-up {i}" for i in range(request_batch * concurrency)])
        for name, rounds in sets.items():
            before = _counts(server, hits_at)
            t0 = time.perf_counter()
            for texts in rounds:
                client.embed_texts(texts)
            seconds = time.perf_counter() - t0
            planned = sum(planned_requests(client, texts, request_batch) for texts in rounds)
            after = _settled_counts(server, hits_at, before, planned)
            requests = after[0] - before[0]
            total = sum(len(texts) for texts in rounds)
            rows[name] = {"texts_per_s": total / seconds, "hit_rate": (after[1] - before[1]) / max(requests, 1)}
    return rows


def _settled_counts(server, hits_at: str, before: tuple[int, int], requests: int) -> tuple[int, int]:
    """The counters once Triton has recorded all ``requests``: it records a request's statistics after
    sending its response, so a reading taken the moment the client returns can miss the last ones on a
    busy machine (a loaded CI run read a hit rate under the exact 2/3). Bounded at 30 s."""
    deadline = time.monotonic() + 30
    counts = _counts(server, hits_at)
    while counts[0] - before[0] < requests and time.monotonic() < deadline:
        time.sleep(0.05)
        counts = _counts(server, hits_at)
    time.sleep(0.2)  # the cache_hit counter of the same requests, recorded beside it
    return _counts(server, hits_at)


def _counts(server, hits_at: str) -> tuple[int, int]:
    """(requests of the text ensemble, cache hits at ``hits_at``) so far: a hit there is a request whose
    encoder forward did not run."""
    import tritonclient.grpc as grpcclient

    def inference(model: str) -> dict:
        with grpcclient.InferenceServerClient(server.grpc_url) as client:
            stats = client.get_inference_statistics(model, headers=server.grpc_admin_headers, as_json=True)
        return stats["model_stats"][0]["inference_stats"]

    requests = int(inference(TEXT_ENSEMBLE).get("success", {}).get("count", 0))
    return requests, int(inference(hits_at).get("cache_hit", {}).get("count", 0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--prompts", type=int, default=160, help="prompts in the repeated set")
    parser.add_argument("--rounds", type=int, default=10, help="times the prompt set is sent")
    parser.add_argument("--request-batch", type=int, default=16)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--workdir", default=".clip-triton/bench")
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    args = parser.parse_args()

    import clip_triton.client
    import clip_triton.repository  # noqa: F401

    work = Path(args.workdir)
    onnx_dir = prepared_export(args.model, work)
    sets = prompt_sets(args.prompts, args.rounds)
    report = {layout: run(onnx_dir, work, layout, sets, args.request_batch, args.concurrency) for layout in LAYOUTS}
    off, nested, public = (report[layout] for layout in LAYOUTS)
    print(
        f"\n{args.model}, clip_text, ClipClient ({args.request_batch} prompts per request, concurrency "
        f"{args.concurrency}, client prompt cache off); texts/s. nested: the cache at clip_text_cached behind "
        "clip_text (what `clip-triton repo` writes); public: at clip_text itself (the old, poisonable layout)"
    )
    print(
        f"{'workload':<20}{'texts':>7}{'off':>9}{'nested':>9}{'ratio':>7}{'hits':>7}{'public':>9}{'ratio':>7}{'hits':>7}"
    )
    for name, rounds in sets.items():
        base = off[name]["texts_per_s"]
        print(
            f"{name:<20}{sum(len(t) for t in rounds):>7}{base:>9.1f}"
            + "".join(
                f"{row[name]['texts_per_s']:>9.1f}{row[name]['texts_per_s'] / base:>7.2f}{row[name]['hit_rate']:>7.0%}"
                for row in (nested, public)
            )
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model, **report}, indent=2) + "\n")


if __name__ == "__main__":
    main()
