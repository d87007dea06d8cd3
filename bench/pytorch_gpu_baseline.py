"""open_clip PyTorch eager throughput on a GPU: the baseline TensorRT behind Triton must beat.

Needs only PyTorch and open_clip_torch (random weights: throughput does not depend on them):

    python bench/pytorch_gpu_baseline.py [--model ViT-bigG-14] [--dtypes fp16,bf16] [--batches 1,8,32,64]
        [--peak-tflops 989] [--json out.json]

Prints images/s and texts/s per dtype and batch size, the achieved TFLOP/s, and the FLOP-based
ceiling (peak TFLOP/s / FLOP per item; bigG: image ~967.5 GFLOP, text ~97.9 GFLOP at 77 tokens).
Times are CUDA-event measured after warm-up. `--device cpu` runs it anywhere (tiny models in tests).
"""

from __future__ import annotations

import argparse
import json
import time

# GFLOP per item (2 x multiply-accumulates) for ViT-bigG-14 at 224 px and 77 tokens.
GFLOP = {"ViT-bigG-14": {"image": 967.5, "text": 97.9}}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-bigG-14", help="open_clip name or model-config JSON")
    parser.add_argument("--dtypes", default="fp16,bf16")
    parser.add_argument("--batches", default="1,8,32,64")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--device", default="cuda")
    parser.add_argument(
        "--peak-tflops", type=float, default=989.0, help="dense fp16/bf16 peak of the GPU (H100/H200 SXM: 989)"
    )
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)

    import open_clip
    import torch

    from clip_triton.export.adapter import register_model_config

    name = register_model_config(args.model)
    results = {"model": name, "device": args.device, "rows": []}
    if args.device == "cuda":
        results["gpu"] = torch.cuda.get_device_name(0)
    flops = GFLOP.get(name)
    print(f"{name} on {results.get('gpu', args.device)}; torch {torch.__version__}")
    print(
        f"{'dtype':<6}{'tower':<8}{'batch':>6}{'items/s':>11}{'ms/batch':>10}{'TFLOP/s':>9}{'ceiling/s':>11}{'of ceiling':>12}"
    )
    for dtype_name in args.dtypes.split(","):
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
        model = open_clip.create_model(
            name,
            pretrained=None,
            device=args.device,
            precision={"fp16": "fp16", "bf16": "bf16", "fp32": "fp32"}[dtype_name],
        )
        model.eval()
        size = model.visual.image_size if isinstance(model.visual.image_size, int) else model.visual.image_size[0]
        for tower in ("image", "text"):
            for batch in (int(b) for b in args.batches.split(",")):
                if tower == "image":
                    x = torch.randn(batch, 3, size, size, device=args.device, dtype=dtype)
                    run = lambda model=model, x=x: model.encode_image(x)  # noqa: E731
                else:
                    x = torch.randint(1, 49000, (batch, 77), device=args.device)
                    x[:, -1] = 49407
                    run = lambda model=model, x=x: model.encode_text(x)  # noqa: E731
                with torch.inference_mode():
                    for _ in range(3):
                        run()
                    if args.device == "cuda":
                        torch.cuda.synchronize()
                        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                        start.record()
                        for _ in range(args.iters):
                            run()
                        end.record()
                        torch.cuda.synchronize()
                        ms = start.elapsed_time(end) / args.iters
                    else:
                        t0 = time.perf_counter()
                        for _ in range(args.iters):
                            run()
                        ms = (time.perf_counter() - t0) * 1000 / args.iters
                rate = batch * 1000 / ms
                tflops = rate * flops[tower] / 1000 if flops else float("nan")
                ceiling = args.peak_tflops * 1000 / flops[tower] if flops else float("nan")
                results["rows"].append(
                    {
                        "dtype": dtype_name,
                        "tower": tower,
                        "batch": batch,
                        "items_per_s": rate,
                        "ms_per_batch": ms,
                        "tflops": tflops,
                        "ceiling_items_per_s": ceiling,
                    }
                )
                print(
                    f"{dtype_name:<6}{tower:<8}{batch:>6}{rate:>11.1f}{ms:>10.2f}{tflops:>9.1f}{ceiling:>11.0f}"
                    f"{rate / ceiling:>12.1%}",
                    flush=True,
                )
        model = None  # free it before the next dtype
        if args.device == "cuda":
            torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=1)
    return results


if __name__ == "__main__":
    main()
