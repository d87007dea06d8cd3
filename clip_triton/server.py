"""Run the ``tritonserver`` shipped in the ``nvidia-pytriton`` wheel on a repository (CPU).

The wheel's python backend needs the stub built for our Python version beside
``libtriton_python.so``. Instead of changing the installed package, a backend folder is assembled in
the user's cache (symbolic links to the wheel's files) and passed with ``--backend-directory``.
Triton's python stub gets this package and the current environment's site-packages on PYTHONPATH.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from .children import spawn
from .errors import ClipTritonError

LOG = logging.getLogger("clip_triton.server")


def pytriton_root() -> Path:
    try:
        import pytriton  # noqa: PLC0415
    except ImportError as exc:
        raise ClipTritonError("nvidia-pytriton is not installed", "pip install 'clip-triton[serve]'") from exc
    root = Path(pytriton.__file__).parent / "tritonserver"
    if not (root / "bin" / "tritonserver").is_file():
        raise ClipTritonError(f"no tritonserver binary under {root}", "reinstall nvidia-pytriton==0.7.0")
    return root


def backend_directory(cache: Path | None = None) -> Path:
    """A ``backends/`` folder whose python backend has the stub for this Python version."""
    root = pytriton_root()
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = root / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise ClipTritonError(
            f"nvidia-pytriton ships no python backend stub for Python {version}", "use Python 3.8-3.13"
        )
    cache = cache or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "clip-triton"
    backends = cache / f"triton-backends-py{version}"
    python = backends / "python"
    python.mkdir(parents=True, exist_ok=True)
    links = {
        "libtriton_python.so": root / "backends" / "python" / "libtriton_python.so",
        "triton_python_backend_utils.py": root / "backends" / "python" / "triton_python_backend_utils.py",
        "triton_python_backend_stub": stub,
    }
    for name, target in links.items():
        link = python / name
        if link.is_symlink() and Path(os.readlink(link)) == target:
            continue
        link.unlink(missing_ok=True)
        link.symlink_to(target)
    return backends


def check_repository(repo: Path) -> list[str]:
    """Models in ``repo``; raise with the next step when something Triton needs is missing."""
    from .repository import parse  # noqa: PLC0415

    if not repo.is_dir():
        raise ClipTritonError(f"model repository {repo} not found", "write one with `clip-triton repo`")
    models = []
    for config_path in sorted(repo.glob("*/config.pbtxt")):
        folder = config_path.parent
        config = parse(config_path.read_text())
        models.append(config.name)
        version = folder / "1"
        if config.platform == "tensorrt_plan":
            raise ClipTritonError(
                f"{folder.name} is a TensorRT engine model; the pip-installed Triton has no TensorRT backend",
                "on this machine write a CPU repository: clip-triton repo --runtime python --onnx-dir DIR --out REPO",
            )
        if config.platform == "onnxruntime_onnx" or config.backend == "openvino":
            backend = "ONNX Runtime" if config.platform else "OpenVINO"
            runtime = "onnxruntime" if config.platform else "openvino"
            raise ClipTritonError(
                f"{folder.name} uses Triton's {backend} backend, which the pip-installed Triton lacks",
                f"use --runtime python here (--cpu-runtime {runtime}), or the NGC Triton container for --runtime {runtime}",
            )
        if config.backend == "python":
            if not (version / "model.py").is_file():
                raise ClipTritonError(
                    f"{version / 'model.py'} missing", "rewrite the repository with `clip-triton repo`"
                )
            graph = config.parameters["graph_file"].string_value if "graph_file" in config.parameters else ""
            if graph and not (version / graph).is_file():
                raise ClipTritonError(
                    f"{version / graph} missing: the repository has no exported graph",
                    "run `clip-triton export --onnx-dir DIR`, then `clip-triton repo --runtime python --onnx-dir DIR`",
                )
    if not models:
        raise ClipTritonError(f"{repo} holds no model (no */config.pbtxt)", "write one with `clip-triton repo`")
    return models


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` distinct free ports: all probe sockets stay open until every port is chosen."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((host, 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def free_port(host: str = "127.0.0.1") -> int:
    return free_ports(1, host)[0]


def _check_port(host: str, port: int, what: str) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            raise ClipTritonError(
                f"{what} port {port} on {host} is already in use",
                f"stop what listens there or pass another --{what}-port",
            ) from None


def stub_pythonpath() -> str:
    package_parent = Path(__file__).resolve().parent.parent
    paths = [str(package_parent), sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
    if os.environ.get("PYTHONPATH"):
        paths.append(os.environ["PYTHONPATH"])
    return os.pathsep.join(dict.fromkeys(paths))


# Triton's admin APIs: anyone who reaches the ports could change log settings and tracing, register
# shared memory of any key, list the repository. They answer only requests carrying the header
# `clip-triton-admin` (HTTP) / `triton-grpc-protocol-clip-triton-admin` (gRPC metadata) with the
# server's admin key: CLIP_TRITON_ADMIN_KEY, or a random one per start (closed to all). Statistics
# stay open: they are read-only, the metrics port publishes the same numbers, and perf_analyzer
# reads them over gRPC, where it cannot send headers.
ADMIN_APIS = ("model-repository", "shared-memory", "trace", "logging")
# Triton's local response cache: a text request of 16 prompts costs ~16 x 4 x embed_dim bytes (80 KiB
# for bigG), so 256 MiB keeps ~3000 such requests. docker-compose.yml and the k8s Deployment repeat it
# (--cache-config=local,size=268435456); tests/test_gpu_path.py keeps them equal.
DEFAULT_RESPONSE_CACHE_MIB = 256
ADMIN_HEADER = "clip-triton-admin"
# Environment variables never passed to tritonserver and its stubs (issue 27): CLIP_TRITON_ADMIN_KEY,
# CLIP_TRITON_API_KEYS, HF_TOKEN, AWS_SECRET_ACCESS_KEY, ... The admin key itself must reach Triton on
# its command line (--http-restricted-api has no file form): see README, "admin APIs".
# Whole name parts, so TOKENIZERS_PARALLELISM (read by the tokenizer stubs) stays.
SECRET_NAME = re.compile(r"(?i)(^|_)(KEYS?|TOKENS?|SECRETS?|PASSWORD|PASSWD|CREDENTIALS?)(_|$)")
# `serve` restarts a crashed tritonserver, but not forever: this many crashes within the window stop it.
CRASH_LIMIT, CRASH_WINDOW_S = 5, 600.0


# Triton's python backend keeps each model instance's messages in a shared-memory region under
# /dev/shm. A graceful stop removes them; a SIGKILLed tritonserver leaves them behind, and they are RAM:
# a busy CI machine collected 619 of them (8.6 GB) until an export was OOM-killed. Every server gets
# its own name prefix (owner pid + token), stop() removes its regions, and every start and stop
# removes the regions of owners that are dead and that no live process still maps.
SHM_DIR = Path("/dev/shm")
SHM_PREFIX = "clip_triton_"
# The containers (docker-compose.yml, deploy/k8s) run one tritonserver each and name its regions with
# this fixed prefix, so their command removes a killed predecessor's before it starts: Kubernetes
# keeps a memory-backed /dev/shm across container restarts. Not a pid, so sweep_stale_shm skips it.
CONTAINER_SHM_PREFIX = f"{SHM_PREFIX}container_"


def shm_prefix_for(owner: int) -> str:
    """The python backend's region prefix for a server started by process ``owner``."""
    return f"{SHM_PREFIX}{owner}_{secrets.token_hex(4)}_"


def shm_regions(prefix: str = SHM_PREFIX) -> list[Path]:
    """This user's python-backend regions whose names start with ``prefix``."""
    if not SHM_DIR.is_dir():
        return []
    uid = os.getuid()
    found = []
    for path in SHM_DIR.glob(f"{prefix}*"):
        with contextlib.suppress(OSError):
            if path.stat().st_uid == uid:
                found.append(path)
    return sorted(found)


def _mapped_shm_names() -> set[str]:
    """Names of /dev/shm files some process of this user maps (those it may not read are unknown)."""
    names: set[str] = set()
    for maps in Path("/proc").glob("[0-9]*/maps"):
        with contextlib.suppress(OSError):
            for line in maps.read_text(errors="replace").splitlines():
                where = line.find(f"{SHM_DIR}/")
                if where >= 0:
                    names.add(line[where + len(str(SHM_DIR)) + 1 :].split(" ")[0])
    return names


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def release_shm(prefix: str) -> int:
    """Remove the regions of one stopped server; returns how many."""
    removed = 0
    for path in shm_regions(prefix):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            removed += 1
    return removed


def sweep_stale_shm() -> int:
    """Remove regions left by servers whose owner is dead (SIGKILL of `serve` or of a test run) and
    that no live process maps (their tritonserver and stubs are gone too). Returns how many."""
    stale = []
    for path in shm_regions():
        owner = path.name[len(SHM_PREFIX) :].split("_", 1)[0]
        if owner.isdigit() and not _alive(int(owner)):
            stale.append(path)
    if not stale:
        return 0
    mapped = _mapped_shm_names()
    removed = 0
    for path in stale:
        if path.name not in mapped:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed += 1
    if removed:
        LOG.info("removed %d shared-memory regions left by killed tritonservers", removed)
    return removed


class TritonServer:
    """A local tritonserver process: ``with TritonServer(repo) as server: server.grpc_url``."""

    def __init__(
        self,
        repo: str | Path,
        *,
        http_port: int = 0,
        grpc_port: int = 0,
        metrics_port: int = 0,
        host: str = "127.0.0.1",
        log_verbose: int = 0,
        log_file: str | Path | None = None,
        extra_args: tuple[str, ...] = (),
        admin_key: str | None = None,
        restricted_apis: tuple[str, ...] = ADMIN_APIS,
        response_cache_mib: float = DEFAULT_RESPONSE_CACHE_MIB,
    ):
        self.repo = Path(repo).resolve()
        self.host = host
        spare = iter(free_ports(3, host))
        self.http_port = http_port or next(spare)
        self.grpc_port = grpc_port or next(spare)
        self.metrics_port = metrics_port or next(spare)
        self.log_verbose = log_verbose
        self.log_file = Path(log_file) if log_file else None
        self.extra_args = tuple(extra_args)
        self.admin_key = admin_key or os.environ.get("CLIP_TRITON_ADMIN_KEY") or secrets.token_hex(24)
        self.restricted_apis = tuple(restricted_apis)
        if response_cache_mib < 0:
            raise ClipTritonError("--response-cache-mib must be 0 (off) or more")
        self.response_cache_bytes = int(response_cache_mib * 1024**2)
        self.process: subprocess.Popen | None = None
        self.shm_prefix = shm_prefix_for(os.getpid())

    @property
    def http_admin_headers(self) -> dict[str, str]:
        """HTTP headers that open the restricted admin APIs."""
        return {ADMIN_HEADER: self.admin_key}

    @property
    def grpc_admin_headers(self) -> dict[str, str]:
        """gRPC metadata that opens them: Triton prefixes the key with ``triton-grpc-protocol-``."""
        return {f"triton-grpc-protocol-{ADMIN_HEADER}": self.admin_key}

    @property
    def http_url(self) -> str:
        return f"{self.host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host}:{self.metrics_port}/metrics"

    def command(self) -> list[str]:
        root = pytriton_root()
        return [
            str(root / "bin" / "tritonserver"),
            f"--model-repository={self.repo}",
            f"--backend-directory={backend_directory()}",
            "--model-control-mode=none",
            "--strict-readiness=true",
            "--exit-on-error=true",
            f"--http-address={self.host}",
            f"--grpc-address={self.host}",
            f"--metrics-address={self.host}",
            f"--http-port={self.http_port}",
            f"--grpc-port={self.grpc_port}",
            f"--metrics-port={self.metrics_port}",
            "--allow-metrics=true",
            "--allow-cpu-metrics=true",
            "--allow-gpu-metrics=false",
            f"--log-verbose={self.log_verbose}",
            f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
            *self.cache_args(),
            *self.restriction_args(),
            *self.extra_args,
        ]

    def cache_args(self) -> list[str]:
        """Triton's local response cache, used by the models whose config enables it (clip_text). The
        pip-installed server looks for its cache library under /opt/tritonserver unless told where the
        wheel keeps it."""
        if not self.response_cache_bytes:
            return []
        return [
            f"--cache-directory={pytriton_root() / 'caches'}",
            f"--cache-config=local,size={self.response_cache_bytes}",
        ]

    def restriction_args(self) -> list[str]:
        if not self.restricted_apis:
            return []
        rule = f"{','.join(self.restricted_apis)}:{ADMIN_HEADER}={self.admin_key}"
        return [f"--http-restricted-api={rule}", f"--grpc-restricted-protocol={rule}"]

    def environment(self) -> dict[str, str]:
        """tritonserver's environment, which every python-backend stub inherits: this process's, less
        anything named like a secret (API and admin keys, tokens, passwords, cloud credentials). The
        stubs run the project's models and need none; a local repository needs none either."""
        env = {name: value for name, value in os.environ.items() if not SECRET_NAME.search(name)}
        libs = pytriton_root().parent.parent / "nvidia_pytriton.libs"
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (str(libs), env.get("LD_LIBRARY_PATH", "")) if p)
        env["PYTHONPATH"] = stub_pythonpath()
        env.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
        return env

    def start(self, timeout: float = 300) -> TritonServer:
        check_repository(self.repo)
        sweep_stale_shm()
        for what, port in (("http", self.http_port), ("grpc", self.grpc_port), ("metrics", self.metrics_port)):
            _check_port(self.host, port, what)
        if self.log_file is None:
            self.log_file = Path(tempfile.mkstemp(prefix="tritonserver-", suffix=".log")[1])
        self._log_handle = open(self.log_file, "ab")  # noqa: SIM115 (closed in stop())
        # Started through the exec shim (clip_triton/children.py): no Python runs between fork and exec
        # in this process, which may hold gRPC channels (a preexec_fn here hung a test run in fork() and
        # crashed a second start with -11), and tritonserver gets SIGKILL when this process dies, from
        # whichever thread started it (the watchdog's restarts included). Its own session: stop() ends
        # tritonserver and its python stubs as one group.
        self.process = spawn(
            self.command(),
            env=self.environment(),
            stdout=self._log_handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            self.wait_ready(timeout)
        except BaseException:  # Ctrl-C or a failed start: never leave the server (own session) behind
            self.stop(timeout=5)
            raise
        return self

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise ClipTritonError(
                    f"tritonserver exited with code {self.process.returncode} while starting:\n{self.log_tail()}",
                    f"full log: {self.log_file}",
                )
            if self.ready():
                return
            time.sleep(0.25)
        tail = self.log_tail()
        self.stop()
        raise ClipTritonError(f"tritonserver not ready after {timeout:.0f}s:\n{tail}", f"full log: {self.log_file}")

    def log_tail(self, lines: int = 25) -> str:
        if not self.log_file or not self.log_file.exists():
            return ""
        return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, timeout: float = 30) -> None:
        if self.process is None:
            return
        group = self.process.pid  # start_new_session: tritonserver leads its group; the stubs join it
        if self.process.poll() is None:
            os.killpg(group, signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(group, signal.SIGKILL)
                self.process.wait()
        # A stub that Triton launched while it was shutting down (Ctrl-C during start-up) missed the
        # SIGTERM and would outlive it, orphaned: clear whatever is left of the group.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, signal.SIGKILL)
        self.process = None
        release_shm(self.shm_prefix)  # a graceful exit removed them; a killed server did not
        sweep_stale_shm()
        if getattr(self, "_log_handle", None):
            self._log_handle.close()

    def __enter__(self) -> TritonServer:
        return self.start() if self.process is None else self

    def __exit__(self, *exc) -> None:
        self.stop()

    def restart(self, timeout: float = 300, grace: float = 5.0) -> None:
        """Stop and start again on the same ports (clients retrying UNAVAILABLE reconnect).

        A server being restarted is broken: it gets ``grace`` seconds, not Triton's 30 s exit timeout
        (which a model with a dead stub always runs out), before it is killed.
        """
        self.stop(timeout=grace)
        self.start(timeout)

    def watchdog_step(
        self, state: dict, failures_before_restart: int = 2, timeout: float = 300, canary_timeout: float = 10.0
    ) -> bool:
        """One liveness check; True if it restarted the server.

        Restart only on evidence of death: tritonserver exited (at once), or :func:`health.probe` found
        it dead (a stub that is not healthy, no answer at all, or a failed canary while no request
        completed) ``failures_before_restart`` times in a row. A busy server whose canary misses its
        deadline while requests keep completing is left alone.
        """
        from .health import probe  # noqa: PLC0415

        if self.process is None or self.process.poll() is not None:
            code = self.process.returncode if self.process is not None else None
            return self._restart_after(state, f"tritonserver exited with code {code}", timeout)
        alive, reason = probe(self.grpc_url, self.metrics_url, timeout=canary_timeout, counter=state)
        if alive:
            state["failures"] = 0
            if reason != "ok":
                state["busy"] = state.get("busy", 0) + 1
                _say(f"watchdog: {reason}; not restarting")
            return False
        state["failures"] = state.get("failures", 0) + 1
        if state["failures"] < failures_before_restart:
            _say(f"watchdog: {reason} (check {state['failures']} of {failures_before_restart})")
            return False
        return self._restart_after(state, reason, timeout)

    def _restart_after(self, state: dict, reason: str, timeout: float) -> bool:
        now = time.monotonic()
        recent = [t for t in state.get("restart_times", []) if now - t < CRASH_WINDOW_S]
        if len(recent) >= CRASH_LIMIT:
            raise ClipTritonError(
                f"tritonserver failed {len(recent)} times in {CRASH_WINDOW_S:.0f} s; last: {reason}\n{self.log_tail()}",
                f"full log: {self.log_file}",
            )
        _say(f"watchdog: {reason}; restarting tritonserver")
        self.restart(timeout)
        state.update(failures=0, restarts=state.get("restarts", 0) + 1, restart_times=[*recent, now])
        _say("watchdog: ready again")
        return True

    def run_foreground(
        self, timeout: float = 300, watchdog_interval: float = 15.0, canary_timeout: float = 10.0
    ) -> int:
        """``clip-triton serve``: start, print the endpoints, watch, stop cleanly on Ctrl-C/SIGTERM.

        A tritonserver that exits is restarted at once (at most ``CRASH_LIMIT`` times in
        ``CRASH_WINDOW_S``). Every ``watchdog_interval`` seconds a liveness probe runs (0: none); it
        restarts the server only on evidence of death (see :meth:`watchdog_step`). Each restart and
        each return to service is logged.
        """
        self.log_file = None
        signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
        state: dict = {}
        try:
            print(f"starting tritonserver on {self.repo} ...", flush=True)
            self.start(timeout)
            print(
                json.dumps(
                    {
                        "http": self.http_url,
                        "grpc": self.grpc_url,
                        "metrics": self.metrics_url,
                        "log": str(self.log_file),
                    }
                ),
                flush=True,
            )
            print("ready; Ctrl-C stops the server", flush=True)
            next_check = time.monotonic() + watchdog_interval
            while True:
                time.sleep(0.5)
                if self.process is None or self.process.poll() is not None:
                    self.watchdog_step(state, timeout=timeout)  # exited: restarts at once
                    next_check = time.monotonic() + watchdog_interval
                elif watchdog_interval and time.monotonic() >= next_check:
                    self.watchdog_step(state, timeout=timeout, canary_timeout=canary_timeout)
                    next_check = time.monotonic() + watchdog_interval
        except ClipTritonError as exc:
            print(f"error: {exc}", file=sys.stderr, flush=True)
            self.stop(timeout=5)
            return 1
        except KeyboardInterrupt:
            print("stopping tritonserver ...", flush=True)
            self.stop()
            return 0


def _say(message: str) -> None:
    """Watchdog and lifecycle events: logged (the CLI shows them on stderr)."""
    LOG.warning(message)
