"""The benchmark scripts run (tiny model, CPU): they must not rot between GPU sessions."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_pytorch_gpu_baseline_runs_on_cpu_with_a_tiny_model(tiny_config, tmp_path):
    out = tmp_path / "baseline.json"
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "pytorch_gpu_baseline.py"), "--model", str(tiny_config),
                             "--device", "cpu", "--dtypes", "fp32", "--batches", "1,4", "--iters", "2",
                             "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert {(r["tower"], r["batch"]) for r in rows} == {("image", 1), ("image", 4), ("text", 1), ("text", 4)}
    assert all(r["items_per_s"] > 0 for r in rows)
    assert "items/s" in result.stdout


def test_bigG_flop_figures_are_the_issue_figures():
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import pytorch_gpu_baseline
    finally:
        sys.path.pop(0)
    assert pytorch_gpu_baseline.GFLOP["ViT-bigG-14"] == {"image": 967.5, "text": 97.9}
