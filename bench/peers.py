"""clip-triton side by side with what users would pick instead, every server up at once, measured
cell by cell in rounds:

    python bench/peers.py [--concurrency 1,4,16] [--batches 1,16] [--seconds 8] [--rounds 3] [--json FILE]
    python bench/peers.py --peers-venv .clip-triton/peers-venv   # with infinity-emb (see docs/benchmarks.md)

Same model size everywhere: ViT-B/32, 224 px, fp32, random weights (offline). Same load generator:
``--concurrency`` client threads, each sending requests back to back for ``--seconds`` and at least 3
requests, bodies built before timing (JPEG bytes or strings, ``--batches`` items per request). Same thread
budget: every server gets all cores (OMP/torch/ONNX Runtime/OpenVINO threads = cores); the load generator runs
beside it on the same machine, as it would for any of them. Systems:

* ``clip-triton gRPC`` (``ClipClient``, one per client thread) on the pip-installed Triton with each
  CPU runtime this machine supports: ONNX Runtime fp32, OpenVINO fp32 (the IR the export writes where
  OpenVINO is installed: what ``--cpu-runtime auto`` serves) and OpenVINO bf16 where the CPU has it;
* ``clip-triton gateway`` (HTTP ``/v1/embeddings``, images as base64 data URLs) in front of each;
* ``FastAPI + open_clip``: bench/peer_fastapi.py, the hand-rolled server (base64 JSON in);
* ``infinity-emb`` (torch engine, CPU), when ``--peers-venv`` holds it (bench/peer_infinity.py builds
  the HF CLIP it serves; its ``model_max_length`` is 77 so it does the same work).

Every system is probed first with a long text (50 one-token words) and its first 18 words: equal
embeddings mean the system truncated the text at 20 tokens (transformers' generic default) and the
row says so. Then ``--rounds`` times, for every cell (kind, batch, concurrency), every system in turn,
in an order that rotates from cell to cell and round to round, with every other server paused
(SIGSTOP; ``--no-pause-idle`` leaves them running): a ratio compares rates taken back to back, not a
whole run apart, on a machine whose speed drifts. Rows: the median over rounds of items/s and p50/p99
request latency, and each round's rate; against the peers, the median over rounds of each round's
ratio to the faster peer, its smallest, and the fp32 rows at concurrency >= 4 that stay behind.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import dataclasses
import http.client
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import bench_repo_options, prepared_export

from clip_triton.samples import BENCH_PROMPTS, image_bytes

HERE = Path(__file__).resolve().parent
PROBE_WORDS = ("cat dog red blue house tree car book sun moon " * 5).split()  # one BPE token each


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_http(port: int, path: str, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server on port {port} exited with {process.returncode}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", path)
            if conn.getresponse().status < 500:
                return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"server on port {port} did not answer {path} within {timeout} s")


@contextlib.contextmanager
def process(argv: list[str], port: int, health: str, log: Path, env: dict | None = None):
    from clip_triton.children import spawn

    with open(log, "wb") as out:  # tied to this process, started with no preexec_fn (clip_triton/children.py)
        proc = spawn(argv, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        wait_http(port, health, proc)
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 15)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()


class Http:
    """One keep-alive connection; ``send(body)`` returns the number of embeddings in the answer."""

    def __init__(self, port: int, path: str):
        self.conn, self.path = http.client.HTTPConnection("127.0.0.1", port, timeout=600), path

    def post(self, body: bytes) -> http.client.HTTPResponse:
        """POST on the kept-alive connection; once more on a fresh one when the server had closed it
        (uvicorn closes connections idle for 5 s: a thread waiting out the others' warm-up)."""
        for attempt in (1, 2):
            try:
                self.conn.request("POST", self.path, body, {"Content-Type": "application/json"})
                return self.conn.getresponse()
            except (BrokenPipeError, ConnectionResetError, http.client.RemoteDisconnected):
                self.conn.close()
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def send(self, body: bytes) -> int:
        response = self.post(body)
        data = response.read()
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {data[:300]!r}")
        return len(self.rows(json.loads(data)))

    @staticmethod
    def rows(answer: dict) -> list:
        if "embeddings" in answer:
            return answer["embeddings"]
        return [item["embedding"] for item in answer["data"]]

    def embed(self, body: bytes) -> np.ndarray:
        return np.asarray(self.rows(json.loads(self.post(body).read())), dtype=np.float32)


MIN_REQUESTS = 3  # per client thread and cell


def load(make_sender, bodies: list, concurrency: int, seconds: float, min_requests: int = MIN_REQUESTS) -> dict:
    """``concurrency`` threads sending ``bodies`` in turn for ``seconds``, and each for at least
    ``min_requests`` requests: items/s (every item sent, over the time until the last answer), p50/p99
    ms. The floor matters where one request takes longer than the cell (16 images at concurrency 16:
    11-15 s here): a cell of ``seconds`` alone would time one burst of the first requests, not a rate."""
    latencies: list[float] = []
    counts = [0] * concurrency
    errors: list[str] = []
    start_barrier = threading.Barrier(concurrency + 1)
    lock = threading.Lock()
    stop = threading.Event()

    def worker(index: int) -> None:
        send = make_sender()
        send(bodies[index % len(bodies)])  # connection and warm-up, untimed
        start_barrier.wait()
        mine, i = [], index
        while not stop.is_set() or len(mine) < min_requests:
            t0 = time.perf_counter()
            try:
                counts[index] += send(bodies[i % len(bodies)])
            except Exception as exc:  # noqa: BLE001 (reported in the row)
                errors.append(str(exc)[:200])
                return
            mine.append((time.perf_counter() - t0) * 1000)
            i += concurrency
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(concurrency)]
    for thread in threads:
        thread.start()
    start_barrier.wait()
    t0 = time.perf_counter()
    time.sleep(seconds)
    stop.set()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - t0
    if errors:
        return {"items_per_s": float("nan"), "p50_ms": float("nan"), "p99_ms": float("nan"), "error": errors[0]}
    return {
        "items_per_s": sum(counts) / elapsed,
        "p50_ms": statistics.median(latencies),
        "p99_ms": float(np.percentile(latencies, 99)),
    }


def mixed_texts(count: int, seed: int = 0) -> list[str]:
    """Zero-shot prompts and captions mixed as a search workload sends them: three in four are
    ImageNet prompts ("a photo of a {class}.": 6-20 tokens), one in four a caption of 10-35 words (13-60
    tokens), in a fixed shuffled order, so one request of 16 holds both."""
    from importlib import resources

    data = json.loads(resources.files("clip_triton").joinpath("assets", "imagenet_zeroshot.json").read_text())
    rng = np.random.default_rng(seed)
    classes, templates = data["classnames"], data["templates"]["openai"]
    words = [w for name in classes for w in name.split()]
    out = []
    for i in range(count):
        if i % 4 == 3:
            n = int(rng.integers(10, 36))
            out.append("a photograph of " + " ".join(words[int(j)] for j in rng.integers(0, len(words), size=n)))
        else:
            out.append(templates[int(rng.integers(len(templates)))].format(classes[int(rng.integers(len(classes)))]))
    return out


def describe_lengths(texts: list[str]) -> str:
    """The texts' token counts (CLIP BPE, with start and end tokens) by the default buckets."""
    from clip_triton.contract import TEXT_BUCKETS, TokenizerSpec
    from clip_triton.tokenizer import ClipTokenizer

    spec = TokenizerSpec(buckets=TEXT_BUCKETS)
    tok = ClipTokenizer(spec)
    needed = [min(len(tok.encode(t, limit=76)) + 2, 77) for t in texts]
    counts = {length: sum(spec.bucket(n) == length for n in needed) for length in spec.lengths}
    return (
        f"{len(texts)} texts, {min(needed)}-{max(needed)} tokens (median {int(np.median(needed))}); by bucket "
        + ", ".join(f"{length}: {n}" for length, n in counts.items())
    )


def probe_truncation(embed_texts) -> str:
    """'full' when a 50-token text differs from its first 18 words, 'cut at 20 tokens' when equal."""
    long, short = " ".join(PROBE_WORDS), " ".join(PROBE_WORDS[:18])
    a, b = embed_texts([long, short])
    cos = float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))
    return "cut at 20 tokens" if cos > 0.99999 else "full"


@dataclasses.dataclass
class System:
    """One measured row family: how to load it, how to embed texts for its probe, and the process
    groups it runs on (resumed for its own cells, paused for everyone else's)."""

    name: str
    precision: str
    version: str
    settings: str
    sender_for: Callable[[str, int], dict]
    embed_texts: Callable[[list[str]], np.ndarray]
    groups: tuple[int, ...]
    only: tuple[str, ...] | None = None
    truncation: str = ""
    bodies: dict = dataclasses.field(default_factory=dict)

    def senders(self, kind: str, batch: int) -> dict:
        if (kind, batch) not in self.bodies:
            self.bodies[kind, batch] = self.sender_for(kind, batch)
        return self.bodies[kind, batch]


# The Pauser's guard: resumes every paused group once the bench is gone. A stopped process runs no
# code: when the bench died by SIGKILL (or any death that skips its ``finally``), its servers got their
# death signal but their python stubs, paused with them, stayed stopped for good (reparented to init,
# state T; found after a CI run was killed). Resumed, each stub sees its server gone and exits.
GUARD = """
import os, signal, sys, time
parent, groups = int(sys.argv[1]), [int(g) for g in sys.argv[2:]]
while os.getppid() == parent:
    time.sleep(0.2)
for group in groups:
    try:
        os.killpg(group, signal.SIGCONT)
    except OSError:
        pass
"""


def exit_on_signals() -> None:
    """SIGTERM and SIGHUP end the bench through its ``finally`` blocks (as Ctrl-C does), so paused servers
    are resumed and stopped; Python's default for them ends the process on the spot."""

    def leave(signum, _frame):
        raise SystemExit(128 + signum)

    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, leave)


class Pauser:
    """SIGSTOP every server but the one measured (SIGCONT for its cells), so no idle peer's threads,
    timers or pollers run beside a cell; ``resume_all`` before anything stops them, ``close`` at the end.
    A guard process resumes them all if this process dies without doing so (:data:`GUARD`)."""

    def __init__(self, groups: list[int], enabled: bool):
        self.groups, self.enabled, self.stopped = sorted(set(groups)), enabled, set()
        self.guard = None
        if enabled and self.groups:  # plain Popen, no preexec_fn (clip_triton.children): it must outlive us
            self.guard = subprocess.Popen(
                [sys.executable, "-I", "-S", "-c", GUARD, str(os.getpid()), *map(str, self.groups)],
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # a Ctrl-C at the terminal must not end it before we resume
            )

    def only(self, wanted: tuple[int, ...]) -> None:
        if not self.enabled:
            return
        for group in self.groups:
            if group in wanted and group in self.stopped:
                os.killpg(group, signal.SIGCONT)
                self.stopped.discard(group)
        for group in self.groups:
            if group not in wanted and group not in self.stopped:
                os.killpg(group, signal.SIGSTOP)
                self.stopped.add(group)
        time.sleep(0.2)  # resumed servers catch up on their timers before the cell's warm-up

    def resume_all(self) -> None:
        for group in list(self.stopped):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(group, signal.SIGCONT)
            self.stopped.discard(group)

    def close(self) -> None:
        """Resume every server and end the guard (nothing is left for it to do)."""
        self.resume_all()
        if self.guard is not None:
            self.guard.kill()
            self.guard.wait()
            self.guard = None


def summarise(system: System, cell: tuple, results: list[dict]) -> dict:
    """One row from a cell's rounds: the median rate and latencies, every round's rate kept."""
    kind, batch, concurrency = cell
    good = [r for r in results if "error" not in r]
    row = {
        "system": system.name,
        "precision": system.precision,
        "kind": kind,
        "batch": batch,
        "concurrency": concurrency,
        "version": system.version,
        "settings": system.settings,
        "long_text": system.truncation,
        "rounds": [r["items_per_s"] for r in results],
    }
    if len(good) < len(results):
        return {
            **row,
            "items_per_s": float("nan"),
            "p50_ms": float("nan"),
            "p99_ms": float("nan"),
            "error": next(r["error"] for r in results if "error" in r),
        }
    return {
        **row,
        "items_per_s": statistics.median(r["items_per_s"] for r in good),
        "p50_ms": statistics.median(r["p50_ms"] for r in good),
        "p99_ms": statistics.median(r["p99_ms"] for r in good),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--concurrency", default="1,4,16")
    parser.add_argument("--batches", default="1,16", help="items per request")
    parser.add_argument(
        "--kinds",
        default="image,text,mixed",
        help="image (the bundled photos), text (short prompts), mixed (prompts and captions: see mixed_texts)",
    )
    parser.add_argument("--seconds", type=float, default=8.0, help="per cell and round")
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="times every cell is measured, the systems back to back in a rotating order each time; rows "
        "are medians, ratios the median of each round's ratio",
    )
    parser.add_argument(
        "--pause-idle",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="SIGSTOP every server but the one measured (no idle server runs beside a cell)",
    )
    parser.add_argument("--peers-venv", default=None, help="a virtualenv with infinity-emb (and transformers)")
    parser.add_argument(
        "--skip",
        action="append",
        default=[],
        metavar="SYSTEM",
        help="a system to leave out, by its row name (names hold commas: one --skip per system)",
    )
    parser.add_argument(
        "--openvino",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the OpenVINO rows: fp32 where OpenVINO is installed, bf16 where the CPU has it too",
    )
    parser.add_argument(
        "--fine-buckets",
        default="8,12,16,24,32",
        help="text buckets of an extra clip-triton gRPC row on ONNX Runtime ('' for none)",
    )
    parser.add_argument("--workdir", default=".clip-triton/bench")
    parser.add_argument("--json", default=None, help="also write every row to this file")
    args = parser.parse_args()
    exit_on_signals()
    if args.rounds < 1:
        parser.error("--rounds must be 1 or more")

    work = Path(args.workdir)
    onnx_dir = prepared_export(args.model, work)
    cores = os.cpu_count() or 1
    env = {**os.environ, "OMP_NUM_THREADS": str(cores), "MKL_NUM_THREADS": str(cores)}
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    kinds = [k for k in args.kinds.split(",") if k]
    skip = set(args.skip)
    mixed = mixed_texts(256)
    print(f"[peers] mixed texts: {describe_lengths(mixed)}", flush=True)
    items = {"image": image_bytes(), "text": list(BENCH_PROMPTS), "mixed": mixed}

    def payloads(kind: str, batch: int) -> list[list]:
        pool = items[kind]
        return [[pool[(i * batch + k) % len(pool)] for k in range(batch)] for i in range(16)]

    with contextlib.ExitStack() as stack:
        # Every server up at once, then measured cell by cell: each cell's systems back to back, so a
        # ratio compares rates taken minutes apart at most, not a whole run apart (this machine drifts).
        print("[peers] starting every system", flush=True)
        systems = start_systems(args, stack, work, onnx_dir, env, cores, payloads, skip)
        pauser = Pauser([g for s in systems for g in s.groups], args.pause_idle)
        stack.callback(pauser.close)  # runs first on the way out: stopped servers cannot stop
        failed = []
        for system in list(systems):
            pauser.only(system.groups)
            try:
                system.truncation = probe_truncation(system.embed_texts)
            except Exception as exc:  # noqa: BLE001 (one system's failure must not lose the others' rows)
                print(f"[peers] {system.name}: FAILED its probe: {type(exc).__name__}: {exc}", flush=True)
                failed.append({"system": system.name, "precision": system.precision, "error": f"probe failed: {exc}"})
                systems.remove(system)
                continue
            print(f"[peers] {system.name} ({system.precision}): long texts {system.truncation}", flush=True)
        cells = [(k, b, c) for k in kinds for b in batches for c in concurrencies]
        results: dict[tuple, list[dict]] = {}
        for round_index in range(args.rounds):
            for cell_index, cell in enumerate(cells):
                kind, batch, concurrency = cell
                here = [s for s in systems if s.only is None or kind in s.only]
                shift = (round_index + cell_index) % max(len(here), 1)
                for system in here[shift:] + here[:shift]:  # a rotating order: nobody always goes first
                    pauser.only(system.groups)
                    senders = system.senders(kind, batch)
                    result = load(senders["make"], senders["bodies"], concurrency, args.seconds)
                    results.setdefault((system.name, *cell), []).append(result)
                    print(
                        f"[peers] round {round_index + 1}/{args.rounds} {system.name:<46}{kind:<6} b{batch:<3} "
                        f"c{concurrency:<3} {result['items_per_s']:8.1f}/s  p50 {result['p50_ms']:8.1f} ms"
                        + (f"  ERROR {result['error']}" if "error" in result else ""),
                        flush=True,
                    )
        rows = [
            summarise(system, cell, results[(system.name, *cell)])
            for system in systems
            for cell in cells
            if (system.name, *cell) in results
        ]
    report(args, cores, rows, failed)


def start_systems(args, stack: contextlib.ExitStack, work: Path, onnx_dir: Path, env: dict, cores: int, payloads, skip):
    """Start every server (their stops registered on ``stack``) and return the systems to measure."""

    from clip_triton import __version__
    from clip_triton.client import ClipClient
    from clip_triton.cpuruntime import cpu_supports_bf16, openvino_installed
    from clip_triton.export import export_model
    from clip_triton.repository import write_repository
    from clip_triton.server import TritonServer

    systems: list[System] = []

    def data_url(blob: bytes) -> str:
        return "data:image/jpeg;base64," + base64.b64encode(blob).decode()

    # -- clip-triton on Triton, each CPU runtime ----------------------------------------------
    # (label, CPU runtime, precision, export): the default export, and for ONNX Runtime also an export
    # with finer text buckets (--fine-buckets), gRPC only: what the bucket granularity costs here.
    fine = tuple(int(b) for b in args.fine_buckets.split(",")) if args.fine_buckets else ()
    setups = [("onnxruntime", "onnxruntime", "fp32", onnx_dir)]
    if fine:
        fine_dir = work / f"onnx-{Path(args.model).stem}-buckets-{'-'.join(map(str, fine))}"
        export_model(args.model, "none", fine_dir, reuse=True, text_buckets=fine)
        setups.append((f"onnxruntime, buckets {','.join(map(str, fine))}", "onnxruntime", "fp32", fine_dir))
    if args.openvino and openvino_installed() and (onnx_dir / "vision.xml").is_file():
        # fp32 too, equal precision with the peers: the IR converted from the module (issue 33's images)
        setups.append(("openvino fp32", "openvino", "fp32", onnx_dir))
    if cpu_supports_bf16() and args.openvino:
        setups.append(("openvino", "openvino", "bf16", onnx_dir))
    for label, cpu_runtime, precision, export_dir in setups:
        name = f"clip-triton gRPC, {label}"
        gateway_name = f"clip-triton gateway, {label}"
        grouped_name = f"{name}, client grouping"
        # the rows this server would carry: a client-grouping row on ONNX Runtime only, a gateway in
        # front of the default export only; none left after --skip, no server
        rows_here = [name] + [grouped_name] * (label == "onnxruntime") + [gateway_name] * (export_dir == onnx_dir)
        if all(n in skip for n in rows_here):
            continue
        tag = label.replace(", ", "-").replace(" ", "-").replace(",", "-")
        options = bench_repo_options(cpu_runtime=cpu_runtime, cpu_precision=precision)
        repo = write_repository(work / f"peers-repo-{tag}", onnx_dir=export_dir, options=options, force=True)
        # No response cache: the load repeats its bodies, and a cache would answer them, not the model.
        server = stack.enter_context(
            TritonServer(repo, log_file=work / f"peers-triton-{tag}.log", response_cache_mib=0)
        )
        assert server.process is not None
        buckets = json.loads((export_dir / "manifest.json").read_text())["contract"]["tokenizer"].get("buckets")
        version = f"clip-triton {__version__}, tritonserver 2.51 (pip), {cpu_runtime}"
        settings = (
            "dynamic batching, python-backend encoders, 1 instance x all cores; ClipClient per thread; "
            f"text buckets {buckets + [77] if buckets else [77]}"
        )

        def grpc_sender(kind: str, batch: int, url=server.grpc_url, grouped=None):
            def make():
                # the default client: texts in input order, since the server splits them by length
                # (facts.text_split); grouped=True: the client's own length grouping, concurrency 4
                # (the default): a call's length groups go out together
                client = ClipClient(url, batch_size=batch, prompt_cache_entries=0, group_by_length=grouped)
                embed = client.embed_images if kind == "image" else client.embed_texts
                return lambda batch_items: len(embed(batch_items))

            return {"make": make, "bodies": payloads(kind, batch)}

        def grpc_texts(texts, url=server.grpc_url):
            with ClipClient(url, prompt_cache_entries=0) as client:
                return client.embed_texts(texts)

        groups = (server.process.pid,)  # tritonserver leads its group, its stubs in it
        if name not in skip:
            systems.append(System(name, precision, version, settings, grpc_sender, grpc_texts, groups))
        if label == "onnxruntime" and grouped_name not in skip:
            # the client grouping texts by length bucket itself (issue 33), as it did by default before
            # the server split requests by length
            systems.append(
                System(
                    grouped_name,
                    precision,
                    version,
                    settings + "; group_by_length=True",
                    lambda kind, batch, sender=grpc_sender: sender(kind, batch, grouped=True),
                    grpc_texts,
                    groups,
                    only=("text", "mixed"),
                )
            )
        if gateway_name not in skip and export_dir == onnx_dir:
            port = free_port()
            argv = [sys.executable, "-m", "clip_triton.cli", "gateway", "--url", server.grpc_url]
            argv += ["--port", str(port), "--no-auth"]
            proc = stack.enter_context(process(argv, port, "/healthz", work / f"peers-gateway-{tag}.log", env))
            served = json.loads(_get(port, "/v1/models"))["data"][0]["id"]

            def gateway_sender(kind: str, batch: int, port=port, served=served):
                bodies = [
                    json.dumps(
                        {"model": served, "input": [data_url(x) if kind == "image" else x for x in batch_items]}
                    ).encode()
                    for batch_items in payloads(kind, batch)
                ]
                return {"make": lambda: Http(port, "/v1/embeddings").send, "bodies": bodies}

            def gateway_texts(texts, port=port, served=served):
                return Http(port, "/v1/embeddings").embed(json.dumps({"model": served, "input": texts}).encode())

            systems.append(
                System(
                    gateway_name,
                    precision,
                    version + ", gateway (FastAPI)",
                    "HTTP /v1/embeddings, base64 data URLs",
                    gateway_sender,
                    gateway_texts,
                    (*groups, proc.pid),
                )
            )

    # -- FastAPI + open_clip ----------------------------------------------------------------------
    if "FastAPI + open_clip" not in skip:
        import fastapi
        import open_clip
        import torch

        port = free_port()
        argv = [sys.executable, str(HERE / "peer_fastapi.py"), "--model", args.model, "--port", str(port)]
        argv += ["--threads", str(cores)]
        proc = stack.enter_context(process(argv, port, "/health", work / "peers-fastapi.log", env))

        def fastapi_sender(kind: str, batch: int, port=port):
            key = "images" if kind == "image" else "texts"
            bodies = [
                json.dumps(
                    {key: [base64.b64encode(x).decode() if kind == "image" else x for x in batch_items]}
                ).encode()
                for batch_items in payloads(kind, batch)
            ]
            return {"make": lambda: Http(port, "/embed").send, "bodies": bodies}

        def fastapi_texts(texts, port=port):
            return Http(port, "/embed").embed(json.dumps({"texts": texts}).encode())

        systems.append(
            System(
                "FastAPI + open_clip",
                "fp32",
                f"fastapi {fastapi.__version__}, open_clip {open_clip.__version__}, torch {torch.__version__}",
                f"uvicorn, 1 worker, sync handlers, torch threads {cores}",
                fastapi_sender,
                fastapi_texts,
                (proc.pid,),
            )
        )

    # -- infinity-emb ---------------------------------------------------------------------------
    if args.peers_venv and "infinity-emb (torch)" not in skip and "infinity-emb" not in skip:
        python = Path(args.peers_venv) / "bin" / "python"
        model_dir = work / "peers-hf-clip-b32"
        if not (model_dir / "config.json").is_file():
            subprocess.run([str(python), str(HERE / "peer_infinity.py"), "--out", str(model_dir)], check=True, env=env)
        port = free_port()
        infinity = shutil.which("infinity_emb", path=str(Path(args.peers_venv) / "bin"))
        argv = [infinity, "v2", "--model-id", str(model_dir.resolve()), "--served-model-name", "clip"]
        argv += ["--engine", "torch", "--device", "cpu", "--port", str(port), "--no-bettertransformer"]
        version = subprocess.run(
            [
                str(python),
                "-c",
                "import infinity_emb, torch, transformers; print(f'infinity-emb {infinity_emb.__version__}, torch {torch.__version__}, transformers {transformers.__version__}')",
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        infinity_env = {**env, "INFINITY_ANONYMOUS_USAGE_STATS": "0", "HF_HUB_OFFLINE": "1"}
        proc = stack.enter_context(process(argv, port, "/health", work / "peers-infinity.log", infinity_env))

        def infinity_sender(kind: str, batch: int, port=port):
            bodies = [
                json.dumps(
                    {
                        "model": "clip",
                        "input": [data_url(x) if kind == "image" else x for x in batch_items],
                        "modality": "image" if kind == "image" else "text",
                    }
                ).encode()
                for batch_items in payloads(kind, batch)
            ]
            return {"make": lambda: Http(port, "/embeddings").send, "bodies": bodies}

        def infinity_texts(texts, port=port):
            return Http(port, "/embeddings").embed(
                json.dumps({"model": "clip", "input": texts, "modality": "text"}).encode()
            )

        systems.append(
            System(
                "infinity-emb (torch)",
                "fp32",
                version,
                f"torch engine, CPU, default batching, {cores} threads",
                infinity_sender,
                infinity_texts,
                (proc.pid,),
            )
        )
    return systems


PEERS = ("FastAPI + open_clip", "infinity-emb (torch)")


def paired_ratios(rows: list[dict]) -> dict[tuple, dict]:
    """Each clip-triton row against the faster peer of its cell, round by round (the rates a round
    took back to back): {(system, kind, batch, concurrency): {"median", "min", "peer": {name: median}}}."""
    by_key = {(r["system"], r["kind"], r["batch"], r["concurrency"]): r for r in rows}
    out = {}
    for r in rows:
        if not r["system"].startswith("clip-triton") or "error" in r:
            continue
        cell = (r["kind"], r["batch"], r["concurrency"])
        peer_rows = [by_key[(p, *cell)] for p in PEERS if (p, *cell) in by_key and "error" not in by_key[(p, *cell)]]
        if not peer_rows:
            continue
        per_peer = {
            p["system"]: statistics.median(a / b for a, b in zip(r["rounds"], p["rounds"], strict=True))
            for p in peer_rows
        }
        per_round = [ours / max(p["rounds"][i] for p in peer_rows) for i, ours in enumerate(r["rounds"])]
        out[(r["system"], *cell)] = {"median": statistics.median(per_round), "min": min(per_round), "peer": per_peer}
    return out


def report(args, cores: int, rows: list[dict], failed: list[dict]) -> None:
    base = {
        (r["kind"], r["batch"], r["concurrency"]): r["items_per_s"]
        for r in rows
        if r["system"] == "clip-triton gRPC, onnxruntime"
    }
    print(
        f"\n{args.model}, 224 px, random weights; {cores} cores; {args.seconds:g} s per cell, {args.rounds} rounds "
        "(medians); ratio to clip-triton gRPC (ONNX Runtime fp32)"
    )
    print(
        f"{'system':<46}{'prec':<6}{'kind':<6}{'batch':>6}{'conc':>6}{'items/s':>10}{'ratio':>7}{'p50 ms':>9}{'p99 ms':>9}"
        "  rounds (items/s)  long text"
    )
    for r in rows:
        ratio = r["items_per_s"] / base.get((r["kind"], r["batch"], r["concurrency"]), float("nan"))
        spread = " ".join(f"{x:.1f}" for x in r["rounds"])
        print(
            f"{r['system']:<46}{r['precision']:<6}{r['kind']:<6}{r['batch']:>6}{r['concurrency']:>6}"
            f"{r['items_per_s']:>10.1f}{ratio:>7.2f}{r['p50_ms']:>9.1f}{r['p99_ms']:>9.1f}  {spread:<17} {r['long_text']}"
        )
    ratios = paired_ratios(rows)
    if ratios:
        peers = [p for p in PEERS if any(r["system"] == p for r in rows)]
        print("\nclip-triton rows against every peer (median over rounds of each round's ratio, same cell)")
        print(
            f"{'system':<46}{'kind':<7}{'batch':>6}{'conc':>6}"
            + "".join(f"{'÷ ' + p.split()[0]:>14}" for p in peers)
            + f"{'÷ faster':>10}{'min':>7}"
        )
        for key, ratio in ratios.items():
            system, kind, batch, concurrency = key
            print(
                f"{system:<46}{kind:<7}{batch:>6}{concurrency:>6}"
                + "".join(f"{ratio['peer'].get(p, float('nan')):>14.2f}" for p in peers)
                + f"{ratio['median']:>10.2f}{ratio['min']:>7.2f}"
            )
        behind = [
            key
            for key, ratio in ratios.items()
            if key[3] >= 4
            and ratio["median"] < 1.0
            and "client grouping" not in key[0]
            and next(r["precision"] for r in rows if r["system"] == key[0]) == "fp32"
        ]
        print(
            "\nfp32 clip-triton rows at concurrency >= 4 behind the faster peer (median ratio < 1.0): "
            + ("; ".join(f"{s} {k} b{b} c{c} {ratios[(s, k, b, c)]['median']:.2f}" for s, k, b, c in behind) or "none")
        )
    print("\nversions and settings:")
    for system in dict.fromkeys(r["system"] for r in rows):
        first = next(r for r in rows if r["system"] == system)
        print(f"  {system}: {first['version']}; {first['settings']}")
    for r in failed:
        print(f"  {r['system']}: NOT MEASURED ({r['error']})")
    if args.json:
        keyed = {" | ".join(map(str, k)): v for k, v in ratios.items()}
        out = {
            "model": args.model,
            "cores": cores,
            "rounds": args.rounds,
            "rows": rows,
            "failed": failed,
            "ratios": keyed,
        }
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")


def _get(port: int, path: str) -> bytes:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("GET", path)
    return conn.getresponse().read()


if __name__ == "__main__":
    main()
