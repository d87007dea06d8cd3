"""`clip-triton serve` and `clip-triton demo` as a user runs them."""

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from clip_triton.errors import ClipTritonError
from clip_triton.repository import RepoOptions, write_repository
from clip_triton.server import TritonServer, check_repository

from .conftest import TINY_CONFIG


def test_repository_without_graphs_is_refused_with_the_fix(tmp_path, tiny_export):
    repo = write_repository(tmp_path / "repo", onnx_dir=tiny_export, options=RepoOptions(runtime="python"))
    (repo / "vision_encoder" / "1" / "model.onnx").unlink()
    with pytest.raises(ClipTritonError, match="no exported graph") as err:
        check_repository(repo)
    assert "clip-triton export" in err.value.hint


def test_tensorrt_repository_is_refused_on_the_pip_triton():
    from pathlib import Path

    committed = Path(__file__).resolve().parent.parent / "model_repository"
    with pytest.raises(ClipTritonError, match="no TensorRT backend") as err:
        check_repository(committed)
    assert "--runtime python" in err.value.hint


@pytest.mark.parametrize("runtime, backend", [("onnxruntime", "ONNX Runtime"), ("openvino", "OpenVINO")])
def test_ngc_only_backends_are_refused_on_the_pip_triton(tmp_path, tiny_export, runtime, backend):
    options = RepoOptions(runtime=runtime, cpu_precision="bf16" if runtime == "openvino" else "fp32")
    repo = write_repository(tmp_path / "repo", onnx_dir=tiny_export, options=options)
    with pytest.raises(ClipTritonError, match=f"Triton's {backend} backend") as err:
        check_repository(repo)
    assert f"--runtime python here (--cpu-engine {runtime})" in err.value.hint


def test_port_in_use_is_reported(tiny_repo):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(ClipTritonError, match=f"grpc port {port} .* already in use"):
            TritonServer(tiny_repo, grpc_port=port).start(timeout=30)


def _serve(repo):
    from clip_triton.server import free_ports

    http, grpc_port, metrics = free_ports(3)
    process = subprocess.Popen(
        [sys.executable, "-m", "clip_triton.cli", "serve", "--repo", str(repo), "--http-port", str(http),
         "--grpc-port", str(grpc_port), "--metrics-port", str(metrics)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return process, http


def _serving(http: int) -> bool:
    try:
        return urllib.request.urlopen(f"http://127.0.0.1:{http}/v2/health/ready", timeout=2).status == 200
    except OSError:
        return False


def test_serve_command_runs_until_ctrl_c(tiny_repo):
    process, http = _serve(tiny_repo)
    try:
        lines = []
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            line = process.stdout.readline()
            lines.append(line)
            if "ready; Ctrl-C stops the server" in line or not line:
                break
        assert "ready; Ctrl-C stops the server" in lines[-1], "".join(lines)
        assert _serving(http)
        process.send_signal(signal.SIGINT)
        assert process.wait(60) == 0
        assert not _serving(http)
    finally:
        if process.poll() is None:
            process.kill()


def _stubs(repo) -> set[int]:
    """PIDs of python-backend stubs serving models of ``repo`` (read from /proc, not ps: no truncation)."""
    pids = set()
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue
        if any(b"triton_python_backend_stub" in a for a in args[:1]) and any(str(repo).encode() in a for a in args):
            pids.add(int(cmdline.parent.name))
    return pids


def test_ctrl_c_during_startup_leaves_no_server_behind(tiny_repo):
    before = _stubs(tiny_repo)  # the session's own server may be serving the same repository
    process, http = _serve(tiny_repo)
    try:
        assert "starting tritonserver" in process.stdout.readline()
        time.sleep(1.0)  # tritonserver is loading models
        process.send_signal(signal.SIGINT)
        assert process.wait(60) == 0
        time.sleep(0.5)
        assert not _serving(http)
        assert _stubs(tiny_repo) <= before, "a python-backend stub outlived tritonserver"
    finally:
        if process.poll() is None:
            process.kill()


def test_demo_main_job_prints_scores_and_says_weights_are_random(tmp_path):
    """The README's main job, on the tiny architecture to keep the suite fast."""
    result = subprocess.run(
        [sys.executable, "-m", "clip_triton.cli", "demo", "--model", str(TINY_CONFIG), "--workdir", str(tmp_path)],
        capture_output=True, text=True, timeout=600, env=dict(os.environ))
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    assert "RANDOM" in out
    for name in ("cat.jpg", "coffee.jpg", "astronaut.jpg", "rocket.jpg"):
        assert name in out
    rows = [line.split() for line in out.splitlines() if line.strip().startswith("a photo of")]
    assert len(rows) == 4 * 5
    probabilities = [float(row[-1]) for row in rows]
    assert all(0 <= p <= 1 for p in probabilities)
    assert abs(sum(probabilities[:5]) - 1) < 1e-3  # one image's prompts sum to 1
