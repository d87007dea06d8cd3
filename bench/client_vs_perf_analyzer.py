"""ClipClient bulk throughput vs perf_analyzer, same server, same load shape, one run.

    python bench/client_vs_perf_analyzer.py [--model ViT-B-32] [--images 1000] [--concurrency 4]

Exports the model with random weights (reusing a verified export in --workdir), writes a CPU
repository, starts the pip-installed tritonserver, then for each batch size measures
``clip_image`` from JPEG bytes with perf_analyzer and with ``ClipClient.embed_images`` on N images,
and prints both with their ratio.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from common import bench_repo_options, prepared_export  # bench/common.py

from clip_triton.client import ClipClient
from clip_triton.contract import IMAGE_ENSEMBLE, TEXT_ENSEMBLE
from clip_triton.perf import run_perf_analyzer
from clip_triton.repository import write_repository
from clip_triton.samples import PERF_PROMPTS, image_bytes
from clip_triton.server import TritonServer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--images", type=int, default=1000, help="items ClipClient embeds per measurement")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--workdir", default=".clip-triton/bench")
    args = parser.parse_args()

    work = Path(args.workdir)
    onnx_dir = prepared_export(args.model, work)
    repo = write_repository(
        work / "repo",
        onnx_dir=onnx_dir,
        options=bench_repo_options(),
        force=True,
    )
    photos = image_bytes()
    images = [photos[i % len(photos)] for i in range(args.images)]
    texts = [f"{PERF_PROMPTS[i % len(PERF_PROMPTS)]} #{i}" for i in range(args.images)]

    rows = []
    with TritonServer(repo, log_file=work / "tritonserver.log", response_cache_mib=0) as server:
        for batch in (int(b) for b in args.batch_sizes.split(",")):
            for model, items in ((IMAGE_ENSEMBLE, images), (TEXT_ENSEMBLE, texts)):
                perf = run_perf_analyzer(server.grpc_url, model, batch_size=batch, concurrency=args.concurrency)
                with ClipClient(server.grpc_url, batch_size=batch, concurrency=args.concurrency) as client:
                    embed = client.embed_images if model == IMAGE_ENSEMBLE else client.embed_texts
                    embed(items[: 4 * batch * args.concurrency])  # warm-up
                    start = time.perf_counter()
                    embed(items)
                    client_rate = len(items) / (time.perf_counter() - start)
                rows.append((model, batch, perf.items_per_sec, client_rate))

    print(
        f"\n{args.model} (random weights), CPU tritonserver, concurrency {args.concurrency}, "
        f"{args.images} items per ClipClient run"
    )
    print(f"{'ensemble':<12}{'batch':>6}{'perf_analyzer items/s':>23}{'ClipClient items/s':>20}{'ratio':>8}")
    for model, batch, perf_rate, client_rate in rows:
        print(f"{model:<12}{batch:>6}{perf_rate:>23.1f}{client_rate:>20.1f}{client_rate / perf_rate:>8.2f}")


if __name__ == "__main__":
    main()
