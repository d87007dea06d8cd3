"""Forward passes only (no decoding, no tokenizing), each runtime on the same inputs, one run:

    python bench/forward.py [--model ViT-B-32] [--batch 32]

Rows: PyTorch eager fp32 and bf16 (``model.to(torch.bfloat16)``), PyTorch eager fp32 on the module
the export writes (``export_module``: its last block for the pooled token only), ONNX Runtime fp32 on the exported
graphs, OpenVINO fp32 and bf16 on the same graphs (dynamic batch, as served), OpenVINO bf16 compiled
for this one batch size, and OpenVINO fp32 and bf16 on the IR that ``export --openvino-ir`` writes
(the module converted with ``openvino.convert_model``, dynamic axes, run by the serving code's
``OpenVINOSession``): together they separate what the ONNX route costs OpenVINO from what dynamic
shapes cost it. Each row also prints its cosine to PyTorch fp32, so a fast row that is wrong cannot
hide. Text runs at all 77 tokens (the longest bucket).

Each row also says how hard it works the CPU: GFLOP/s (the tower's multiply-adds per item, counted by
``torch.utils.flop_counter`` on the PyTorch module, times items/s) and that rate as a share of the
best fp32 matrix multiply this machine reaches (a 2048-square GEMM through PyTorch and NumPy,
measured in the same run). The work counted is open_clip's forward for every row; the exported graphs
do ~7% less of it (ViT-B/32: the last block's query, output projection and MLP for the pooled token
only, the same embeddings), so their share can pass what the runtime itself reaches. An fp32 row near
100% has nothing left to gain from a faster runtime at equal work; only less arithmetic goes further.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def rate(fn, batch: int, seconds: float) -> float:
    fn()  # warm-up
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or done < 3:
        fn()
        done += 1
    return done * batch / (time.perf_counter() - start)


def flops_per_item(module, example) -> float:
    """Floating-point operations of one forward of ``module`` per item of ``example``'s batch.

    Counted with gradients on (the weights marked for a moment): without them ``nn.MultiheadAttention``
    takes its fused fast path, which ``FlopCounterMode`` does not see (ViT-B/32 would read 5.9 GFLOP
    per image, not 8.8: its attention left out)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    frozen = [p for p in module.parameters() if not p.requires_grad]
    try:
        for p in frozen:
            p.requires_grad_(True)
        with torch.enable_grad(), FlopCounterMode(display=False) as counter:
            module(torch.from_numpy(example))
    finally:
        for p in frozen:
            p.requires_grad_(False)
    return counter.get_total_flops() / len(example)


def gemm_peak(seconds: float = 3.0, size: int = 2048) -> float:
    """The best fp32 GEMM rate (GFLOP/s) of this machine's cores: PyTorch's and NumPy's BLAS."""
    import torch

    a = np.random.default_rng(1).random((size, size), dtype=np.float32)
    t = torch.from_numpy(a)
    best = max(rate(lambda: a @ a, 1, seconds), rate(lambda: t @ t, 1, seconds))
    return best * 2 * size**3 / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--workdir", default=".clip-triton/bench")
    parser.add_argument("--json", default=None, help="also write the table's rows to this file")
    args = parser.parse_args()

    import torch
    from common import prepared_export  # bench/common.py

    from clip_triton.contract import TEXT, TOWERS, VISION
    from clip_triton.cpuruntime import OpenVINOSession, cpu_supports_bf16
    from clip_triton.export.graphs import export_module, tower_module
    from clip_triton.export.weights import load_model
    from clip_triton.fidelity import cosine
    from clip_triton.ortutil import make_session

    onnx_dir = prepared_export(args.model, args.workdir)
    loaded = load_model(args.model, "none")
    model, contract = loaded.model.eval(), loaded.contract
    rng = np.random.default_rng(0)
    pixels = rng.standard_normal((args.batch, *contract.pixels.shape)).astype(np.float32)
    tok = contract.tokenizer
    ids = rng.integers(1, tok.sot_token_id, size=(args.batch, tok.context_length)).astype(np.int32)
    ids[:, 0], ids[:, -1] = tok.sot_token_id, tok.eot_token_id
    inputs = {VISION.name: (contract.pixels.name, pixels), TEXT.name: (contract.input_ids.name, ids)}
    rows, reference = [], {}
    towers = {tower.name: tower_module(model, tower.name) for tower in TOWERS}
    exported = {tower.name: export_module(model, contract, tower.name) for tower in TOWERS}
    flops = {name: flops_per_item(towers[name], inputs[name][1][:2]) for name in towers}
    exported_flops = {name: flops_per_item(exported[name], inputs[name][1][:2]) for name in exported}
    peak = gemm_peak()
    print(
        f"[forward] {flops[VISION.name] / 1e9:.2f} GFLOP per image, {flops[TEXT.name] / 1e9:.2f} per text "
        f"(the exported graphs: {exported_flops[VISION.name] / 1e9:.2f} and {exported_flops[TEXT.name] / 1e9:.2f}); "
        f"best fp32 GEMM here: {peak:.0f} GFLOP/s",
        flush=True,
    )

    def measure(name: str, precision: str, run) -> None:
        cells = []
        for tower in (VISION.name, TEXT.name):
            out = np.asarray(run(tower), dtype=np.float32)
            reference.setdefault(tower, out)
            speed = rate(lambda t=tower: run(t), args.batch, args.seconds)
            cells += [speed, float(cosine(out, reference[tower]).min())]
        rows.append((name, precision, *cells))
        print(f"[forward] {name} ({precision}): {cells[0]:.1f} images/s, {cells[2]:.1f} texts/s", flush=True)

    with torch.inference_mode():
        measure("PyTorch eager", "fp32", lambda t: towers[t](torch.from_numpy(inputs[t][1])).numpy())
        measure("PyTorch eager, exported module", "fp32", lambda t: exported[t](torch.from_numpy(inputs[t][1])).numpy())

    sessions = {t.name: make_session(onnx_dir / t.onnx_file) for t in TOWERS}
    measure("ONNX Runtime, exported graphs", "fp32", lambda t: sessions[t].run(None, dict([inputs[t]]))[0])
    for precision in ("fp32", "bf16"):
        sessions = {t.name: OpenVINOSession(onnx_dir / t.onnx_file, precision) for t in TOWERS}
        measure("OpenVINO, exported graphs", precision, lambda t, s=sessions: s[t].run(None, dict([inputs[t]]))[0])
    sessions = {t.name: OpenVINOSession(onnx_dir / t.onnx_file, "bf16", static_batch=args.batch) for t in TOWERS}
    measure(
        f"OpenVINO, exported graphs, batch {args.batch} only",
        "bf16",
        lambda t, s=sessions: s[t].run(None, dict([inputs[t]]))[0],
    )
    sessions = None

    import tempfile

    from clip_triton.export.graphs import export_openvino_ir

    with tempfile.TemporaryDirectory(prefix="clip-triton-ir-") as folder:
        for tower in TOWERS:  # exactly what `export --openvino-ir` writes, then what serving loads
            export_openvino_ir(model, contract, tower.name, Path(folder))
        for precision in ("fp32", "bf16"):
            sessions = {t.name: OpenVINOSession(Path(folder) / t.ir_file, precision) for t in TOWERS}
            measure(
                "OpenVINO, IR (export --openvino-ir)",
                precision,
                lambda t, s=sessions: s[t].run(None, dict([inputs[t]]))[0],
            )
        sessions = None

    model.to(torch.bfloat16)  # last: it rounds the weights
    with torch.inference_mode():
        measure(
            "PyTorch eager",
            "bf16",
            lambda t: towers[t](
                torch.from_numpy(inputs[t][1]).to(torch.bfloat16 if t == VISION.name else torch.int32)
            ).numpy(),
        )

    print(
        f"\n{args.model}, batch {args.batch}, random inputs; {__import__('os').cpu_count()} CPU cores, "
        f"native bf16: {'yes' if cpu_supports_bf16() else 'no'}; cosine: minimum over the batch vs PyTorch fp32"
    )
    print(
        f"GFLOP per item: image {flops[VISION.name] / 1e9:.2f}, text (77 tokens) {flops[TEXT.name] / 1e9:.2f} "
        f"(open_clip's forward: every row's GFLOP/s counts this work delivered; the exported module and graphs "
        f"do {exported_flops[VISION.name] / 1e9:.2f} and {exported_flops[TEXT.name] / 1e9:.2f}, their last "
        f"block for the pooled token only); best fp32 GEMM on this machine: {peak:.0f} GFLOP/s "
        "(% = the row's GFLOP/s as a share of it)"
    )
    print(
        f"{'runtime':<40}{'prec':>5}{'images/s':>10}{'GFLOP/s':>9}{'%':>5}{'cosine':>9}"
        f"{'texts/s':>9}{'GFLOP/s':>9}{'%':>5}{'cosine':>9}"
    )
    table = []
    for name, precision, img, img_cos, txt, txt_cos in rows:
        img_gf, txt_gf = img * flops[VISION.name] / 1e9, txt * flops[TEXT.name] / 1e9
        print(
            f"{name:<40}{precision:>5}{img:>10.1f}{img_gf:>9.0f}{100 * img_gf / peak:>5.0f}{img_cos:>9.5f}"
            f"{txt:>9.1f}{txt_gf:>9.0f}{100 * txt_gf / peak:>5.0f}{txt_cos:>9.5f}"
        )
        table.append(
            {
                "runtime": name,
                "precision": precision,
                "images_per_s": img,
                "image_gflops": img_gf,
                "image_cosine": img_cos,
                "texts_per_s": txt,
                "text_gflops": txt_gf,
                "text_cosine": txt_cos,
            }
        )
    if args.json:
        summary = {
            "model": args.model,
            "gemm_peak_gflops": peak,
            "flops_per_item": flops,
            "exported_flops_per_item": exported_flops,
            "rows": table,
        }
        Path(args.json).write_text(json.dumps(summary, indent=1) + "\n")


if __name__ == "__main__":
    main()
