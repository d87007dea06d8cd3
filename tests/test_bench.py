"""The benchmark scripts run (tiny model, CPU): they must not rot between GPU sessions."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from clip_triton import children

pytestmark = pytest.mark.integration

TINY_STEM = "clip-triton-tiny"

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture()
def seeded_bench(tmp_path, tiny_ir_export):
    """The test's --workdir, holding the suite's verified tiny export where the bench scripts look for
    one to reuse (bench/common.py prepared_export): each bench measures, instead of exporting again."""
    import shutil

    shutil.copytree(tiny_ir_export, tmp_path / f"onnx-{TINY_STEM}")
    return tmp_path


def test_pytorch_gpu_baseline_runs_on_cpu_with_a_tiny_model(tiny_config, tmp_path):
    out = tmp_path / "baseline.json"
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "pytorch_gpu_baseline.py"),
            "--model",
            str(tiny_config),
            "--device",
            "cpu",
            "--dtypes",
            "fp32",
            "--batches",
            "1,4",
            "--iters",
            "2",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert {(r["tower"], r["batch"]) for r in rows} == {("image", 1), ("image", 4), ("text", 1), ("text", 4)}
    assert all(r["items_per_s"] > 0 for r in rows)
    assert "items/s" in result.stdout


def test_side_by_side_bench_runs_every_row_at_both_precisions(tiny_config, tmp_path, seeded_bench):
    """bench/run.py end to end on the tiny model (short windows): every row of the table is measured,
    both precisions, in-process and through a real tritonserver."""
    result = children.run(
        [
            sys.executable,
            str(ROOT / "bench" / "run.py"),
            "--model",
            str(tiny_config),
            "--batches",
            "4",
            "--concurrency",
            "2",
            "--seconds",
            "0.3",
            "--client-items",
            "16",
            "--measurement-ms",
            "1000",
            "--cpu-runtimes",
            "onnxruntime:fp32,openvino:bf16",
            "--workdir",
            str(tmp_path),
            "--json",
            str(tmp_path / "run.json"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "x base: ratio" in result.stdout  # the printed table; its figures are read from the JSON
    rows = {}
    for row in json.loads((tmp_path / "run.json").read_text())["rows"]:
        rows[(row["path"], row["precision"])] = [
            row[k]
            for k in (
                "images_per_s",
                "x_base_images",
                "x_same_images",
                "texts_per_s",
                "x_base_texts",
                "x_same_texts",
                "p50_ms",
                "p99_ms",
            )
        ]
    for precision, engine in (("fp32", "onnxruntime"), ("bf16", "openvino")):
        for name in (
            "PyTorch eager in-process (batch 4/4)",
            f"{engine} in-process (batch 4/4)",
            f"Triton {engine}, perf_analyzer c2",
            f"Triton {engine}, ClipClient c2",
        ):
            cells = rows[(name, precision)]
            assert cells[0] > 0 and cells[3] > 0, (name, precision, cells)  # images/s, texts/s
    base, same = (
        rows[("PyTorch eager in-process (batch 4/4)", "fp32")],
        rows[("PyTorch eager in-process (batch 4/4)", "bf16")],
    )
    assert base[1] == base[2] == base[4] == base[5] == 1.0  # the baseline's own ratios
    assert same[2] == same[5] == 1.0 and abs(same[1] - same[0] / base[0]) <= 0.02 * same[1] + 0.01


def test_forward_bench_prints_every_runtime_with_its_fidelity(tiny_config, tmp_path, seeded_bench):
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "forward.py"),
            "--model",
            str(tiny_config),
            "--batch",
            "4",
            "--seconds",
            "0.3",
            "--workdir",
            str(tmp_path),
            "--json",
            str(tmp_path / "forward.json"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "runtime  " in result.stdout
    rows = {
        (row["runtime"], row["precision"]): [
            row["images_per_s"],
            row["image_cosine"],
            row["texts_per_s"],
            row["text_cosine"],
        ]
        for row in json.loads((tmp_path / "forward.json").read_text())["rows"]
    }
    assert set(rows) == {
        ("PyTorch eager", "fp32"),
        ("PyTorch eager, exported module", "fp32"),
        ("ONNX Runtime, exported graphs", "fp32"),
        ("OpenVINO, exported graphs", "fp32"),
        ("OpenVINO, exported graphs", "bf16"),
        ("OpenVINO, exported graphs, batch 4 only", "bf16"),
        ("OpenVINO, IR (export --openvino-ir)", "fp32"),
        ("OpenVINO, IR (export --openvino-ir)", "bf16"),
        ("PyTorch eager", "bf16"),
    }
    for (_, precision), (images, img_cos, texts, txt_cos) in rows.items():
        assert images > 0 and texts > 0
        assert min(img_cos, txt_cos) >= (0.99999 if precision == "fp32" else 0.999)
    summary = json.loads((tmp_path / "forward.json").read_text())
    flops, peak = summary["flops_per_item"], summary["gemm_peak_gflops"]
    assert flops["vision"] > 0 and flops["text"] > 0 and peak > 0
    exported = summary["exported_flops_per_item"]  # the last block for the pooled token only
    assert 0 < exported["vision"] < flops["vision"] and 0 < exported["text"] < flops["text"]
    for row in summary["rows"]:  # GFLOP/s is items/s times the tower's count
        assert row["image_gflops"] == pytest.approx(row["images_per_s"] * flops["vision"] / 1e9)
        assert row["text_gflops"] == pytest.approx(row["texts_per_s"] * flops["text"] / 1e9)
    assert "GFLOP/s" in result.stdout


def test_the_forward_bench_counts_attention_of_frozen_modules():
    """bench/forward.py's FLOP count includes nn.MultiheadAttention's projections. Frozen weights in
    eval mode (as load_model gives them) send it down the fused fast path that FlopCounterMode does
    not see: counted so, a ViT-B/32 image read 5.9 GFLOP instead of 8.7. The weights stay frozen."""
    import importlib.util

    import numpy as np
    import torch

    spec = importlib.util.spec_from_file_location("forward_bench", ROOT / "bench" / "forward.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    class SelfAttention(torch.nn.Module):
        def __init__(self, width: int, heads: int):
            super().__init__()
            self.attn = torch.nn.MultiheadAttention(width, heads, batch_first=True)

        def forward(self, x):
            return self.attn(x, x, x, need_weights=False)[0]

    width, tokens = 16, 5
    block = SelfAttention(width, 2).eval().requires_grad_(False)
    got = module.flops_per_item(block, np.zeros((3, tokens, width), np.float32))
    projections = 2 * tokens * 4 * width * width  # q, k, v and out: multiply-adds x 2 per item
    assert projections <= got <= projections + 2 * 2 * tokens * tokens * width  # + the score products, if counted
    assert not any(p.requires_grad for p in block.parameters())


def test_dirty_data_bench_runs_and_flagged_items_cost_no_extra_trips(tiny_config, tmp_path, seeded_bench):
    """bench/dirty.py end to end on the tiny model (small folder and list): every row measured, and
    dirty data costs no more than its clean version beyond noise (a generous bound: timing on a shared
    2-core machine; the per-item round-trip count is asserted in tests/test_client.py)."""
    out = tmp_path / "dirty.json"
    result = children.run(
        [
            sys.executable,
            str(ROOT / "bench" / "dirty.py"),
            "--model",
            str(tiny_config),
            "--images",
            "60",
            "--texts",
            "600",
            "--workdir",
            str(tmp_path),
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [r["case"].split(",")[0] for r in rows] == ["ClipClient", "ClipClient", "clip-triton embed"]
    assert all(r["clean_s"] > 0 and r["dirty_s"] > 0 for r in rows)
    assert all(r["ratio"] < 3 for r in rows), rows  # item-by-item re-sends made this 10x and more


def _bench(script: str, tiny_config, tmp_path, *args: str, timeout: int = 900) -> dict:
    return _run_bench(script, tiny_config, tmp_path, "--workdir", str(tmp_path), *args, timeout=timeout)[0]


def _run_bench(script: str, tiny_config, tmp_path, *args: str, timeout: int = 900) -> tuple[dict, str]:
    """``python bench/SCRIPT --model TINY ARGS --json OUT``: (its JSON report, its stdout)."""
    out = tmp_path / f"{script}.json"
    result = children.run(
        [sys.executable, str(ROOT / "bench" / script), "--model", str(tiny_config), *args, "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(out.read_text()), result.stdout


def test_text_lengths_bench_measures_every_workload_static_and_bucketed_with_parity(
    tiny_config, tmp_path, seeded_bench
):
    report = _bench(
        "text_lengths.py",
        tiny_config,
        tmp_path,
        "--texts",
        "32",
        "--seconds",
        "0.2",
        "--repeats",
        "1",
        "--lengths",
        "8,16,77",
    )
    assert report["buckets"] == [8, 16, 32, 77] and set(report["forward_by_length"]) == {"8", "16", "77"}
    rows = report["workloads"]
    assert set(rows) == {"short prompts", "templates x classes", "long captions"}
    for row in rows.values():
        assert min(row[k] for k in ("in_process_static", "in_process_bucketed", "served_static", "served_bucketed")) > 0
        assert row["min_cosine"] >= 0.99999 and row["max_abs_diff"] <= 1e-4  # vs encode_text over 77 tokens
    assert set(rows["long captions"]["requests_by_length"]) == {"77"}
    assert set(rows["short prompts"]["requests_by_length"]) <= {"8", "16"}


def test_response_cache_bench_hits_on_repeats_only(tiny_config, tmp_path, seeded_bench):
    # One request in flight: a repeat never overlaps its first copy (which would be a miss).
    report = _bench(
        "response_cache.py", tiny_config, tmp_path, "--prompts", "32", "--rounds", "3", "--concurrency", "1"
    )
    assert report["off"]["repeated prompts"]["hit_rate"] == 0.0  # no cache, no hit
    for cached in ("nested", "public"):  # the cache `clip-triton repo` writes, and the old layout
        assert report[cached]["repeated prompts"]["hit_rate"] == pytest.approx(2 / 3)  # rounds 2 and 3 of 3
        assert report[cached]["unique prompts"]["hit_rate"] == 0.0
    assert all(row["texts_per_s"] > 0 for side in ("off", "nested", "public") for row in report[side].values())


def test_peers_bench_measures_every_system_and_probes_truncation(tiny_config, tmp_path, seeded_bench):
    """bench/peers.py on the tiny model without infinity-emb (its own virtualenv, not in CI): every
    clip-triton row and the FastAPI + open_clip peer, every cell in each of two rounds with the idle
    servers paused (a paused server that did not come back would fail its next cell), medians of the
    rounds, paired ratios to the peer, and the long-text probe says that no system truncated."""
    from clip_triton.cpuruntime import cpu_supports_bf16, openvino_installed

    report = _bench(
        "peers.py", tiny_config, tmp_path, "--concurrency", "2", "--batches", "1,2", "--seconds", "0.4", "--rounds", "2"
    )
    systems = {row["system"] for row in report["rows"]}
    openvino = openvino_installed()  # the seeded export holds the IR
    runtimes = ["onnxruntime"] + (["openvino fp32"] if openvino else []) + (["openvino"] if cpu_supports_bf16() else [])
    expected = {f"clip-triton {kind}, {r}" for kind in ("gRPC", "gateway") for r in runtimes} | {
        "FastAPI + open_clip",
        "clip-triton gRPC, onnxruntime, buckets 8,12,16,24,32",  # the finer-bucket export's row
    }
    ordered = "clip-triton gRPC, onnxruntime, client grouping"  # group_by_length=True: texts only
    assert systems == expected | {ordered}
    assert report["rounds"] == 2 and not report["failed"]
    assert len(report["rows"]) == len(expected) * 3 * 2 + 2 * 2  # kinds x batches (one concurrency)
    assert {r["kind"] for r in report["rows"] if r["system"] == ordered} == {"text", "mixed"}
    for row in report["rows"]:
        assert "error" not in row and row["items_per_s"] > 0, row
        assert len(row["rounds"]) == 2 and min(row["rounds"]) <= row["items_per_s"] <= max(row["rounds"])
        assert row["long_text"] == "full"
    # every clip-triton row has its paired ratio to the one peer here: the median of the rounds' ratios
    rate = {(r["system"], r["kind"], r["batch"], r["concurrency"]): r["rounds"] for r in report["rows"]}
    clip_rows = [k for k in rate if k[0].startswith("clip-triton")]
    assert set(report["ratios"]) == {" | ".join(map(str, k)) for k in clip_rows}
    for key in clip_rows:
        ours, peer = rate[key], rate[("FastAPI + open_clip", *key[1:])]
        paired = sorted(a / b for a, b in zip(ours, peer, strict=True))
        got = report["ratios"][" | ".join(map(str, key))]
        assert got["median"] == pytest.approx(sum(paired) / 2) and got["min"] == pytest.approx(paired[0])


def test_the_infinity_peer_builds_its_tokenizer_from_our_vocabulary(tmp_path):
    """bench/peer_infinity.py runs in the peers' own venv (no ftfy, so no clip_triton.tokenizer): its
    vocabulary path and the BPE files it writes must still be ours."""
    import importlib.util

    from clip_triton.tokenizer import VOCAB_FILE, _load_vocab

    spec = importlib.util.spec_from_file_location("peer_infinity", ROOT / "bench" / "peer_infinity.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.VOCAB.name == VOCAB_FILE and module.VOCAB.is_file()
    module.tokenizer_files(tmp_path)
    vocab = json.loads((tmp_path / "vocab.json").read_text())
    encoder, _ = _load_vocab()
    assert vocab == {
        token.replace("<start_of_text>", "<|startoftext|>").replace("<end_of_text>", "<|endoftext|>"): i
        for token, i in encoder.items()
    }


def test_encodings_bench_measures_every_type_and_structure(tiny_config, tmp_path):
    """bench/encodings.py (docs/storage.md's tables) on the tiny model, small sizes: every type and
    every FAISS structure gets a row; float is exact by definition and int8 must stay close to it."""
    report, stdout = _run_bench(
        "encodings.py",
        tiny_config,
        tmp_path,
        *("--seed-items", "64", "--rows", "3000", "--queries", "40", "--ann", "--ann-rows", "12000"),
        timeout=600,
    )
    rows = {row["type"]: row for row in report["encodings"]}
    assert set(rows) >= {"float", "float16", "int8", "uint8", "binary", "ubinary"}
    columns = [c for c in rows["float"] if c not in ("type", "bytes/vector")]
    assert len(columns) == 4  # two corpora x two query sets
    assert all(rows["float"][c] == 1.0 and rows["float16"][c] > 0.95 for c in columns)
    assert rows["int8"]["bytes/vector"] == 32 and rows["ubinary"]["bytes/vector"] == 4  # the tiny model: D = 32
    structures = {(row["corpus"], row["structure"]) for row in report["ann"]}
    kinds = ("exact (every row)", "ivf (auto)", "hnsw")
    assert structures == {(c, s) for c in ("gaussian", "clustered") for s in kinds}
    assert all(0 <= row["recall@10, text->image"] <= 1 for row in report["ann"])
    assert "recall@10 vs float32 exact search" in stdout


def test_image_path_bench_splits_a_request_by_stage(tiny_config, tmp_path, seeded_bench):
    """bench/image_path.py (issue 33's profile of 16-image requests) on the tiny model: every set-up
    gets a row, Triton's own statistics split each request into preprocess and encoder time, and the
    parts never exceed the whole."""
    report = _bench("image_path.py", tiny_config, tmp_path, "--seconds", "1", "--concurrency", "2")
    assert report["floor"]["preprocess_s"] > 0 and report["floor"]["forward_s"] > 0
    setups = [row["setup"] for row in report["rows"]]
    assert setups[0].startswith("default") and "2 encoders x 1 thread" in setups and len(set(setups)) == len(setups)
    for row in report["rows"]:
        assert row["images_per_s"] > 0 and row["preprocess_ms"] > 0 and row["encoder_ms"] > 0
        assert row["preprocess_ms"] + row["encoder_ms"] <= row["request_ms"]
        assert 1 <= row["images_per_execution"] <= 32  # the batcher may merge two requests of 16


def test_raw_split_bench_measures_the_server_side_split_exactly(tiny_config, tmp_path, seeded_bench):
    """bench/raw_split.py (issue 33, raw clients) on the tiny model: the served split and the bench's
    model of the design before (one length per request) answer every mixed-length request alike, and
    every row is measured."""
    report = _bench("raw_split.py", tiny_config, tmp_path, "--seconds", "0.5", "--concurrency", "2")
    assert report["max_abs_diff"] <= 1e-5
    assert {row["workload"] for row in report["rows"]} == {"16 mixed", "16 prompts", "1 mixed"}
    assert all(row[name] > 0 for row in report["rows"] for name in ("unsplit", "clip_text", "ClipClient"))


def test_the_peers_pauser_stops_every_group_but_the_measured_one_and_resumes_all(tmp_path):
    """bench/peers.py's Pauser: idle servers are stopped (state T) while another is measured, the
    measured one runs, and resume_all leaves none stopped (a stopped server could not stop)."""
    import importlib.util

    from clip_triton.children import spawn

    spec = importlib.util.spec_from_file_location("peers_bench", ROOT / "bench" / "peers.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["peers_bench"] = module  # its dataclasses look their module up
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules["peers_bench"]

    def stopped(pid: int) -> bool:  # state T; a resumed one is S or, for a moment, R
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T"

    procs = [spawn(["sleep", "60"], start_new_session=True) for _ in range(3)]
    try:
        groups = [p.pid for p in procs]
        pauser = module.Pauser(groups, enabled=True)
        pauser.only((groups[0],))
        assert [stopped(g) for g in groups] == [False, True, True]
        pauser.only((groups[1], groups[2]))
        assert [stopped(g) for g in groups] == [True, False, False]
        pauser.resume_all()
        assert not any(stopped(g) for g in groups) and not pauser.stopped
        module.Pauser(groups, enabled=False).only((groups[0],))  # --no-pause-idle: nobody stopped
        assert not any(stopped(g) for g in groups)
        pauser.close()
        assert pauser.guard is None
    finally:
        for p in procs:
            p.kill()
            p.wait()


@pytest.mark.parametrize("death", ["SIGKILL", "SIGTERM"])
def test_servers_paused_by_a_bench_that_dies_are_resumed(tmp_path, death):
    """A paused server's processes run no code, so they cannot notice that the bench, and so their
    server, is gone: after a killed CI run, python stubs stayed stopped (state T) under init for good.
    Killed with SIGKILL, the bench's guard resumes them; with SIGTERM, the bench resumes them on its way
    out. Stand-ins: process groups of two sleeps each, whose leader dies with the bench (as tritonserver
    does, by its death signal) while the second sleep, like a stub, stays."""
    script = tmp_path / "bench.py"
    script.write_text(
        f"""
import importlib.util, os, signal, subprocess, sys, time
sys.path.insert(0, {str(ROOT)!r})
spec = importlib.util.spec_from_file_location("peers_bench", {str(ROOT / "bench" / "peers.py")!r})
module = importlib.util.module_from_spec(spec)
sys.modules["peers_bench"] = module
spec.loader.exec_module(module)
from clip_triton.children import spawn
module.exit_on_signals()
leaders = [spawn(["sh", "-c", "sleep 120 & echo $!; wait"], start_new_session=True, stdout=subprocess.PIPE, text=True)
           for _ in range(2)]
stubs = [int(p.stdout.readline()) for p in leaders]
pauser = module.Pauser([p.pid for p in leaders], enabled=True)
try:
    pauser.only(())
    print(*stubs, flush=True)
    time.sleep(120)
finally:
    pauser.close()
"""
    )
    bench = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    stubs: list[int] = []
    try:
        stubs = [int(pid) for pid in bench.stdout.readline().split()]
        assert len(stubs) == 2

        def state(pid: int) -> str:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]

        assert [state(pid) for pid in stubs] == ["T", "T"]  # paused, as idle servers are
        bench.send_signal(getattr(signal, death))
        bench.wait(30)
        deadline = time.monotonic() + 30
        while any(state(pid) == "T" for pid in stubs) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(state(pid) == "T" for pid in stubs), "a stub of a dead bench stayed stopped"
    finally:
        if bench.poll() is None:
            bench.kill()
            bench.wait()
        for pid in stubs:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
                os.kill(pid, signal.SIGKILL)
