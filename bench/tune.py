"""Sweep the serving knobs of the CPU repository and print clip_image/clip_text throughput per setting.

    python bench/tune.py [--model ViT-B-32] [--concurrency 8] [--only fp32|bf16]

Each row writes a repository with one change from the default, restarts tritonserver and measures
both ensembles with perf_analyzer (real JPEGs / prompts, single-item requests) in the same run.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from common import bench_repo_options, prepared_export  # bench/common.py

from clip_triton.contract import IMAGE_ENSEMBLE, TEXT_ENSEMBLE
from clip_triton.errors import ClipTritonError
from clip_triton.perf import run_perf_analyzer
from clip_triton.repository import write_repository
from clip_triton.server import ADMIN_APIS, TritonServer

OV = {"cpu_runtime": "openvino", "cpu_precision": "bf16"}
SETTINGS = {
    "fp32 default (ORT, 2 ms delay, spinning, 2 threads)": {},
    "fp32, ORT threads do not spin": {"ort_spinning": False},
    "fp32, no spinning, 10 ms queue delay": {"ort_spinning": False, "queue_delay_us": 10_000},
    "fp32, no spinning, 1 preprocess instance": {"ort_spinning": False, "preprocess_instances": 1},
    "fp32, no spinning, 2 encoders x 1 thread": {"ort_spinning": False, "encoder_instances": 2, "encoder_threads": 1},
    "fp32, no spinning, 0.5 ms queue delay": {"ort_spinning": False, "queue_delay_us": 500},
    "bf16 default (OpenVINO, 2 ms delay, 2 threads)": OV,
    "bf16, 10 ms queue delay": {**OV, "queue_delay_us": 10_000},
    "bf16, 1 preprocess instance": {**OV, "preprocess_instances": 1},
    "bf16, 3 preprocess instances": {**OV, "preprocess_instances": 3},
    "bf16, 2 encoders x 1 thread": {**OV, "encoder_instances": 2, "encoder_threads": 1},
    "bf16, inputs via system shared memory": {**OV, "shared_memory": "system"},
}
CLIENT_KNOBS = ("shared_memory",)  # perf_analyzer's side, not the repository's


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--workdir", default=".clip-triton/bench")
    parser.add_argument("--only", default="", help="run only the settings whose name starts with this (fp32, bf16)")
    args = parser.parse_args()
    work = Path(args.workdir)
    onnx_dir = prepared_export(args.model, work)
    rows = []
    for name, change in SETTINGS.items():
        if not name.startswith(args.only):
            continue
        client = {k: change[k] for k in CLIENT_KNOBS if k in change}
        options = bench_repo_options(**{k: v for k, v in change.items() if k not in client})
        repo = write_repository(work / "tune-repo", onnx_dir=onnx_dir, options=options, force=True)
        try:
            # perf_analyzer registers its shared memory over gRPC, where it cannot send the admin key.
            apis = tuple(a for a in ADMIN_APIS if a != "shared-memory" or "shared_memory" not in client)
            with TritonServer(
                repo, log_file=work / "tune-triton.log", restricted_apis=apis, response_cache_mib=0
            ) as server:
                image = run_perf_analyzer(server.grpc_url, IMAGE_ENSEMBLE, concurrency=args.concurrency, **client)
                text = run_perf_analyzer(server.grpc_url, TEXT_ENSEMBLE, concurrency=args.concurrency, **client)
        except ClipTritonError as exc:  # one setting failing is a result too: keep the others
            rows.append((name, None, str(exc).splitlines()[0][:120]))
            print(f"{name:<50} FAILED: {exc}", flush=True)
            continue
        rows.append((name, image, text))
        print(f"{name:<50}{image.items_per_sec:>9.1f} img/s{text.items_per_sec:>9.1f} txt/s", flush=True)
    print(f"\n{args.model}, concurrency {args.concurrency}, single-item requests")
    print(f"{'setting':<50}{'images/s':>10}{'p99 ms':>9}{'texts/s':>10}{'p99 ms':>9}")
    for name, image, text in rows:
        if image is None:
            print(f"{name:<50}  failed: {text}")
            continue
        print(
            f"{name:<50}{image.items_per_sec:>10.1f}{image.p99_ms:>9.1f}{text.items_per_sec:>10.1f}{text.p99_ms:>9.1f}"
        )


if __name__ == "__main__":
    main()
