"""Where a 16-image request's time goes on the served path, and what each serving set-up makes of it.

    python bench/image_path.py [--model ViT-B-32] [--concurrency 4] [--seconds 10]

One run, one machine:
1. The in-process floor: the server's own preprocessing (``Preprocessor.from_bytes``: decode, resize,
   crop, normalise) of 16 images and one ONNX Runtime forward of them, serially in this process, as a
   one-process server (FastAPI + open_clip, infinity) does it. ``floor images/s`` = 16 / (both).
2. For each set-up: 16-image requests from ``ClipClient`` at ``--concurrency`` for ``--seconds`` (no
   response cache), images/s, and Triton's own statistics for the interval, per request: time queued
   and computing in ``preprocess`` and ``vision_encoder`` (input copy, inference, output copy), and the
   ensemble's total. Triton counts a batched execution's time once per request in it, so the encoder's
   compute per request is that of one forward of ``images per forward`` images.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

from common import prepared_export  # bench/common.py
from peers import load  # the same load generator as bench/peers.py

BATCH = 16
# (label, RepoOptions changes) — each a whole repository, served in turn.
SETUPS = {
    "default (1 encoder x all cores, spinning)": {},
    "ORT threads do not spin": {"ort_spinning": False},
    "2 encoders x 1 thread": {"encoder_instances": 2, "encoder_threads": 1},
    "2 encoders x 1 thread, no spinning": {"encoder_instances": 2, "encoder_threads": 1, "ort_spinning": False},
    # fp32 too: OpenVINO runs the IR converted from the module (export --openvino-ir), where installed
    "OpenVINO fp32 (IR)": {"cpu_runtime": "openvino", "cpu_precision": "fp32"},
}
STAGES = ("queue", "compute_input", "compute_infer", "compute_output")


def floor(onnx_dir: Path, photos: list[bytes], reps: int = 5) -> dict:
    """Median seconds to preprocess 16 images and to run one forward on them, in this process."""
    import json

    import numpy as np

    from clip_triton.contract import ModelContract
    from clip_triton.ortutil import make_session
    from clip_triton.preprocess import Preprocessor

    contract = ModelContract.from_dict(json.loads((onnx_dir / "manifest.json").read_text())["contract"])
    pre = Preprocessor(contract.preprocess, dtype=contract.pixel_dtype)
    items = [photos[i % len(photos)] for i in range(BATCH)]
    session = make_session(onnx_dir / "vision.onnx", threads=os.cpu_count() or 1)
    name = session.get_inputs()[0].name
    prep, fwd = [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        pixels = np.stack([pre.from_bytes(item) for item in items])
        t1 = time.perf_counter()
        session.run(None, {name: pixels})
        t2 = time.perf_counter()
        prep.append(t1 - t0)
        fwd.append(t2 - t1)
    return {"preprocess_s": statistics.median(prep), "forward_s": statistics.median(fwd)}


def model_stats(grpc, names: list[str]) -> dict[str, dict[str, float]]:
    """Cumulative (count, ns per stage) of each model, from Triton's statistics."""
    out = {}
    for name in names:
        stats = grpc.get_inference_statistics(name, as_json=True)["model_stats"][0]
        inference = stats["inference_stats"]
        row = {stage: float(inference.get(stage, {}).get("ns", 0)) for stage in STAGES}
        row["success"] = float(inference.get("success", {}).get("ns", 0))
        row["requests"] = float(inference.get("success", {}).get("count", 0))
        row["executions"] = float(stats.get("execution_count", 0))
        out[name] = row
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--concurrency", default="4")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--only", default="", help="comma-separated set-up labels' first words to run")
    parser.add_argument("--workdir", default=".clip-triton/bench")
    parser.add_argument("--json", default=None, help="also write the floor and every row to this file")
    args = parser.parse_args()

    import tritonclient.grpc as grpcclient

    from clip_triton.client import ClipClient
    from clip_triton.contract import IMAGE_ENSEMBLE, PREPROCESS_MODEL, VISION_MODEL
    from clip_triton.repository import RepoOptions, write_repository
    from clip_triton.samples import image_bytes
    from clip_triton.server import TritonServer

    work = Path(args.workdir)
    onnx_dir = prepared_export(args.model, work)
    photos = image_bytes()
    base = floor(onnx_dir, photos)
    per_request = base["preprocess_s"] + base["forward_s"]
    print(
        f"[image_path] in-process floor, {BATCH} images: preprocess {base['preprocess_s'] * 1000:.0f} ms + forward "
        f"{base['forward_s'] * 1000:.0f} ms = {BATCH / per_request:.1f} images/s (one process, serial)",
        flush=True,
    )
    bodies = [[photos[(i * BATCH + k) % len(photos)] for k in range(BATCH)] for i in range(16)]
    names = [IMAGE_ENSEMBLE, PREPROCESS_MODEL, VISION_MODEL]
    rows = []
    chosen = [s for s in args.only.split(",") if s]
    for label, changes in SETUPS.items():
        if chosen and not any(label.startswith(c) for c in chosen):
            continue
        if changes.get("cpu_runtime") == "openvino" and not (onnx_dir / "vision.xml").is_file():
            print(f"[image_path] {label}: skipped (no OpenVINO IR in the export: pip install openvino)", flush=True)
            continue
        options = RepoOptions(
            **{"runtime": "python", "cpu_runtime": "onnxruntime", "response_cache": "none", **changes}
        )
        tag = "".join(c if c.isalnum() else "-" for c in label)[:40]
        repo = write_repository(work / f"image-path-{tag}", onnx_dir=onnx_dir, options=options, force=True)
        with TritonServer(repo, log_file=work / f"image-path-{tag}.log", response_cache_mib=0) as server:
            grpc = grpcclient.InferenceServerClient(server.grpc_url)
            try:
                for concurrency in [int(c) for c in args.concurrency.split(",")]:

                    def make_sender():
                        client = ClipClient(server.grpc_url)
                        return lambda body: len(client.embed_images(body))

                    before = model_stats(grpc, names)
                    result = load(make_sender, bodies, concurrency, args.seconds)
                    after = model_stats(grpc, names)
                    delta = {n: {k: after[n][k] - before[n][k] for k in after[n]} for n in names}
                    requests = max(delta[IMAGE_ENSEMBLE]["requests"], 1.0)
                    ms = {n: {k: delta[n][k] / requests / 1e6 for k in (*STAGES, "success")} for n in names}
                    batch = delta[VISION_MODEL]["requests"] and BATCH * delta[VISION_MODEL]["requests"] / max(
                        delta[VISION_MODEL]["executions"], 1.0
                    )
                    row = {
                        "setup": label,
                        "concurrency": concurrency,
                        "images_per_s": result["items_per_s"],
                        "vs_floor": result["items_per_s"] / (BATCH / per_request),
                        "preprocess_ms": ms[PREPROCESS_MODEL]["compute_infer"],
                        "preprocess_queue_ms": ms[PREPROCESS_MODEL]["queue"],
                        "encoder_in_ms": ms[VISION_MODEL]["compute_input"],
                        "encoder_ms": ms[VISION_MODEL]["compute_infer"],
                        "encoder_out_ms": ms[VISION_MODEL]["compute_output"],
                        "encoder_queue_ms": ms[VISION_MODEL]["queue"],
                        "request_ms": ms[IMAGE_ENSEMBLE]["success"],
                        "images_per_execution": batch,
                    }
                    rows.append(row)
                    print(f"[image_path] {label} c{concurrency}: {result['items_per_s']:.1f} images/s", flush=True)
            finally:
                grpc.close()
    print(
        "\n| set-up | concurrency | images/s | ÷ floor | preprocess ms (queued) | encoder in / infer / out ms "
        "(queued) | images per forward | request ms |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(
            f"| {r['setup']} | {r['concurrency']} | {r['images_per_s']:.1f} | {r['vs_floor']:.2f} | "
            f"{r['preprocess_ms']:.0f} ({r['preprocess_queue_ms']:.0f}) | {r['encoder_in_ms']:.1f} / "
            f"{r['encoder_ms']:.0f} / {r['encoder_out_ms']:.1f} ({r['encoder_queue_ms']:.0f}) | "
            f"{r['images_per_execution']:.1f} | {r['request_ms']:.0f} |"
        )
    if args.json:
        import json

        Path(args.json).write_text(json.dumps({"floor": base, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
