"""`clip-triton serve` and `clip-triton demo` as a user runs them."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from clip_triton import children
from clip_triton.errors import ClipTritonError
from clip_triton.repository import RepoOptions, write_repository
from clip_triton.server import TritonServer, check_repository

from .helpers import TINY_CONFIG


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
    assert f"--runtime python here (--cpu-runtime {runtime})" in err.value.hint


def test_port_in_use_is_reported(tiny_repo):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(ClipTritonError, match=f"grpc port {port} .* already in use"):
            TritonServer(tiny_repo, grpc_port=port).start(timeout=30)


def _serve(repo, *extra: str, sigint_ignored: bool = False):
    """`clip-triton serve` as a child that dies with this test process (and takes tritonserver along).
    ``sigint_ignored``: started as a script's background job is, with SIGINT ignored (inherited)."""
    from clip_triton.server import free_ports

    http, grpc_port, metrics = free_ports(3)
    ignoring = ["bash", "-c", 'trap "" INT; exec "$@"', "bash"] if sigint_ignored else []
    process = children.spawn(
        [
            *ignoring,
            sys.executable,
            "-m",
            "clip_triton.cli",
            "serve",
            "--repo",
            str(repo),
            "--http-port",
            str(http),
            "--grpc-port",
            str(grpc_port),
            "--metrics-port",
            str(metrics),
            *extra,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    return process, http


class _Lines:
    """serve's output, read on a thread so that a test can wait for a line without blocking forever."""

    def __init__(self, process):
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._read, args=(process,), daemon=True)
        self._thread.start()

    def _read(self, process):
        for line in process.stdout:
            self.lines.append(line)

    def wait_for(self, text: str, timeout: float = 300, start: int = 0) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for index in range(start, len(self.lines)):
                if text in self.lines[index]:
                    return index
            time.sleep(0.1)
        raise AssertionError(f"{text!r} not seen in {timeout:.0f} s:\n{''.join(self.lines)}")

    def text(self) -> str:
        return "".join(self.lines)


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if ppid == pid:
            found.append(int(stat.parent.name))
    return found


def _tritonservers_of(pid: int) -> list[int]:
    """The tritonserver processes that `serve` (process `pid`) started."""
    return [child for child in _children(pid) if "tritonserver" in Path(f"/proc/{child}/cmdline").read_text()]


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _wait_until(condition, timeout: float = 120) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.2)
    return condition()


def _serving(http: int) -> bool:
    try:
        return urllib.request.urlopen(f"http://127.0.0.1:{http}/v2/health/ready", timeout=2).status == 200
    except OSError:
        return False


def test_serve_command_runs_until_ctrl_c(tiny_repo):
    """Ctrl-C stops serve, also when it was started with SIGINT ignored (a background job of a script:
    it used to run on after `kill -INT`, and a test waiting for it hung)."""
    process, http = _serve(tiny_repo, sigint_ignored=True)
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
        assert process.wait(300) == 0  # generous: a loaded CI machine took > 60 s
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
        deadline = time.monotonic() + 120  # a state, not a clock: tritonserver has begun loading models
        while not _stubs(tiny_repo) - before and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _stubs(tiny_repo) - before, "tritonserver started no python-backend stub"
        process.send_signal(signal.SIGINT)
        assert process.wait(300) == 0
        deadline = time.monotonic() + 30
        while _stubs(tiny_repo) - before and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _serving(http)
        assert _stubs(tiny_repo) <= before, "a python-backend stub outlived tritonserver"
    finally:
        if process.poll() is None:
            process.kill()


def _fresh_shell(line: str, cwd: Path, **kwargs):
    """``line`` in a new bash with the system PATH only (no virtualenv on it), as a user's new terminal."""
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": os.environ.get("HOME", "/root"), "LANG": "C.UTF-8"}
    return children.spawn(["bash", "-c", line], cwd=cwd, env=env, **kwargs)


@pytest.mark.integration  # the demo (export, tritonserver), then its next steps from a fresh shell
def test_the_demo_and_its_next_steps_run_as_written_from_a_fresh_shell(tmp_path):
    """The README's main job on the tiny architecture, run from a folder of its own with the default
    workdir; then every "Next" line it prints (activation, serve, the five use commands), each in a new
    shell with nothing but the system PATH, exactly as printed. They are the same lines each command's
    --help ends with (samples.EXAMPLES), so those run as written too."""
    import shlex

    from clip_triton.cli import build_parser
    from clip_triton.samples import example

    with socket.socket() as probe:
        if probe.connect_ex(("127.0.0.1", 8001)) == 0:
            pytest.skip("something listens on 8001: the printed lines use Triton's default ports")
    result = children.run(
        [sys.executable, "-m", "clip_triton.cli", "demo", "--model", str(TINY_CONFIG)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
        env={k: v for k, v in os.environ.items() if k != "CLIP_TRITON_URL"},
    )
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
    # the default export writes the OpenVINO IR where OpenVINO is installed, and auto serves it
    assert "encoders openvino (python backend), fp32 (read from the server)" in out
    # and the line that says so before the server starts names it too, not the "auto" it was resolved from
    assert "(encoders: openvino (python backend), fp32)" in out + result.stderr

    nexts = [line.strip() for line in out.split("Next, in a new shell")[1].splitlines()[1:] if line.startswith("  ")]
    activate = nexts.pop(0).split("  # ")[0] if nexts[0].startswith(("source ", "export PATH=")) else None
    assert activate, "the tests run .venv's python without activating it: the demo must say how"
    commands = [line.split("  # ")[0] for line in nexts]
    names = ["serve", "classify", "embed", "search", "eval", "eval-retrieval"]
    assert commands == [example(name) for name in names]
    parser = build_parser()
    for name in names:  # the same line ends each command's --help
        args = parser.parse_args(shlex.split(example(name))[1:])
        assert args.command == name and example(name) in args._parser.format_help()
    serve = _fresh_shell(
        f"{activate}\nexec {commands[0]}",
        tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines = _Lines(serve)
    try:
        lines.wait_for("ready; Ctrl-C stops the server")
        for command in commands[1:]:
            shell = _fresh_shell(
                f"{activate}\n{command}",
                tmp_path,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            stdout, stderr = shell.communicate(timeout=300)
            assert shell.returncode == 0, f"{command}\n{stdout}\n{stderr}"
            if command.startswith("clip-triton eval "):
                assert "top-1" in stdout.lower() or "accuracy" in stdout.lower(), stdout
    finally:
        serve.send_signal(signal.SIGINT)
        try:
            serve.wait(120)
        except subprocess.TimeoutExpired:
            serve.kill()
            serve.wait()
    assert (tmp_path / ".clip-triton" / "demo" / "photos.npy").is_file()


@pytest.fixture()
def own_repo(tiny_export, tmp_path):
    """A repository of the test's own: its stubs are told apart from the session server's."""
    from clip_triton.repository import RepoOptions, write_repository

    return write_repository(tmp_path / "repo", onnx_dir=tiny_export, options=RepoOptions(runtime="python"))


def test_serve_restarts_a_crashed_tritonserver(own_repo):
    process, http = _serve(own_repo)
    out = _Lines(process)
    try:
        out.wait_for("ready; Ctrl-C stops the server")
        (triton,) = _tritonservers_of(process.pid)
        regions = _regions_of(process.pid)
        assert regions, "the server's python-backend regions are not named after their owner"
        # The whole group, as a cgroup OOM kill takes it: stubs that die with their server do not
        # remove its shared-memory regions (a server killed alone has its stubs remove them).
        os.killpg(triton, signal.SIGKILL)
        crashed = out.wait_for("tritonserver exited with code -9; restarting tritonserver")
        out.wait_for("watchdog: ready again", start=crashed)
        assert _serving(http) and process.poll() is None
        assert not _alive(triton)
        # The killed server's shared memory (RAM) went with it; the new server has its own.
        assert not [path for path in regions if path.exists()] and _regions_of(process.pid)
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(300)
        except subprocess.TimeoutExpired:  # a failed test must not leave serve (and its tritonserver) behind
            process.kill()
            process.wait()


def test_sigkill_of_serve_takes_tritonserver_and_its_stubs_along(own_repo):
    """Before, a killed `serve` left tritonserver and its stubs running, holding the ports."""
    process, http = _serve(own_repo)
    out = _Lines(process)
    try:
        out.wait_for("ready; Ctrl-C stops the server")
        triton = _tritonservers_of(process.pid)
        assert triton and _stubs(own_repo)
        process.kill()
        process.wait(60)
        assert _wait_until(lambda: not any(_alive(pid) for pid in triton)), "tritonserver outlived serve"
        assert _wait_until(lambda: not _stubs(own_repo)), f"stubs outlived serve: {_stubs(own_repo)}"
        assert not _serving(http)
    finally:
        if process.poll() is None:
            process.kill()


def test_a_killed_servers_shared_memory_is_removed_by_the_next_start(own_repo):
    """`serve` and tritonserver's whole group SIGKILLed at once (a container's or a test run's kill):
    nobody is left to remove the python backend's shared-memory regions, which are RAM. Before, 619 of
    them (8.6 GB) piled up on a CI machine until an export was OOM-killed; now the next start removes
    them."""
    from clip_triton.server import TritonServer

    process, _ = _serve(own_repo)
    out = _Lines(process)
    try:
        out.wait_for("ready; Ctrl-C stops the server")
        (triton,) = _tritonservers_of(process.pid)
        os.killpg(triton, signal.SIGKILL)
        process.kill()
        process.wait(60)
        assert _wait_until(lambda: not _alive(triton) and not _stubs(own_repo))
        leaked = _regions_of(process.pid)
        assert leaked, "nothing leaked: this test no longer shows the mechanism"
        with TritonServer(own_repo):
            assert not [path for path in leaked if path.exists()]
    finally:
        if process.poll() is None:
            process.kill()


def _regions_of(owner: int) -> list[Path]:
    """The python-backend shared-memory regions of the servers that process `owner` started."""
    from clip_triton.server import SHM_PREFIX, shm_regions

    return shm_regions(f"{SHM_PREFIX}{owner}_")


@pytest.mark.parametrize(
    "flags",
    [(), ("--watchdog-interval=1", "--watchdog-timeout=0.05")],
    ids=["serve defaults", "probing every second, 50 ms canary deadline"],
)
def test_a_busy_server_is_not_restarted(own_repo, photos, flags):
    """Saturated CPU, 32 concurrent clients for 30 s: zero restarts, zero lost requests, and the liveness
    check answering during the load. With a canary deadline the load makes it miss, requests keep
    completing, so the server is busy, not dead; before, two missed canaries restarted the server and
    every in-flight request died."""
    import tritonclient.grpc as grpcclient

    from clip_triton import contract as C

    process, http = _serve(own_repo, *flags)
    out = _Lines(process)
    grpc_port = None
    try:
        ready = out.wait_for("ready; Ctrl-C stops the server")
        endpoints = json.loads(out.lines[ready - 1])
        grpc_port = endpoints["grpc"]
        batch = np.array([[blob] for blob in list(photos.values()) * 4], dtype=object)
        stop_at = time.monotonic() + 30
        results = {"ok": 0, "failed": []}
        lock = threading.Lock()

        def client_loop():
            client = grpcclient.InferenceServerClient(grpc_port)
            try:
                while time.monotonic() < stop_at:
                    tensor = grpcclient.InferInput(C.IMAGE_INPUT, list(batch.shape), "BYTES")
                    tensor.set_data_from_numpy(batch)
                    try:
                        client.infer(C.IMAGE_ENSEMBLE, [tensor], client_timeout=120)
                        with lock:
                            results["ok"] += 1
                    except Exception as exc:  # noqa: BLE001
                        with lock:
                            results["failed"].append(str(exc)[:200])
            finally:
                client.close()

        threads = [threading.Thread(target=client_loop) for _ in range(32)]
        for thread in threads:
            thread.start()
        time.sleep(10)  # under full load: the liveness check (k8s probe, compose healthcheck) says alive
        health = subprocess.run(
            [
                sys.executable,
                "-m",
                "clip_triton.cli",
                "health",
                "--url",
                grpc_port,
                "--metrics-url",
                endpoints["metrics"],
                "--timeout",
                "0.05" if flags else "10",
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        for thread in threads:
            thread.join(300)
        log = out.text()
        assert health.returncode == 0, health.stdout + health.stderr
        assert "restarting tritonserver" not in log, log
        if flags:
            assert "busy: the canary did not finish" in log, log  # the load really made the canary miss
            assert "busy" in health.stdout, health.stdout
        assert not results["failed"] and results["ok"] > 32, results
        print(
            f"\nload held ({' '.join(flags) or 'serve defaults'}): {results['ok']} requests of {batch.shape[0]} "
            f"images from 32 clients in 30 s, 0 failed, {log.count('busy: the canary')} busy verdicts, 0 restarts; "
            f"health during the load: {health.stdout.strip()[:120]}"
        )
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(300)
        except subprocess.TimeoutExpired:  # a failed test must not leave serve (and its tritonserver) behind
            process.kill()
            process.wait()


def test_admin_apis_need_the_admin_key(triton):
    """Log and trace settings, shared-memory registration and the repository index answer only with the
    server's admin key; inference, metadata, health and statistics (read-only; perf_analyzer needs
    them over gRPC, where it cannot send headers) stay open."""
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    from clip_triton import contract as C

    grpc = grpcclient.InferenceServerClient(triton.grpc_url)
    http = httpclient.InferenceServerClient(triton.http_url)
    try:
        attempts = {
            "grpc log settings": lambda h: grpc.update_log_settings({"log_verbose_level": 1}, headers=h),
            "grpc repository index": lambda h: grpc.get_model_repository_index(headers=h),
            "grpc shared memory": lambda h: grpc.register_system_shared_memory("x", "/x", 8, headers=h),
            "http log settings": lambda h: http.get_log_settings(headers=h),
            "http repository index": lambda h: http.get_model_repository_index(headers=h),
            "http shared memory": lambda h: http.get_system_shared_memory_status(headers=h),
            "http trace settings": lambda h: http.get_trace_settings(headers=h),
        }
        for label, call in attempts.items():
            for headers in (None, {"clip-triton-admin": "guess"}, {"triton-grpc-protocol-clip-triton-admin": "guess"}):
                with pytest.raises(InferenceServerException, match="(?i)restricted|not allowed|permission|unavailable"):
                    call(headers)
                    pytest.fail(f"{label} answered without the admin key")
        grpc.get_model_repository_index(headers=triton.grpc_admin_headers)  # the documented way in
        http.get_log_settings(headers=triton.http_admin_headers)
        assert grpc.get_inference_statistics(C.IMAGE_ENSEMBLE)  # open: perf_analyzer reads it
        assert grpc.is_server_live() and http.is_server_ready()
        assert grpc.get_model_config(C.IMAGE_ENSEMBLE, as_json=True)  # clients read facts from it
    finally:
        grpc.close()
        http.close()


def test_a_job_completes_across_a_kill_9_of_tritonserver(own_repo, open_clip_reference):
    """kill -9 of tritonserver mid-job under `serve`: serve restarts it, the client's retries (its
    defaults) ride out the restart, every item is answered once, in order."""
    from clip_triton.client import ClipClient

    from .helpers import cos

    process, http = _serve(own_repo)
    out = _Lines(process)
    texts = [f"a caption that outlives its server, number {i}" for i in range(90)]
    try:
        ready = out.wait_for("ready; Ctrl-C stops the server")
        grpc_url = json.loads(out.lines[ready - 1])["grpc"]
        (triton,) = _tritonservers_of(process.pid)
        rows = []
        with ClipClient(grpc_url, batch_size=3, concurrency=1) as client:
            for start in range(0, len(texts), 3):
                if start == 30:
                    os.kill(triton, signal.SIGKILL)
                rows.append(client.embed_texts(texts[start : start + 3]))
        out.wait_for("watchdog: ready again")
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(300)
        except subprocess.TimeoutExpired:  # a failed test must not leave serve (and its tritonserver) behind
            process.kill()
            process.wait()
    served = np.concatenate(rows)
    assert served.shape == (90, 32)
    assert cos(served, open_clip_reference.texts(texts)).min() >= 0.9999


@pytest.mark.integration  # processes that own shared memory
def test_the_sweep_removes_only_regions_of_dead_owners_that_nothing_maps(tmp_path):
    """What every start and stop removes: a dead owner's unmapped region. A live owner's region, and a
    dead owner's region some process still maps (a stub not yet gone), stay."""
    import mmap

    from clip_triton.server import SHM_DIR, SHM_PREFIX, sweep_stale_shm

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a pid that no longer runs (reuse within this test is not a concern)
    token = os.urandom(4).hex()
    dead = SHM_DIR / f"{SHM_PREFIX}{gone.pid}_{token}_unmapped"
    mapped = SHM_DIR / f"{SHM_PREFIX}{gone.pid}_{token}_mapped"
    live = SHM_DIR / f"{SHM_PREFIX}{os.getpid()}_{token}_live"
    for path in (dead, mapped, live):
        path.write_bytes(b"\0" * 4096)
    try:
        with open(mapped, "r+b") as handle, mmap.mmap(handle.fileno(), 4096):
            assert sweep_stale_shm() >= 1
            assert not dead.exists() and mapped.exists() and live.exists()
        sweep_stale_shm()
        assert not mapped.exists() and live.exists()  # once nothing maps it
    finally:
        for path in (dead, mapped, live):
            path.unlink(missing_ok=True)
