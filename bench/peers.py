"""clip-triton side by side with what users would pick instead, one run, one server at a time:

    python bench/peers.py [--concurrency 1,4,16] [--batches 1,16] [--seconds 8] [--json FILE]
    python bench/peers.py --peers-venv .clip-triton/peers-venv   # with infinity-emb (see docs/benchmarks.md)

Same model size everywhere: ViT-B/32, 224 px, fp32, random weights (offline). Same load generator:
``--concurrency`` client threads, each sending requests back to back for ``--seconds`` and at least 3
requests, bodies built before timing (JPEG bytes or strings, ``--batches`` items per request). Same thread budget: every
server gets all cores (OMP/torch/ONNX Runtime/OpenVINO threads = cores); the load generator runs
beside it on the same machine, as it would for any of them. Systems:

* ``clip-triton gRPC`` (``ClipClient``, one per client thread) on the pip-installed Triton with each
  CPU runtime this machine supports: ONNX Runtime fp32 (default) and OpenVINO bf16 (marked bf16);
* ``clip-triton gateway`` (HTTP ``/v1/embeddings``, images as base64 data URLs) in front of the first;
* ``FastAPI + open_clip``: bench/peer_fastapi.py, the hand-rolled server (base64 JSON in);
* ``infinity-emb`` (torch engine, CPU), when ``--peers-venv`` holds it (bench/peer_infinity.py builds
  the HF CLIP it serves; its ``model_max_length`` is 77 so it does the same work).

Every system is probed first with a long text (50 one-token words) and its first 18 words: equal
embeddings mean the system truncated the text at 20 tokens (transformers' generic default) and the
row says so. Rows: items/s, p50/p99 request latency; the ratio is to clip-triton gRPC (ONNX Runtime
fp32) in the same cell.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import http.client
import importlib.util
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import prepared_export

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
    parser.add_argument("--seconds", type=float, default=8.0, help="per cell")
    parser.add_argument("--peers-venv", default=None, help="a virtualenv with infinity-emb (and transformers)")
    parser.add_argument("--skip", default="", help="comma-separated system names to leave out")
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

    import clip_triton.client
    import clip_triton.repository  # noqa: F401
    from clip_triton import __version__
    from clip_triton.client import ClipClient
    from clip_triton.cpuruntime import cpu_supports_bf16
    from clip_triton.export import export_model
    from clip_triton.repository import RepoOptions, write_repository
    from clip_triton.server import TritonServer

    work = Path(args.workdir)
    onnx_dir = prepared_export(args.model, work)
    cores = os.cpu_count() or 1
    env = {**os.environ, "OMP_NUM_THREADS": str(cores), "MKL_NUM_THREADS": str(cores)}
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    photos = image_bytes()
    prompts = list(BENCH_PROMPTS)
    mixed = mixed_texts(256)
    kinds = [k for k in args.kinds.split(",") if k]
    skip = set(filter(None, args.skip.split(",")))
    print(f"[peers] mixed texts: {describe_lengths(mixed)}", flush=True)

    def payloads(kind: str, batch: int) -> list[list]:
        items = {"image": photos, "text": prompts, "mixed": mixed}[kind]
        return [[items[(i * batch + k) % len(items)] for k in range(batch)] for i in range(16)]

    rows: list[dict] = []

    def measure(system: str, precision: str, version: str, settings: str, sender_for, embed_texts, only=None) -> None:
        try:
            truncation = probe_truncation(embed_texts)
        except Exception as exc:  # noqa: BLE001 (one system's failure must not lose the others' rows)
            print(f"[peers] {system}: FAILED its probe: {type(exc).__name__}: {exc}", flush=True)
            rows.append({"system": system, "precision": precision, "error": f"probe failed: {exc}"})
            return
        print(f"[peers] {system} ({precision}): long texts {truncation}", flush=True)
        for kind in [k for k in kinds if only is None or k in only]:
            for batch in batches:
                bodies = sender_for(kind, batch)
                for concurrency in concurrencies:
                    result = load(bodies["make"], bodies["bodies"], concurrency, args.seconds)
                    row = {
                        "system": system,
                        "precision": precision,
                        "kind": kind,
                        "batch": batch,
                        "concurrency": concurrency,
                        "version": version,
                        "settings": settings,
                        "long_text": truncation,
                        **result,
                    }
                    rows.append(row)
                    print(
                        f"[peers] {system:<34}{kind:<6} b{batch:<3} c{concurrency:<3} "
                        f"{result['items_per_s']:8.1f}/s  p50 {result['p50_ms']:8.1f} ms  p99 {result['p99_ms']:8.1f} ms"
                        + (f"  ERROR {result['error']}" if "error" in result else ""),
                        flush=True,
                    )

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
    if args.openvino and importlib.util.find_spec("openvino") and (onnx_dir / "vision.xml").is_file():
        # fp32 too, equal precision with the peers: the IR converted from the module (issue 33's images)
        setups.append(("openvino fp32", "openvino", "fp32", onnx_dir))
    if cpu_supports_bf16() and args.openvino:
        setups.append(("openvino", "openvino", "bf16", onnx_dir))
    for label, cpu_runtime, precision, export_dir in setups:
        name = f"clip-triton gRPC, {label}"
        options = RepoOptions(runtime="python", cpu_runtime=cpu_runtime, cpu_precision=precision, response_cache="none")
        tag = label.replace(", ", "-").replace(" ", "-").replace(",", "-")
        repo = write_repository(work / f"peers-repo-{tag}", onnx_dir=export_dir, options=options, force=True)
        # No response cache: the load repeats its bodies, and a cache would answer them, not the model.
        with TritonServer(repo, log_file=work / f"peers-triton-{tag}.log", response_cache_mib=0) as server:
            buckets = json.loads((export_dir / "manifest.json").read_text())["contract"]["tokenizer"].get("buckets")
            version = f"clip-triton {__version__}, tritonserver 2.51 (pip), {cpu_runtime}"
            settings = (
                "dynamic batching, python-backend encoders, 1 instance x all cores; ClipClient per thread; "
                f"text buckets {buckets + [77] if buckets else [77]}"
            )
            if name not in skip:

                def grpc_sender(kind: str, batch: int, url=server.grpc_url, grouped=None):
                    def make():
                        # the default client: texts in input order, since the server splits them by
                        # length (facts.text_split); grouped=True: the client's own length grouping,
                        # concurrency 4 (the default): a call's length groups go out together
                        client = ClipClient(url, batch_size=batch, prompt_cache_entries=0, group_by_length=grouped)
                        embed = client.embed_images if kind == "image" else client.embed_texts
                        return lambda items: len(embed(items))

                    return {"make": make, "bodies": payloads(kind, batch)}

                with ClipClient(server.grpc_url, prompt_cache_entries=0) as probe_client:
                    measure(name, precision, version, settings, grpc_sender, probe_client.embed_texts)
                    if label == "onnxruntime" and f"{name}, client grouping" not in skip:
                        # the client grouping texts by length bucket itself (issue 33), as it did by
                        # default before the server split requests by length
                        measure(
                            f"{name}, client grouping",
                            precision,
                            version,
                            settings + "; group_by_length=True",
                            lambda kind, batch: grpc_sender(kind, batch, grouped=True),
                            probe_client.embed_texts,
                            only=("text", "mixed"),
                        )
            gateway_name = f"clip-triton gateway, {label}"
            if gateway_name not in skip and export_dir == onnx_dir:
                port = free_port()
                argv = [
                    sys.executable,
                    "-m",
                    "clip_triton.cli",
                    "gateway",
                    "--url",
                    server.grpc_url,
                    "--port",
                    str(port),
                    "--no-auth",
                ]
                with process(argv, port, "/healthz", work / f"peers-gateway-{tag}.log", env):
                    served = json.loads(_get(port, "/v1/models"))["data"][0]["id"]

                    def gateway_sender(kind: str, batch: int, port=port, served=served):
                        bodies = [
                            json.dumps(
                                {"model": served, "input": [data_url(x) if kind == "image" else x for x in items]},
                            ).encode()
                            for items in payloads(kind, batch)
                        ]
                        return {"make": lambda: Http(port, "/v1/embeddings").send, "bodies": bodies}

                    def gateway_texts(texts, port=port, served=served):
                        return Http(port, "/v1/embeddings").embed(
                            json.dumps({"model": served, "input": texts}).encode()
                        )

                    measure(
                        gateway_name,
                        precision,
                        version + ", gateway (FastAPI)",
                        "HTTP /v1/embeddings, base64 data URLs",
                        gateway_sender,
                        gateway_texts,
                    )

    # -- FastAPI + open_clip ----------------------------------------------------------------------
    if "FastAPI + open_clip" not in skip:
        import fastapi
        import open_clip
        import torch

        port = free_port()
        argv = [
            sys.executable,
            str(HERE / "peer_fastapi.py"),
            "--model",
            args.model,
            "--port",
            str(port),
            "--threads",
            str(cores),
        ]
        with process(argv, port, "/health", work / "peers-fastapi.log", env):

            def fastapi_sender(kind: str, batch: int, port=port):
                key = "images" if kind == "image" else "texts"
                bodies = [
                    json.dumps({key: [base64.b64encode(x).decode() if kind == "image" else x for x in items]}).encode()
                    for items in payloads(kind, batch)
                ]
                return {"make": lambda: Http(port, "/embed").send, "bodies": bodies}

            def fastapi_texts(texts, port=port):
                return Http(port, "/embed").embed(json.dumps({"texts": texts}).encode())

            version = f"fastapi {fastapi.__version__}, open_clip {open_clip.__version__}, torch {torch.__version__}"
            measure(
                "FastAPI + open_clip",
                "fp32",
                version,
                f"uvicorn, 1 worker, sync handlers, torch threads {cores}",
                fastapi_sender,
                fastapi_texts,
            )

    # -- infinity-emb ---------------------------------------------------------------------------
    if args.peers_venv and "infinity-emb" not in skip:
        python = Path(args.peers_venv) / "bin" / "python"
        model_dir = work / "peers-hf-clip-b32"
        if not (model_dir / "config.json").is_file():
            subprocess.run([str(python), str(HERE / "peer_infinity.py"), "--out", str(model_dir)], check=True, env=env)
        port = free_port()
        infinity = shutil.which("infinity_emb", path=str(Path(args.peers_venv) / "bin"))
        argv = [
            infinity,
            "v2",
            "--model-id",
            str(model_dir.resolve()),
            "--served-model-name",
            "clip",
            "--engine",
            "torch",
            "--device",
            "cpu",
            "--port",
            str(port),
            "--no-bettertransformer",
        ]
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
        with process(
            argv,
            port,
            "/health",
            work / "peers-infinity.log",
            {**env, "INFINITY_ANONYMOUS_USAGE_STATS": "0", "HF_HUB_OFFLINE": "1"},
        ):

            def infinity_sender(kind: str, batch: int, port=port):
                bodies = [
                    json.dumps(
                        {
                            "model": "clip",
                            "input": [data_url(x) if kind == "image" else x for x in items],
                            "modality": "image" if kind == "image" else "text",
                        }
                    ).encode()
                    for items in payloads(kind, batch)
                ]
                return {"make": lambda: Http(port, "/embeddings").send, "bodies": bodies}

            def infinity_texts(texts, port=port):
                return Http(port, "/embeddings").embed(
                    json.dumps({"model": "clip", "input": texts, "modality": "text"}).encode()
                )

            measure(
                "infinity-emb (torch)",
                "fp32",
                version,
                f"torch engine, CPU, default batching, {cores} threads",
                infinity_sender,
                infinity_texts,
            )

    # -- table --------------------------------------------------------------------------------------
    failed = [r for r in rows if "kind" not in r]
    rows = [r for r in rows if "kind" in r]
    base = {
        (r["kind"], r["batch"], r["concurrency"]): r["items_per_s"]
        for r in rows
        if r["system"] == "clip-triton gRPC, onnxruntime"
    }
    print(
        f"\n{args.model}, 224 px, random weights; {cores} cores; {args.seconds:g} s per cell; ratio to clip-triton gRPC (ONNX Runtime fp32)"
    )
    print(
        f"{'system':<36}{'prec':<6}{'kind':<6}{'batch':>6}{'conc':>6}{'items/s':>10}{'ratio':>7}{'p50 ms':>9}{'p99 ms':>9}  long text"
    )
    for r in rows:
        ratio = r["items_per_s"] / base.get((r["kind"], r["batch"], r["concurrency"]), float("nan"))
        print(
            f"{r['system']:<36}{r['precision']:<6}{r['kind']:<6}{r['batch']:>6}{r['concurrency']:>6}{r['items_per_s']:>10.1f}"
            f"{ratio:>7.2f}{r['p50_ms']:>9.1f}{r['p99_ms']:>9.1f}  {r['long_text']}"
        )
    peers = [p for p in ("FastAPI + open_clip", "infinity-emb (torch)") if any(r["system"] == p for r in rows)]
    if peers:
        rate = {(r["system"], r["kind"], r["batch"], r["concurrency"]): r["items_per_s"] for r in rows}
        print("\nclip-triton rows against every peer (items/s ratio, same cell)")
        print(
            f"{'system':<44}{'kind':<7}{'batch':>6}{'conc':>6}" + "".join(f"{'÷ ' + p.split()[0]:>14}" for p in peers)
        )
        for r in rows:
            if not r["system"].startswith("clip-triton"):
                continue
            cell = (r["kind"], r["batch"], r["concurrency"])
            ratios = [r["items_per_s"] / rate[(p, *cell)] if (p, *cell) in rate else float("nan") for p in peers]
            print(
                f"{r['system']:<44}{r['kind']:<7}{r['batch']:>6}{r['concurrency']:>6}"
                + "".join(f"{x:>14.2f}" for x in ratios)
            )
    print("\nversions and settings:")
    for system in dict.fromkeys(r["system"] for r in rows):
        first = next(r for r in rows if r["system"] == system)
        print(f"  {system}: {first['version']}; {first['settings']}")
    for r in failed:
        print(f"  {r['system']}: NOT MEASURED ({r['error']})")
    if args.json:
        report = {"model": args.model, "cores": cores, "rows": rows, "failed": failed}
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")


def _get(port: int, path: str) -> bytes:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("GET", path)
    return conn.getresponse().read()


if __name__ == "__main__":
    main()
