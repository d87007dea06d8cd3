"""Triton's response cache on ``clip_text``, one run, one model (random weights, offline):

    python bench/response_cache.py [--model ViT-B-32] [--rounds 10] [--json FILE]

Two servers in turn on the same export (python-backend ONNX Runtime encoders): the cache off
(``repo --response-cache none``, no ``--cache-config``) and on (the default: ``clip_text`` cached,
256 MiB). Two workloads through ``ClipClient`` (its own prompt cache off, so every request reaches
the server), ``--request-batch`` prompts per request at ``--concurrency``:

* repeated prompts: zero-shot classification's pattern, the same prompt set (ImageNet templates x
  class names) sent ``--rounds`` times: only the first round misses;
* unique prompts: every request new (all misses): what the cache costs when it never hits.

Rows: texts/s off and on, their ratio, and the hit rate Triton reports (``cache_hit`` of the
ensemble's statistics over its requests).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import prepared_export

from clip_triton.contract import TEXT_ENSEMBLE


def prompt_sets(count: int, rounds: int) -> dict[str, list[str]]:
    from importlib import resources

    data = json.loads(resources.files("clip_triton").joinpath("assets", "imagenet_zeroshot.json").read_text())
    templates, classes = data["templates"]["openai"], data["classnames"]
    prompts = [templates[i % len(templates)].format(classes[i // len(templates)]) for i in range(count)]
    unique = [
        templates[i % len(templates)].format(classes[(i // len(templates)) % len(classes)]) + f" #{i}"
        for i in range(count * rounds)
    ]
    return {"repeated prompts": prompts * rounds, "unique prompts": unique}


def run(onnx_dir: Path, work: Path, cached: bool, sets, request_batch: int, concurrency: int) -> dict:
    from clip_triton.client import ClipClient
    from clip_triton.repository import RepoOptions, write_repository
    from clip_triton.server import DEFAULT_RESPONSE_CACHE_MIB, TritonServer

    label = "on" if cached else "off"
    options = RepoOptions(runtime="python", response_cache="text" if cached else "none")
    repo = write_repository(work / f"cache-repo-{label}", onnx_dir=onnx_dir, options=options, force=True)
    mib = DEFAULT_RESPONSE_CACHE_MIB if cached else 0
    rows = {}
    with (
        TritonServer(repo, log_file=work / f"cache-triton-{label}.log", response_cache_mib=mib) as server,
        ClipClient(
            server.grpc_url, batch_size=request_batch, concurrency=concurrency, prompt_cache_entries=0
        ) as client,
    ):
        client.embed_texts([f"warm-up {i}" for i in range(request_batch * concurrency)])
        for name, texts in sets.items():
            before = _counts(server)
            t0 = time.perf_counter()
            client.embed_texts(texts)
            seconds = time.perf_counter() - t0
            after = _counts(server)
            requests = after[0] - before[0]
            rows[name] = {"texts_per_s": len(texts) / seconds, "hit_rate": (after[1] - before[1]) / max(requests, 1)}
    return rows


def _counts(server) -> tuple[int, int]:
    """(requests, cache hits) of the text ensemble so far."""
    import tritonclient.grpc as grpcclient

    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        stats = client.get_inference_statistics(TEXT_ENSEMBLE, headers=server.grpc_admin_headers, as_json=True)
    inference = stats["model_stats"][0]["inference_stats"]
    requests = int(inference.get("success", {}).get("count", 0))
    return requests, int(inference.get("cache_hit", {}).get("count", 0))


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
    off = run(onnx_dir, work, False, sets, args.request_batch, args.concurrency)
    on = run(onnx_dir, work, True, sets, args.request_batch, args.concurrency)
    print(
        f"\n{args.model}, clip_text, ClipClient ({args.request_batch} prompts per request, concurrency "
        f"{args.concurrency}, client prompt cache off); texts/s"
    )
    print(f"{'workload':<20}{'texts':>7}{'cache off':>11}{'cache on':>10}{'ratio':>7}{'hit rate':>10}")
    for name, texts in sets.items():
        ratio = on[name]["texts_per_s"] / off[name]["texts_per_s"]
        print(
            f"{name:<20}{len(texts):>7}{off[name]['texts_per_s']:>11.1f}{on[name]['texts_per_s']:>10.1f}"
            f"{ratio:>7.2f}{on[name]['hit_rate']:>10.1%}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model, "off": off, "on": on}, indent=2) + "\n")


if __name__ == "__main__":
    main()
