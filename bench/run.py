"""Side-by-side throughput on this machine, one run, one model (random weights, so offline):

    python bench/run.py [--model ViT-B-32] [--concurrency 1,4,16] [--cpu-runtimes onnxruntime:fp32,openvino:bf16]

rows, at each precision (fp32; bf16 where OpenVINO is installed): open_clip PyTorch eager in-process
(its own PIL transform and tokenizer + forward; fp32 is the baseline), each CPU runtime in-process on
the exported graphs (ONNX Runtime fp32, OpenVINO fp32 and bf16; clip-triton's preprocess/tokenizer),
and the Triton ensembles over gRPC with each CPU runtime (JPEG bytes in for ``clip_image``, strings in
for ``clip_text``) through perf_analyzer and through ``ClipClient``. Every row includes
preprocessing or tokenization. Each row has two ratios: to PyTorch eager fp32 (the baseline) and to
PyTorch eager at the row's own precision. Steps run one after another so they do not compete for
the CPU.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np

from clip_triton.contract import TEXT, VISION
from clip_triton.samples import BENCH_PROMPTS as PROMPTS


def photos() -> list[bytes]:
    from clip_triton.samples import image_bytes

    return image_bytes()


def timed(fn, items: list, batch: int, seconds: float) -> tuple[float, float, float]:
    """(items/s, p50 ms, p99 ms per batch) of fn over consecutive batches for about `seconds`."""
    fn(items[:batch])  # warm-up
    latencies, done, start = [], 0, time.perf_counter()
    while time.perf_counter() - start < seconds or len(latencies) < 3:
        chunk = [items[(done + k) % len(items)] for k in range(batch)]
        t0 = time.perf_counter()
        fn(chunk)
        latencies.append((time.perf_counter() - t0) * 1000)
        done += batch
    elapsed = time.perf_counter() - start
    return done / elapsed, statistics.median(latencies), float(np.percentile(latencies, 99))


def best(fn, items, batches, seconds):
    results = {b: timed(fn, items, b, seconds) for b in batches}
    batch = max(results, key=lambda b: results[b][0])
    return batch, results[batch]


def triton_rows(
    label: str,
    repo: Path,
    work: Path,
    concurrencies: list[int],
    images,
    texts,
    client_items: int,
    measurement_ms: int = 4000,
):
    """perf_analyzer at each concurrency, then ClipClient at the highest, against one repository."""
    from clip_triton.client import ClipClient
    from clip_triton.contract import IMAGE_ENSEMBLE, TEXT_ENSEMBLE
    from clip_triton.perf import run_perf_analyzer
    from clip_triton.server import TritonServer

    rows = []
    with TritonServer(repo, log_file=work / "tritonserver.log", response_cache_mib=0) as server:
        for concurrency in concurrencies:
            pi = run_perf_analyzer(
                server.grpc_url, IMAGE_ENSEMBLE, concurrency=concurrency, measurement_ms=measurement_ms
            )
            pt = run_perf_analyzer(
                server.grpc_url, TEXT_ENSEMBLE, concurrency=concurrency, measurement_ms=measurement_ms
            )
            rows.append(
                (
                    f"Triton {label}, perf_analyzer c{concurrency}",
                    pi.items_per_sec,
                    pt.items_per_sec,
                    pi.p50_ms,
                    pi.p99_ms,
                )
            )
        concurrency = max(concurrencies)
        rates = []
        with ClipClient(server.grpc_url, batch_size=1, concurrency=concurrency) as client:
            for embed, items in ((client.embed_images, images), (client.embed_texts, texts)):
                embed(items[:concurrency])
                work_items = [items[i % len(items)] for i in range(client_items)]
                t0 = time.perf_counter()
                embed(work_items)
                rates.append(len(work_items) / (time.perf_counter() - t0))
        rows.append((f"Triton {label}, ClipClient c{concurrency}", rates[0], rates[1], float("nan"), float("nan")))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--batches", default="8,16,32", help="in-process batch sizes tried (best is reported)")
    parser.add_argument("--concurrency", default="1,4,16")
    parser.add_argument(
        "--cpu-runtimes",
        "--engines",
        dest="engines",
        default=None,
        help="CPU runtime:precision pairs (--engines: old spelling) (default where OpenVINO is installed: "
        "onnxruntime:fp32,openvino:fp32,openvino:bf16; else onnxruntime:fp32)",
    )
    parser.add_argument("--seconds", type=float, default=6.0, help="per in-process measurement")
    parser.add_argument("--client-items", type=int, default=400)
    parser.add_argument("--measurement-ms", type=int, default=4000, help="perf_analyzer measurement window")
    parser.add_argument("--workdir", default=".clip-triton/bench")
    parser.add_argument("--queue-delay-us", type=int, default=None)
    parser.add_argument("--preprocess-instances", type=int, default=None)
    parser.add_argument("--json", default=None, help="also write the table's rows to this file")
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    concurrencies = [int(c) for c in args.concurrency.split(",")]

    import open_clip
    import torch
    from common import prepared_export  # bench/common.py
    from PIL import Image

    from clip_triton.cpuruntime import cpu_supports_bf16, open_session
    from clip_triton.export.weights import load_model
    from clip_triton.preprocess import Preprocessor
    from clip_triton.repository import RepoOptions, write_repository
    from clip_triton.tokenizer import ClipTokenizer

    try:
        import openvino  # noqa: F401

        have_openvino = True
    except ImportError:
        have_openvino = False
    default = "onnxruntime:fp32,openvino:fp32,openvino:bf16" if have_openvino else "onnxruntime:fp32"
    configs = [tuple(pair.split(":")) for pair in (args.engines or default).split(",")]
    precisions = sorted({precision for _, precision in configs}, key=["fp32", "bf16"].index)
    work = Path(args.workdir)
    onnx_dir = prepared_export(args.model, work)
    images = photos() * 8
    texts = [f"{PROMPTS[i % len(PROMPTS)]} number {i}" for i in range(256)]
    rows = []  # (precision, name, images/s, texts/s, p50, p99)
    baseline = {}

    def add(row):
        rows.append(row)
        print(f"[bench] {row[1]} ({row[0]}): {row[2]:.1f} images/s, {row[3]:.1f} texts/s", flush=True)

    # 1. open_clip PyTorch eager, its own transform and tokenizer: fp32 is the baseline, bf16 the
    #    same-precision reference for the bf16 rows.
    loaded = load_model(args.model, "none")
    model, contract = loaded.model, loaded.contract
    pre = contract.preprocess
    transform = open_clip.image_transform(
        pre.image_size,
        is_train=False,
        mean=pre.mean,
        std=pre.std,
        interpolation=pre.interpolation,
        resize_mode=pre.resize_mode,
    )
    tokenizer = open_clip.get_tokenizer(contract.model)
    for precision in precisions:
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]
        model = model.to(dtype)

        @torch.inference_mode()
        def torch_images(blobs, dtype=dtype, model=model):
            pixels = torch.stack([transform(Image.open(io.BytesIO(b))) for b in blobs]).to(dtype)
            model.encode_image(pixels, normalize=True)

        @torch.inference_mode()
        def torch_texts(strings, model=model):
            model.encode_text(tokenizer(strings), normalize=True)

        bi, (img_rate, img_p50, img_p99) = best(torch_images, images, batches, args.seconds)
        bt, (txt_rate, _, _) = best(torch_texts, texts, batches, args.seconds)
        add((precision, f"PyTorch eager in-process (batch {bi}/{bt})", img_rate, txt_rate, img_p50, img_p99))
        baseline[precision] = (img_rate, txt_rate)
    model = loaded = None  # free it before the next rows

    # 2. In-process CPU runtimes on the exported graphs, clip-triton's preprocessing and tokenizer.
    ours, tok = Preprocessor(pre), ClipTokenizer(contract.tokenizer)
    for runtime, precision in configs:
        vision = open_session(onnx_dir / VISION.onnx_file, runtime, precision)
        text = open_session(onnx_dir / TEXT.onnx_file, runtime, precision)
        bi, (o_img, o_p50, o_p99) = best(
            lambda b, vision=vision: vision.run(
                None, {contract.pixels.name: np.stack([ours.from_bytes(x) for x in b])}
            ),
            images,
            batches,
            args.seconds,
        )
        bt, (o_txt, _, _) = best(
            lambda s, text=text: text.run(None, {contract.input_ids.name: tok(s)}), texts, batches, args.seconds
        )
        add((precision, f"{runtime} in-process (batch {bi}/{bt})", o_img, o_txt, o_p50, o_p99))
        vision = text = None

    # 3. Triton over gRPC, JPEG bytes / strings in: one repository per CPU runtime and precision.
    for runtime, precision in configs:
        options = RepoOptions(
            runtime="python",
            cpu_runtime=runtime,
            cpu_precision=precision,
            queue_delay_us=args.queue_delay_us,
            preprocess_instances=args.preprocess_instances,
            response_cache="none",  # perf_analyzer and the client repeat their inputs: time the encoders
        )
        repo = write_repository(work / "repo", onnx_dir=onnx_dir, options=options, force=True)
        for row in triton_rows(
            runtime, repo, work, concurrencies, images, texts, args.client_items, args.measurement_ms
        ):
            add((precision, *row))

    base = baseline["fp32"] if "fp32" in baseline else baseline[precisions[0]]
    print(
        f"\n{args.model}, random weights, {contract.image_size[0]}px; this machine "
        f"({os.cpu_count()} CPU cores, native bf16: {'yes' if cpu_supports_bf16() else 'no'}); "
        "JPEG bytes / strings in, embeddings out"
    )
    print("x base: ratio to PyTorch eager fp32; x same: ratio to PyTorch eager at the row's precision")
    print(
        f"{'path':<44}{'prec':>5}{'images/s':>10}{'x base':>8}{'x same':>8}{'texts/s':>10}{'x base':>8}"
        f"{'x same':>8}{'img p50 ms':>12}{'img p99 ms':>12}"
    )
    for precision, name, ir, tr, p50, p99 in rows:
        same = baseline[precision]
        print(
            f"{name:<44}{precision:>5}{ir:>10.1f}{ir / base[0]:>8.2f}{ir / same[0]:>8.2f}{tr:>10.1f}"
            f"{tr / base[1]:>8.2f}{tr / same[1]:>8.2f}{p50:>12.1f}{p99:>12.1f}"
        )
    print("latency: per request (Triton rows) or per in-process batch (in-process rows)")
    if args.json:
        keys = ("images_per_s", "x_base_images", "x_same_images", "texts_per_s", "x_base_texts", "x_same_texts")
        table = [
            {
                "path": name,
                "precision": precision,
                **dict(
                    zip(
                        keys,
                        (ir, ir / base[0], ir / baseline[precision][0], tr, tr / base[1], tr / baseline[precision][1]),
                    )
                ),
                "p50_ms": p50,
                "p99_ms": p99,
            }
            for precision, name, ir, tr, p50, p99 in rows
        ]
        Path(args.json).write_text(json.dumps({"model": args.model, "rows": table}, indent=1) + "\n")


if __name__ == "__main__":
    main()
