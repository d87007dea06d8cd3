"""Child processes tied to this process, started without Python code between fork and exec.

Why: grpcio registers ``pthread_atfork`` handlers. A ``preexec_fn`` makes CPython ``fork()`` (instead of
``vfork``) and run Python in the child of a multi-threaded process; once gRPC channels are open those
handlers block for good or are skipped, and the child can segfault before ``exec`` (issue 24: a suite
stalled in ``fork()``, and ``tritonserver exited with code -11`` on a second start).

How: every child the project starts and wants to die with it goes through :func:`spawn`, which

- runs the command under a tiny exec shim (``_execshim.py``, its own interpreter: ``prctl(PR_SET_PDEATHSIG,
  SIGKILL)``, a check that the parent is still there, then ``exec``), so ``subprocess.Popen`` gets no
  ``preexec_fn`` and CPython forks with ``vfork`` (no atfork handlers, no Python in the child);
- calls ``Popen`` from one long-lived daemon thread: Linux sends the parent-death signal when the
  *thread* that forked exits, so a server started from a watchdog or worker thread must not die with
  that thread, only with the process (SIGKILL of ``serve`` or of a test runner included).
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
from pathlib import Path

SHIM = Path(__file__).with_name("_execshim.py")


def tied_command(command: list[str], parent: int | None = None) -> list[str]:
    """``command`` under the exec shim: it gets SIGKILL when ``parent``'s forking thread dies."""
    parent = os.getpid() if parent is None else parent
    return [sys.executable, "-I", "-S", str(SHIM), str(parent), "--", *map(str, command)]


class _Spawner:
    """One daemon thread that starts every tied child (see the module docstring)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._jobs: queue.SimpleQueue | None = None
        self._owner = 0

    def _ensure(self) -> queue.SimpleQueue:
        with self._lock:
            if self._jobs is None or self._owner != os.getpid():  # a forked child starts its own
                self._jobs, self._owner = queue.SimpleQueue(), os.getpid()
                threading.Thread(
                    target=self._serve, args=(self._jobs,), name="clip-triton-spawner", daemon=True
                ).start()
            return self._jobs

    @staticmethod
    def _serve(jobs: queue.SimpleQueue) -> None:
        while True:
            command, kwargs, box, done = jobs.get()
            try:
                box["process"] = subprocess.Popen(tied_command(command), **kwargs)
            except BaseException as exc:  # noqa: BLE001 (handed to the caller, raised there)
                box["error"] = exc
            done.set()

    def popen(self, command: list[str], kwargs: dict) -> subprocess.Popen:
        box: dict = {}
        done = threading.Event()
        self._ensure().put((list(command), kwargs, box, done))
        try:
            done.wait()
        except BaseException:  # Ctrl-C while the child starts: it is not handed out, so end it
            done.wait()
            if "process" in box:
                _kill(box["process"], kwargs.get("start_new_session", False))
            raise
        if "error" in box:
            raise box["error"]
        return box["process"]


def _kill(process: subprocess.Popen, own_group: bool) -> None:
    try:
        if own_group:
            os.killpg(process.pid, signal.SIGKILL)
        else:
            process.kill()
    except (ProcessLookupError, PermissionError):
        pass
    process.wait()


_SPAWNER = _Spawner()


def spawn(command: list[str], **popen_kwargs) -> subprocess.Popen:
    """``subprocess.Popen(command, **popen_kwargs)`` for a child that dies with this process.

    ``preexec_fn`` is refused: it is exactly what this module exists to avoid. ``start_new_session``,
    ``env``, ``cwd``, pipes and ``text`` pass through (``setsid`` runs in C, before the shim).
    """
    if popen_kwargs.get("preexec_fn") is not None:
        raise ValueError("spawn() runs no preexec_fn: Python code between fork and exec hangs with gRPC loaded")
    popen_kwargs.pop("preexec_fn", None)
    return _SPAWNER.popen(command, popen_kwargs)


def run(
    command: list[str], *, input: str | bytes | None = None, timeout: float | None = None, check: bool = False, **kwargs
) -> subprocess.CompletedProcess:
    """``subprocess.run`` through :func:`spawn` (the child dies with this process; killed on timeout)."""
    if kwargs.pop("capture_output", False):
        kwargs.update(stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if input is not None:
        kwargs["stdin"] = subprocess.PIPE
    with spawn(command, **kwargs) as process:
        try:
            stdout, stderr = process.communicate(input, timeout=timeout)
        except BaseException:
            _kill(process, kwargs.get("start_new_session", False))
            raise
    done = subprocess.CompletedProcess(command, process.returncode, stdout, stderr)
    if check:
        done.check_returncode()
    return done
