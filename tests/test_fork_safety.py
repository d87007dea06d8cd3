"""Issue 24: starting children never runs Python between fork and exec (grpcio's fork handlers).

A ``preexec_fn`` made CPython fork a process holding gRPC channels and run Python in the child: a test
run hung for good inside ``fork()``, and a second ``TritonServer.start`` died with -11 before exec.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from clip_triton import children

from .helpers import ROOT

pytestmark = pytest.mark.integration


def _gone(pid: int, within: float = 60.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        # a zombie (killed, not yet reaped by its new parent) counts as gone
        try:
            with open(f"/proc/{pid}/stat") as stat:
                if stat.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return True
        except OSError:
            return True
        time.sleep(0.1)
    return False


def test_no_preexec_fn_anywhere_in_the_project():
    """Every child goes through clip_triton.children (or plain Popen without preexec_fn)."""
    offenders = []
    for folder in ("clip_triton", "export", "client", "bench", "tests", "deploy"):
        for path in (ROOT / folder).rglob("*.py"):
            if path.name == "test_fork_safety.py":
                continue
            for number, line in enumerate(path.read_text().splitlines(), 1):
                if re.search(r"preexec_fn\s*=(?!\s*None)", line) and "refuse" not in line:
                    offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not offenders, "use clip_triton.children.spawn instead:\n" + "\n".join(offenders)


def test_spawn_refuses_a_preexec_fn():
    with pytest.raises(ValueError, match="fork and exec"):
        children.spawn([sys.executable, "-c", "pass"], preexec_fn=lambda: None)


def test_the_shim_execs_the_command_in_place_with_its_environment_and_exit_code():
    done = children.run(
        [sys.executable, "-c", "import os, sys; print(os.environ['PROBE'], os.getppid()); sys.exit(3)"],
        capture_output=True,
        text=True,
        env={**os.environ, "PROBE": "seen"},
        timeout=120,
    )
    assert done.returncode == 3, done.stderr
    probe, parent = done.stdout.split()
    assert probe == "seen" and int(parent) == os.getpid()  # exec'd in place: no shim process in between


def test_a_missing_program_is_reported_with_its_name():
    done = children.run(["/nonexistent/tritonserver"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 127 and "/nonexistent/tritonserver" in done.stderr


def test_children_die_with_the_process_not_with_the_thread_that_started_them():
    """A child spawned from a thread outlives that thread (the watchdog restarts from one) and dies
    when its process is SIGKILLed."""
    script = textwrap.dedent(
        """
        import subprocess, sys, threading, time
        from clip_triton import children
        box = {}
        def start():
            box["p"] = children.spawn(["sleep", "600"], start_new_session=True)
        thread = threading.Thread(target=start)
        thread.start(); thread.join()
        time.sleep(0.5)  # PDEATHSIG would have fired when the thread ended
        print(box["p"].pid, box["p"].poll(), flush=True)
        time.sleep(600)
        """
    )
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        pid, status = parent.stdout.readline().split()
        assert status == "None", "the child died with the thread that started it"
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
        assert _gone(int(pid)), "the child outlived its SIGKILLed parent"
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()


# A process that has started a tritonserver and used gRPC against it as tests, notebooks and `serve`'s
# watchdog do (clients, a channel with a connectivity watcher), then starts and stops more servers.
# With preexec_fn the third start died with -11 before exec (reproduced here 2 of 2) or hung in fork();
# the bound turns a hang into a failure.
_GRPC_THEN_START = """
import sys
import grpc
import tritonclient.grpc as grpcclient
from clip_triton.server import TritonServer

repo = sys.argv[1]
first = TritonServer(repo).start(timeout=300)
clients = [grpcclient.InferenceServerClient(first.grpc_url) for _ in range(4)]
for client in clients:
    assert client.is_server_live()
channel = grpc.insecure_channel(first.grpc_url)
states = []
watch = states.append
channel.subscribe(watch, try_to_connect=True)  # grpcio's connectivity polling thread
try:
    for attempt in range(3):
        server = TritonServer(repo)
        server.start(timeout=300)
        assert grpcclient.InferenceServerClient(server.grpc_url).is_server_ready()
        server.stop()
        print("start", attempt, "ok", flush=True)
finally:
    channel.unsubscribe(watch)  # a subscribed channel left open blocks interpreter exit in its __del__
    channel.close()
    for client in clients:
        client.close()
    first.stop()
print("done", flush=True)
"""


def test_starting_tritonserver_from_a_process_that_uses_grpc(tiny_repo):
    try:
        done = children.run(
            [sys.executable, "-c", _GRPC_THEN_START, str(tiny_repo)],
            capture_output=True,
            text=True,
            timeout=540,
            cwd=ROOT,
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"starting tritonserver hung (fork with gRPC loaded?):\n{exc.stdout}\n{exc.stderr}")
    assert done.returncode == 0, f"rc {done.returncode}\n{done.stdout}\n{done.stderr[-3000:]}"
    assert done.stdout.count(" ok") == 3 and "done" in done.stdout


def test_tritonserver_and_its_stubs_get_no_secrets(monkeypatch):
    """Issue 27 row 14: the whole environment, keys included, reached every python stub."""
    from clip_triton.server import TritonServer

    monkeypatch.setenv("CLIP_TRITON_ADMIN_KEY", "admin-secret")
    monkeypatch.setenv("CLIP_TRITON_API_KEYS", "sk-1,sk-2")
    monkeypatch.setenv("HF_TOKEN", "hf_x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "aws")
    monkeypatch.setenv("DB_PASSWORD", "pw")
    monkeypatch.setenv("CLIP_TRITON_URL", "kept:8001")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    server = TritonServer(ROOT)
    env = server.environment()
    assert not {
        "CLIP_TRITON_ADMIN_KEY",
        "CLIP_TRITON_API_KEYS",
        "HF_TOKEN",
        "AWS_SECRET_ACCESS_KEY",
        "DB_PASSWORD",
    } & set(env)
    assert (
        env["CLIP_TRITON_URL"] == "kept:8001"
        and env["TOKENIZERS_PARALLELISM"] == "false"
        and "PYTHONPATH" in env
        and "PATH" in env
    )
    assert server.admin_key == "admin-secret"  # still the server's key: it travels on the command line only


def test_python_stubs_end_with_a_killed_tritonserver(tiny_repo, tmp_path):
    """tritonserver SIGKILLed (its death signal when the process that started it dies, an OOM kill):
    its python-backend stubs, reparented, used to keep running (one for 23 minutes). Every model's
    initialize now watches the parent and the stubs end within seconds."""
    from pathlib import Path

    from clip_triton.server import TritonServer

    def child_pids(pid: int) -> list[int]:
        found = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(stat.parent.name))
        return found

    server = TritonServer(tiny_repo, log_file=tmp_path / "t.log").start(timeout=300)
    try:
        stubs = child_pids(server.process.pid)
        assert len(stubs) >= 4, stubs  # preprocess, tokenizer, both encoders (python backend here)
        os.kill(server.process.pid, signal.SIGKILL)

        def running() -> list[int]:  # a zombie (ended, not yet reaped by pid 1) is not running
            alive = []
            for pid in stubs:
                try:
                    state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
                except OSError:
                    continue
                if state != "Z":
                    alive.append(pid)
            return alive

        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and running():
            time.sleep(0.2)
        assert not running(), f"stubs still running after their tritonserver died: {running()}"
    finally:
        server.stop(timeout=10)
