"""The GPU check: perf_analyzer over bigG's ensembles at several batch sizes and concurrencies, and
each engine's cosine against open_clip PyTorch (from its build manifest). Run by deploy/gpu-check.sh
in the Triton SDK container next to a serving `triton` service."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .contract import GRPC_PORT, TOWERS
from .footprint import served_names
from .perf import run_perf_analyzer


def engine_cosines(repo: Path) -> list[str]:
    """Each engine's validation, for every served model of the repository."""
    lines = []
    for model in (names.encoder(tower) for names in served_names(repo) for tower in TOWERS):
        manifest = json.loads((repo / model / "1" / "engine.json").read_text())
        checks = manifest["validation"]["checks"]
        platform = manifest["platform"]
        lines.append(
            f"{model:<{max(16, len(model) + 1)}} TensorRT {platform['tensorrt']} on {platform['gpu']}: min cosine vs open_clip "
            f"PyTorch fp32 {min(c['min_cosine'] for c in checks):.6f} over {len(checks)} batches"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", default=f"triton:{GRPC_PORT}", help="the compose service's gRPC address")
    parser.add_argument("--repo", default="/models/current")
    parser.add_argument("--batch-sizes", default="1,8,32,64")
    parser.add_argument("--concurrency", default="1,4,16,32")
    parser.add_argument("--measurement-ms", type=int, default=5000)
    args = parser.parse_args(argv)
    for line in engine_cosines(Path(args.repo)):
        print(line)
    ensembles = [name for names in served_names(Path(args.repo)) for name in (names.image, names.text)]
    width = max(12, *(len(name) + 1 for name in ensembles))
    print(f"\n{'ensemble':<{width}}{'batch':>6}{'concurrency':>13}{'items/s':>10}{'p50 ms':>9}{'p99 ms':>9}")
    for model in ensembles:
        for batch in (int(b) for b in args.batch_sizes.split(",")):
            for concurrency in (int(c) for c in args.concurrency.split(",")):
                r = run_perf_analyzer(
                    args.url, model, batch_size=batch, concurrency=concurrency, measurement_ms=args.measurement_ms
                )
                print(
                    f"{model:<{width}}{batch:>6}{concurrency:>13}{r.items_per_sec:>10.1f}{r.p50_ms:>9.1f}{r.p99_ms:>9.1f}",
                    flush=True,
                )
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
