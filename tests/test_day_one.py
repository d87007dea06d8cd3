"""A user's first hour (issue 14): the everyday commands on real folders, on a CPU, under Ctrl-C, and
every mistake ending in one clear line. Real tritonserver, real client, real files."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageEnhance

from clip_triton import children

from .helpers import IMAGES, TINY_CONFIG, cos, run_cli

CLI = [sys.executable, "-m", "clip_triton.cli"]


def cli(*args, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    return children.run(
        [*CLI, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def one_line_error(result: subprocess.CompletedProcess, code: int = 2) -> str:
    """The result is a user error: exit ``code``, one line on stderr starting "error:", no traceback."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == code, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory) -> Path:
    """300 camera-sized JPEGs (1024x768), each a different variation of the bundled photographs."""
    folder = tmp_path_factory.mktemp("photos300")
    sources = [Image.open(p).convert("RGB").resize((1024, 768)) for p in sorted(IMAGES.glob("*.jpg"))]
    for i in range(300):
        image = ImageEnhance.Brightness(sources[i % len(sources)]).enhance(0.7 + (i % 13) * 0.05)
        image = image.rotate((i // len(sources)) % 9 - 4)
        image.save(folder / f"IMG_{i:04d}.jpg", quality=85)
    return folder


# -- bulk work -----------------------------------------------------------------------------------
def test_300_photos_embed_with_defaults(triton, photo_folder, tmp_path, reference_model):
    """With every default (auto deadlines, 4 requests in flight, the server's batch), a 300-photo folder
    is embedded in full, and the rows are open_clip's."""
    from .helpers import open_clip_reference_for

    result = cli("embed", "--images", photo_folder, "--out", tmp_path / "photos", "--url", triton.grpc_url)
    assert result.returncode == 0, result.stderr
    index = json.loads((tmp_path / "photos.json").read_text())
    rows = np.load(tmp_path / "photos.npy")
    assert rows.shape == (300, 32) and len(index["items"]) == 300 and not index["failed"]
    sample = [0, 77, 150, 299]
    reference = open_clip_reference_for(TINY_CONFIG, reference_model).images(
        [Path(index["items"][i]).read_bytes() for i in sample]
    )
    assert cos(rows[sample], reference).min() >= 0.9999


def test_a_deadline_error_says_deadline_and_names_the_flags(triton, photo_folder, tmp_path):
    """A missed deadline said "Deadline Exceeded (is the server up? check --url)": it blamed the server.
    Now it says deadline, what was in flight, and which flags to change; the rows answered are kept."""
    from clip_triton.client import ClipClient, DeadlineExceeded, JobFailed

    result = cli(
        "embed",
        "--images",
        photo_folder,
        "--out",
        tmp_path / "x",
        "--url",
        triton.grpc_url,
        "--timeout",
        "0.00001",  # 10 us: no request of 64 photos round-trips in that, on any machine
        "--batch-size",
        "64",
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    error = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "missed its" in error[0] and "deadline" in error[0]
    assert "--timeout" in error[0] and "--batch-size" in error[0] and "server up" not in error[0]
    assert json.loads((tmp_path / "x.json").read_text())["unanswered"]

    with ClipClient(triton.grpc_url, timeout=0.00001) as client, pytest.raises(JobFailed) as failed:
        client.embed_images(sorted(photo_folder.glob("*.jpg"))[:128])
    assert isinstance(failed.value.cause, DeadlineExceeded) and "busy, not down" in failed.value.hint


def test_automatic_deadlines_scale_with_the_work_in_flight():
    """The auto deadline grows with the items ahead of a request and the server's measured speed; a
    fixed --timeout stays fixed."""
    from clip_triton.client.core import (
        AUTO_DEADLINE_FLOOR_S,
        DEADLINE_SAFETY,
        FIRST_SECONDS_PER_ITEM,
        DeadlinePolicy,
    )

    now = [100.0]
    auto = DeadlinePolicy(None, clock=lambda: now[0])
    assert auto.deadline(64) == max(AUTO_DEADLINE_FLOOR_S, DEADLINE_SAFETY * FIRST_SECONDS_PER_ITEM * 64)
    now[0] += 40.0
    auto.answered(64)  # the first request: 64 items in 40 s -> 0.625 s per item
    assert auto.seconds_per_item() == pytest.approx(0.625)
    assert auto.deadline(256) == pytest.approx(DEADLINE_SAFETY * 0.625 * 256)  # 4 x 64 in flight: 640 s
    assert auto.deadline(1) == AUTO_DEADLINE_FLOOR_S
    assert DeadlinePolicy(5.0).deadline(10_000) == 5.0
    with pytest.raises(ValueError):
        DeadlinePolicy(0)


def test_ctrl_c_during_embed_writes_what_was_answered_and_a_rerun_finishes(triton, photo_folder, tmp_path):
    """Ctrl-C took 174 s and wrote nothing. Now queued work is dropped and in-flight requests are
    cancelled at once: the command says "interrupted", writes the rows answered with their items,
    exits 130; the same command again embeds only the rest."""
    from clip_triton.health import completed_requests

    out = tmp_path / "photos"
    command = [
        *CLI,
        "embed",
        "--images",
        str(photo_folder),
        "--out",
        str(out),
        "--url",
        triton.grpc_url,
        "--batch-size",
        "2",
        "--concurrency",
        "2",
    ]
    before = completed_requests(triton.metrics_url) or 0
    process = children.spawn(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while (completed_requests(triton.metrics_url) or 0) - before < 12 and time.monotonic() < deadline:
            assert process.poll() is None, process.communicate()
            time.sleep(0.02)
        process.send_signal(signal.SIGINT)
        at_sigint = completed_requests(triton.metrics_url, models=("clip_image",)) or 0
        sent = time.monotonic()
        stdout, stderr = process.communicate(timeout=300)  # a hang fails here
        took = time.monotonic() - sent
    finally:
        process.kill()
    after = (completed_requests(triton.metrics_url, models=("clip_image",)) or 0) - at_sigint
    print(f"embed exited {took:.2f} s after SIGINT; {after} requests completed after it")
    assert process.returncode == 130, stdout + stderr
    assert "interrupted" in stderr and "rerun" in stderr and "Traceback" not in stderr
    # Events, not the clock: nothing queued is sent after Ctrl-C, and in-flight requests are cancelled,
    # so at most the two in flight (--concurrency 2) complete after it (the old code went on for 174 s).
    assert after <= 2, after
    partial = json.loads(out.with_suffix(".json").read_text())
    assert 0 < len(partial["items"]) < 300 and partial["interrupted"] is True
    assert np.load(out.with_suffix(".npy")).shape == (len(partial["items"]), 32)

    again = cli(*command[len(CLI) :])
    assert again.returncode == 0, again.stderr
    assert f"resuming {out.with_suffix('.npy')}: {len(partial['items'])} of 300" in again.stderr
    done = json.loads(out.with_suffix(".json").read_text())
    rows = np.load(out.with_suffix(".npy"))
    assert len(done["items"]) == 300 and rows.shape == (300, 32) and not done["interrupted"]
    assert done["items"] == sorted(str(p) for p in photo_folder.glob("*.jpg"))
    fresh = cli("embed", "--images", photo_folder, "--out", tmp_path / "fresh", "--url", triton.grpc_url)
    assert fresh.returncode == 0 and np.abs(np.load(tmp_path / "fresh.npy") - rows).max() < 1e-6


def test_ctrl_c_in_the_python_api_keeps_the_rows_answered(triton, photo_folder):
    """The same through the API: a KeyboardInterrupt mid-job comes out as JobInterrupted (itself a
    KeyboardInterrupt) carrying every row answered, within moments."""
    import _thread
    import threading

    from clip_triton.client import ClipClient, JobInterrupted
    from clip_triton.health import completed_requests

    paths = sorted(photo_folder.glob("*.jpg"))
    before = completed_requests(triton.metrics_url) or 0

    def interrupt_after_some_answers():
        deadline = time.monotonic() + 300
        while (completed_requests(triton.metrics_url) or 0) - before < 12 and time.monotonic() < deadline:
            time.sleep(0.02)
        _thread.interrupt_main()  # what Ctrl-C does to the main thread

    with ClipClient(triton.grpc_url, batch_size=2, concurrency=2) as client:
        client.facts  # noqa: B018 (read before the clock starts)
        threading.Thread(target=interrupt_after_some_answers, daemon=True).start()
        with pytest.raises(JobInterrupted) as stopped:
            client.embed_images(paths)
        assert isinstance(stopped.value, KeyboardInterrupt)
        answered = stopped.value.answered
        assert 0 < len(answered) < 300
        rows = stopped.value.embeddings
        assert not np.isnan(rows[answered]).any()
        assert np.isnan(np.delete(rows, answered, axis=0)).all()
        again = client.embed_images([paths[i] for i in answered[:4]])  # the client still works
    assert np.abs(again - rows[answered[:4]]).max() < 1e-6


def test_progress_bar_on_stderr_with_rate_and_eta(triton, photo_folder, tmp_path):
    """--progress forces the bar (by default it shows only on a terminal); it goes to stderr, never into
    the output that scripts parse."""
    result = cli("embed", "--images", photo_folder, "--out", tmp_path / "p", "--url", triton.grpc_url, "--progress")
    assert result.returncode == 0
    bar = result.stderr.replace("\r", "\n").splitlines()
    final = [line for line in bar if line.startswith("embedding images: 100%")]
    assert final and "300/300" in final[-1] and "image/s" in final[-1], result.stderr
    assert "embedding" not in result.stdout
    quiet = cli("embed", "--images", photo_folder, "--out", tmp_path / "q", "--url", triton.grpc_url, "--force")
    assert "embedding images" not in quiet.stderr  # not a terminal: no bar by default


# -- one-line errors -----------------------------------------------------------------------------
def test_a_texts_file_that_is_not_utf8(tmp_path):
    """Checked before any server is dialled: no server is needed to be told (issue 29)."""
    path = tmp_path / "latin1.txt"
    path.write_bytes("caf\u00e9 au lait\n".encode("latin-1"))
    line = one_line_error(run_cli("embed", "--texts", path, "--out", tmp_path / "t", "--url", "127.0.0.1:9"))
    assert "not UTF-8" in line and "line 1" in line and "iconv" in line


def test_eval_mistakes(tmp_path, photos):
    dead = ("--url", "127.0.0.1:9")  # every mistake is found before any server is dialled
    flat = tmp_path / "flat"
    flat.mkdir()
    (flat / "cat.jpg").write_bytes(photos["cat"])
    line = one_line_error(run_cli("eval", flat, *dead))
    assert "no class sub-folders" in line and "ROOT/CLASS/IMAGE" in line
    three = tmp_path / "three"
    for name in ("cat", "coffee", "rocket"):
        (three / name).mkdir(parents=True)
        (three / name / "1.jpg").write_bytes(photos[name])
    line = one_line_error(run_cli("eval", three, "--classnames", "imagenet", *dead))
    assert "1000 names" in line and "3 class folders" in line
    line = one_line_error(run_cli("eval", three, "--classnames", "a,b", *dead))
    assert "2 comma-separated names" in line
    line = one_line_error(run_cli("eval", three, "--templates", "nosuchfile", *dead))
    assert "neither openai, simple, none nor a file" in line


# A client-only install lacks torch; a serving install lacks fastapi. This machine has both, so the
# absence is reproduced exactly as Python reports it: a meta-path finder refuses those imports.
BLOCK = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {blocked!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
sys.meta_path.insert(0, Block())
from clip_triton.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.integration  # the CLI as a user runs it
def test_nothing_listening_fails_in_seconds_and_inputs_are_checked_before_dialling(tmp_path):
    """With no server at --url, `classify` waited 120 s before saying so; now it says within seconds
    (--connect-timeout, 10 s) which address and how to start one. `eval` on a flat folder waited the
    same 120 s before looking at the folder; now the folder is refused before any connection."""
    from clip_triton.server import free_port

    url = f"127.0.0.1:{free_port()}"
    started = time.monotonic()
    result = cli("classify", IMAGES / "cat.jpg", "--prompts", "a cat", "a dog", "--url", url)
    took = time.monotonic() - started
    error = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and len(error) == 1, result.stderr
    assert f"nothing answers at {url}" in error[0] and "clip-triton serve --repo REPO" in error[0]
    assert took < 100, took  # the connect timeout (10 s), not the 120 s --ready-timeout
    flat = tmp_path / "flat"
    flat.mkdir()
    (flat / "cat.jpg").write_bytes((IMAGES / "cat.jpg").read_bytes())
    line = one_line_error(cli("eval", flat, "--url", url))
    assert "has no class sub-folders" in line


@pytest.mark.parametrize(
    "blocked, args, extra",
    [
        (
            {"torch", "open_clip"},
            ["export", "--model", "ViT-B-32", "--pretrained", "none", "--onnx-dir", "{tmp}/x"],
            "export",
        ),
        ({"fastapi"}, ["gateway", "--no-auth"], "gateway"),
        ({"tritonclient"}, ["classify", str(IMAGES / "cat.jpg"), "--prompts", "a"], "client"),
    ],
)
@pytest.mark.integration  # a fresh interpreter whose imports of the extra fail
def test_a_missing_extra_is_named(tmp_path, blocked, args, extra):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    result = subprocess.run(
        [sys.executable, "-c", BLOCK.format(blocked=blocked), *args], capture_output=True, text=True, timeout=300
    )
    line = one_line_error(result)
    assert f"pip install 'clip-triton[{extra}]'" in line and "not installed" in line


@pytest.mark.integration  # huggingface_hub reads HF_HUB_OFFLINE when it is imported: a fresh interpreter
def test_export_with_a_tag_offline_fails_fast_and_whole(tmp_path):
    """Offline, `--pretrained TAG` spent 57 s in hub retries and cut its message mid-word. It now checks
    the cache, then whether the hub is reachable, and names every way forward (HF_HUB_OFFLINE too)."""
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": ""}
    started = time.monotonic()
    result = cli(
        "export", "--model", "ViT-B-32", "--pretrained", "laion2b_s34b_b79k", "--onnx-dir", tmp_path / "b32", env=env
    )
    took = time.monotonic() - started
    line = one_line_error(result)
    print(f"offline export failed after {took:.1f} s")
    assert "cannot reach" in line and "HF_HUB_OFFLINE=1" in line and "--pretrained none" in line
    assert line.endswith("random weights)")  # whole, not cut at 200 characters
    assert not (tmp_path / "b32").exists() and not list(tmp_path.glob(".b32.partial-*"))
    line = one_line_error(
        cli(
            "export",
            "--model",
            "ViT-B-32",
            "--pretrained",
            "laion2b_s34b_b79k",
            "--onnx-dir",
            tmp_path / "b32",
            env={**env, "HF_HUB_OFFLINE": "1"},
        )
    )
    assert "not in the Hugging Face cache and HF_HUB_OFFLINE is set" in line


def test_export_refuses_to_overwrite_and_an_interrupted_one_leaves_nothing(tiny_export, tmp_path):
    existing = tmp_path / "onnx"
    existing.mkdir()
    (existing / "manifest.json").write_text("{}")
    line = one_line_error(cli("export", "--model", TINY_CONFIG, "--pretrained", "none", "--onnx-dir", existing))
    assert "already holds an export" in line and "--force" in line

    out = tmp_path / "fresh"
    process = children.spawn(
        [*CLI, "export", "--model", str(TINY_CONFIG), "--pretrained", "none", "--onnx-dir", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 300
        while not list(tmp_path.glob(".fresh.partial-*/text.onnx")) and time.monotonic() < deadline:
            assert process.poll() is None, process.communicate()
            time.sleep(0.05)
        process.send_signal(signal.SIGINT)  # mid-export: the text graph is written, the rest is not
        _, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 130 and "interrupted" in stderr
    assert not out.exists() and not list(tmp_path.glob(".fresh.*"))  # no half-written folder anywhere

    result = cli("export", "--model", TINY_CONFIG, "--pretrained", "none", "--onnx-dir", out, "--verify-batches", "1")
    assert result.returncode == 0, result.stderr
    assert json.loads((out / "manifest.json").read_text())["verification"]["passed"] is True
    reused = cli("export", "--model", TINY_CONFIG, "--pretrained", "none", "--onnx-dir", out, "--reuse")
    assert reused.returncode == 0 and "reusing the verified export" in reused.stderr  # compose/k8s jobs rerun
    from clip_triton.export.pipeline import current_export

    assert current_export(out, str(TINY_CONFIG), "none") is not None
    assert current_export(out, str(TINY_CONFIG), "none", seed=1) is None  # other weights: replaced by --reuse
    assert current_export(out, str(TINY_CONFIG), "none", precision="fp16") is None
    manifest = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps({**manifest, "format": 1}))  # graphs without NaN refusals
    assert current_export(out, str(TINY_CONFIG), "none") is None
    assert all(graph["pooled_last_block"] for graph in manifest["graphs"].values())  # open_clip's ViT and text
    unpooled = {
        name: {k: v for k, v in graph.items() if k != "pooled_last_block"} for name, graph in manifest["graphs"].items()
    }
    (out / "manifest.json").write_text(
        json.dumps({**manifest, "graphs": unpooled})
    )  # graphs of every token's last block
    assert current_export(out, str(TINY_CONFIG), "none") is None
    (out / "manifest.json").write_text(json.dumps(manifest))
    replaced = cli(
        "export", "--model", TINY_CONFIG, "--pretrained", "none", "--onnx-dir", out, "--force", "--no-verify"
    )
    assert (
        replaced.returncode == 0
        and json.loads((out / "manifest.json").read_text())["verification"]["performed"] is False
        and not list(tmp_path.glob(".fresh.*"))
    )


@pytest.mark.parametrize(
    "args, says",
    [
        (["repo", "--runtime", "tensorrt", "--cpu-runtime", "openvino", "--repo", "{tmp}/r"], "needs --runtime python"),
        (["repo", "--runtime", "tensorrt", "--encoder-threads", "4", "--repo", "{tmp}/r"], "CPU encoders"),
        (["export", "--pretrained", "laion2b_s39b_b160k", "--seed", "3", "--onnx-dir", "{tmp}/e"], "--pretrained none"),
        (
            ["export", "--pretrained", "none", "--no-verify", "--verify-batches", "1", "--onnx-dir", "{tmp}/e"],
            "no effect with --no-verify",
        ),
        (["embed", "--texts", "{tmp}/t.txt", "--all-files", "--out", "{tmp}/o"], "applies to --images"),
        (["gateway", "--no-auth", "--api-key-file", "{tmp}/keys"], "no effect with --no-auth"),
        (["verify", "{tmp}/a", "--onnx-dir", "{tmp}/b"], "two export folders"),
        (["serve", "--repo", "{tmp}/r", "--watchdog-interval", "0", "--watchdog-timeout", "5"], "watchdog off"),
        (["repo", "--runtime", "python", "--served-model-name", "bad name!", "--repo", "{tmp}/r"], "not a model id"),
        (
            ["export", "--pretrained", "none", "--precision", "fp16", "--openvino-ir", "--onnx-dir", "{tmp}/e"],
            "converts fp32 exports",
        ),
        (["export", "--pretrained", "none", "--text-buckets", "0,8", "--onnx-dir", "{tmp}/e"], "positive integers"),
    ],
)
def test_flags_a_combination_ignores_are_refused(tmp_path, args, says):
    line = one_line_error(run_cli(*[a.replace("{tmp}", str(tmp_path)) for a in args]))
    assert says in line
    assert not (tmp_path / "r").exists() and not (tmp_path / "e").exists()


# -- CLI conventions -----------------------------------------------------------------------------
def test_every_flag_has_help_and_shows_its_default():
    import argparse

    from clip_triton import __version__
    from clip_triton.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert len(commands) == 15
    for name, sub in commands.items():
        text = sub.format_help()
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help and action.help.strip(), f"{name} {action.option_strings or action.dest}: no help"
            if action.default not in (None, False, True) and action.option_strings:
                shown = f"(default: {action.default})"
                assert shown in " ".join(text.split()), f"{name} {action.option_strings}: default not in --help"
    version = run_cli("--version")
    assert version.returncode == 0 and version.stdout.strip() == f"clip-triton {__version__}"


def test_one_word_per_folder_across_commands(tmp_path):
    """The export folder is --onnx-dir and the repository --repo in every command (old spellings kept)."""
    from clip_triton.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["export", "--onnx-dir", "e"]).onnx_dir == "e"
    assert parser.parse_args(["export", "--out", "e"]).onnx_dir == "e"
    assert parser.parse_args(["repo", "--repo", "r"]).repo == "r"
    assert parser.parse_args(["repo", "--out", "r"]).repo == "r"
    for command in (
        ["verify", "--onnx-dir", "e"],
        ["build-engines", "--onnx-dir", "e", "--repo", "r"],
        ["check-engines", "--repo", "r", "--onnx-dir", "e"],
        ["serve", "--repo", "r"],
    ):
        parser.parse_args(command)


def test_bf16_on_a_cpu_without_it_reports_fp32(monkeypatch, tiny_export, tmp_path, capsys):
    """On a CPU without native bf16, OpenVINO computes in fp32: the repository's encoder_runtime and the
    console say so instead of "bf16". (This machine has AMX, so the CPU's capability is the boundary
    replaced here.)"""
    from clip_triton import cli, cpuruntime
    from clip_triton.repository import RepoOptions, parse

    monkeypatch.setattr(cpuruntime, "cpu_supports_bf16", lambda: False)
    options = RepoOptions(runtime="python", cpu_runtime="openvino", cpu_precision="bf16")
    assert options.encoder_runtime == "openvino (python backend), fp32 (bf16 requested; this CPU has no native bf16)"
    code = cli.main(
        [
            "repo",
            "--runtime",
            "python",
            "--cpu-runtime",
            "openvino",
            "--cpu-precision",
            "bf16",
            "--onnx-dir",
            str(tiny_export),
            "--repo",
            str(tmp_path / "r"),
        ]
    )
    assert code == 0
    captured = capsys.readouterr()
    assert "fp32 (bf16 requested" in captured.out and "no native bf16" in captured.err
    config = parse((tmp_path / "r" / "clip_image" / "config.pbtxt").read_text())
    assert "fp32 (bf16 requested" in config.parameters["encoder_runtime"].string_value
    monkeypatch.setattr(cpuruntime, "cpu_supports_bf16", lambda: True)
    assert RepoOptions(runtime="python", cpu_runtime="openvino", cpu_precision="bf16").encoder_runtime.endswith("bf16")


def test_repo_prints_the_runtime_auto_became_and_why(monkeypatch, tiny_export, tiny_ir_export, tmp_path, capsys):
    """`repo` with the default --cpu-runtime auto prints what serves, never "auto", and where that is
    ONNX Runtime because the export has no IR, the note that says how to get OpenVINO fp32."""
    from clip_triton import cli, cpuruntime

    monkeypatch.setattr(cpuruntime, "openvino_installed", lambda: True)
    for export, runtime, noted in ((tiny_export, "onnxruntime", True), (tiny_ir_export, "openvino", False)):
        assert (
            cli.main(["repo", "--runtime", "python", "--onnx-dir", str(export), "--repo", str(tmp_path / runtime)]) == 0
        )
        captured = capsys.readouterr()
        assert f"({runtime} (python backend), fp32)" in captured.out and "auto" not in captured.out
        assert ("no OpenVINO IR" in captured.err) == noted, captured.err


# -- evaluation ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dataset")
    for name in ("cat", "coffee", "rocket", "astronaut"):
        (root / name).mkdir()
        source = Image.open(IMAGES / f"{name}.jpg")
        for k in range(3):
            source.rotate(k * 5).save(root / name / f"{k}.jpg")
    return root


def test_eval_with_class_name_and_template_files_writes_a_table_and_json(triton, dataset, tmp_path):
    from clip_triton.client import ClipClient

    (tmp_path / "names.txt").write_text("astronaut\ncat\ncup of coffee\nrocket launch\n")
    (tmp_path / "templates.txt").write_text("a photo of a {}.\na blurry photo of a {}.\n")
    result = cli(
        "eval",
        dataset,
        "--classnames",
        tmp_path / "names.txt",
        "--templates",
        tmp_path / "templates.txt",
        "--json",
        tmp_path / "report.json",
        "--url",
        triton.grpc_url,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["images"] == 12 and report["classes"] == 4 and report["top5"] is None  # 4 classes <= 5: n/a
    assert set(report["per_class"]) == {"astronaut", "cat", "cup of coffee", "rocket launch"}
    assert "n/a" in result.stdout and "cup of coffee" in result.stdout
    with ClipClient(triton.grpc_url) as client:  # the same figures from the API's own embeddings
        classifier = client.prompt_embeddings(
            ["astronaut", "cat", "cup of coffee", "rocket launch"], ["a photo of a {}.", "a blurry photo of a {}."]
        )
        paths = sorted(dataset.rglob("*.jpg"))
        predicted = (client.embed_images(paths) @ classifier.T).argmax(1)
    labels = np.array([["astronaut", "cat", "coffee", "rocket"].index(p.parent.name) for p in paths])
    assert report["top1"] == pytest.approx(float((predicted == labels).mean()))
    comma = cli(
        "eval",
        dataset,
        "--classnames",
        "astronaut,cat,cup of coffee,rocket launch",
        "--templates",
        tmp_path / "templates.txt",
        "--json",
        tmp_path / "comma.json",
        "--url",
        triton.grpc_url,
    )
    assert comma.returncode == 0 and json.loads((tmp_path / "comma.json").read_text()) == report


@pytest.mark.parametrize("layout", ["coco", "karpathy"])
def test_retrieval_recall_on_an_image_caption_folder(triton, dataset, tmp_path, layout):
    """recall@k through the deployment equals recall@k computed from the API's embeddings."""
    from clip_triton.client import ClipClient
    from clip_triton.client.retrieval import recall_at_k

    paths = sorted(dataset.rglob("*.jpg"))
    captions = {p: [f"a photo of a {p.parent.name}", f"{p.parent.name} number {p.stem}"] for p in paths}
    if layout == "coco":
        document = {
            "images": [{"id": i, "file_name": str(p.relative_to(dataset))} for i, p in enumerate(paths)],
            "annotations": [{"image_id": i, "caption": c} for i, p in enumerate(paths) for c in captions[p]],
        }
    else:
        document = {
            "images": [
                {
                    "filename": p.name,
                    "filepath": p.parent.name,
                    "split": "test" if i % 4 else "train",
                    "sentences": [{"raw": c} for c in captions[p]],
                }
                for i, p in enumerate(paths)
            ]
        }
    (tmp_path / "captions.json").write_text(json.dumps(document))
    split = ["--split", "test"] if layout == "karpathy" else []
    result = cli(
        "eval-retrieval",
        "--images",
        dataset,
        "--captions",
        tmp_path / "captions.json",
        *split,
        "-k",
        "1,5",
        "--json",
        tmp_path / "r.json",
        "--url",
        triton.grpc_url,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    kept = [p for i, p in enumerate(paths) if layout == "coco" or i % 4]
    assert report["images"] == len(kept) and report["captions"] == 2 * len(kept) and report["failed"] == 0
    with ClipClient(triton.grpc_url) as client:
        image_rows = client.embed_images(kept)
        text_rows = client.embed_texts([c for p in kept for c in captions[p]])
    i2t, t2i = recall_at_k(image_rows, text_rows, np.repeat(np.arange(len(kept)), 2), (1, 5))
    assert {int(k): v for k, v in report["image_to_text"].items()} == pytest.approx(i2t)
    assert {int(k): v for k, v in report["text_to_image"].items()} == pytest.approx(t2i)
    assert "R@1" in result.stdout and "image -> text" in result.stdout
    if layout == "coco":  # --split means nothing for a COCO file: refused, not ignored
        line = one_line_error(
            cli(
                "eval-retrieval",
                "--images",
                dataset,
                "--captions",
                tmp_path / "captions.json",
                "--split",
                "test",
                "--url",
                triton.grpc_url,
            )
        )
        assert "has no splits" in line


def test_recall_at_k_counts_hits_exactly():
    from clip_triton.client.retrieval import recall_at_k

    images = np.eye(3, dtype=np.float32)
    texts = np.array([[1, 0, 0], [0, 0, 1], [0, 1, 0], [0.2, 0, 0.9]], dtype=np.float32)
    owner = np.array([0, 1, 2, 2])  # captions 1 and 2 point at each other's image; caption 3 at its own
    i2t, t2i = recall_at_k(images, texts, owner, (1, 2))
    # image 0: t0 first (hit); image 1: t2, t0 (miss); image 2: t1, then t3 (hit at 2)
    assert i2t == {1: pytest.approx(1 / 3), 2: pytest.approx(2 / 3)}
    # t0 -> image 0 (hit); t1 -> 2, 0 (miss); t2 -> 1, 0 (miss); t3 -> image 2 (hit)
    assert t2i == {1: pytest.approx(2 / 4), 2: pytest.approx(2 / 4)}


# -- served model name ---------------------------------------------------------------------------
def test_served_model_name_hides_a_checkpoint_path(tiny_export, tmp_path):
    """A repository can name its model for the world; a checkpoint path never becomes the public id."""
    from google.protobuf import json_format

    from clip_triton.facts import ServerFacts
    from clip_triton.repository import RepoOptions, parse, write_repository

    repo = write_repository(
        tmp_path / "r", onnx_dir=tiny_export, options=RepoOptions(runtime="python", served_model_name="clip-tiny")
    )
    config = parse((repo / "clip_image" / "config.pbtxt").read_text())
    facts = ServerFacts.from_config(json_format.MessageToDict(config, preserving_proto_field_name=True))
    assert facts.public_id == "clip-tiny" and facts.model == "clip-triton-tiny"
    default = write_repository(tmp_path / "d", onnx_dir=tiny_export, options=RepoOptions(runtime="python"))
    config = parse((default / "clip_text" / "config.pbtxt").read_text())
    assert config.parameters["served_model_name"].string_value == "clip-triton-tiny"
    private = facts.__class__(
        **{**facts.__dict__, "pretrained": "/home/me/ckpt/open_clip_pytorch_model.bin", "served_model_name": ""}
    )
    assert private.public_id == "clip-triton-tiny" and private.public_pretrained == "local checkpoint"
