"""Opt-in full-size check: ViT-bigG-14 (random weights) exported on a CPU machine, both towers in one
command, with verification. Run: python -m pytest --run-slow tests/test_bigg_slow.py -s
(about 6 minutes and 11 GiB of memory on 2 cores; ~10 GB of disk for the graphs)."""

import json
import os
import resource
import subprocess
import sys
import time

import pytest

PEAK_RSS_LIMIT_GIB = 12.0


@pytest.mark.slow
def test_bigG_exports_both_towers_within_memory(tmp_path):
    out = tmp_path / "bigG"
    started = time.monotonic()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "clip_triton.cli",
            "export",
            "--model",
            "ViT-bigG-14",
            "--pretrained",
            "none",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        env=dict(os.environ),
    )
    seconds = time.monotonic() - started
    assert result.returncode == 0, result.stderr[-3000:]
    # ru_maxrss of children: the largest single process of the export (the torch stage or ORT stage).
    peak_gib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024**2
    manifest = json.loads((out / "manifest.json").read_text())
    sizes = {p.name: p.stat().st_size for p in out.iterdir()}
    checks = manifest["verification"]["checks"]
    print(
        f"\nViT-bigG-14 export: {seconds:.0f} s, peak RSS {peak_gib:.2f} GiB "
        f"(export process {manifest['peak_rss_gib']['export_process']} GiB, "
        f"verification process {manifest['peak_rss_gib']['verification_process']} GiB)"
    )
    for name, size in sorted(sizes.items()):
        print(f"  {name:<20}{size / 1024**3:10.2f} GiB")
    print(result.stdout)
    assert manifest["verification"]["passed"]
    assert min(c["min_cosine"] for c in checks) >= 0.99999
    assert max(c["max_abs_diff"] for c in checks) <= 1e-4
    assert manifest["embed_dim"] == 1280
    assert {"text.onnx.data", "vision.onnx.data"} <= set(sizes)  # both towers exceed protobuf's 2 GB
    assert peak_gib <= PEAK_RSS_LIMIT_GIB
