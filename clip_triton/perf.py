"""Run Triton's ``perf_analyzer`` (shipped in the ``tritonclient==2.51.0`` wheel) against the ensembles
with real input data (JPEG bytes for ``clip_image``, prompts for ``clip_text``), and read its CSV.

perf_analyzer needs Debian's ``libb64-0d`` and ``libcudart.so.12`` (from the
``nvidia-cuda-runtime-cu12`` wheel, found automatically when installed) on this CPU machine.

perf_analyzer cycles through its input data, so against an ensemble with Triton's response cache on
(``clip_text`` by default) it would measure cache hits: there every request gets its own prompt
(the sample prompts with two one-token words of their own, :data:`UNIQUE_TEXTS` of them), and a cached
``clip_image`` (``repo --response-cache all``) is refused with the way out.
"""

from __future__ import annotations

import base64
import csv
import ctypes.util
import json
import os
import secrets
import shutil
import struct
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .contract import IMAGE_INPUT, TEXT_INPUT, VISION, ensemble_tower
from .errors import ClipTritonError
from .samples import PERF_PROMPTS, image_bytes


@dataclass
class PerfResult:
    model: str
    batch_size: int
    concurrency: int
    requests_per_sec: float
    items_per_sec: float
    p50_ms: float
    p99_ms: float


def perf_analyzer_binary() -> Path:
    candidates = [Path(sys.prefix) / "bin" / "perf_analyzer", Path(shutil.which("perf_analyzer") or "")]
    for path in candidates:
        if path.is_file():
            return path
    raise ClipTritonError(
        "perf_analyzer not found", "pip install 'clip-triton[bench]' (tritonclient 2.51.0 ships the binary)"
    )


def perf_environment() -> dict[str, str]:
    env = dict(os.environ)
    dirs = []
    try:
        import nvidia.cuda_runtime  # noqa: PLC0415 (nvidia-cuda-runtime-cu12 wheel)

        dirs.append(str(Path(nvidia.cuda_runtime.__path__[0]) / "lib"))
    except ImportError:
        pass
    if not ctypes.util.find_library("b64"):
        raise ClipTritonError("perf_analyzer needs libb64.so.0d", "apt-get install libb64-0d")
    env["LD_LIBRARY_PATH"] = os.pathsep.join([*dirs, env.get("LD_LIBRARY_PATH", "")]).strip(os.pathsep)
    return env


# Distinct prompts per perf_analyzer run against a cached clip_text: more requests than one run sends
# (at 5,000 texts/s and batch 1, six 4 s windows are 120,000 requests; beyond that they cycle).
UNIQUE_TEXTS = 200_000


def input_data(
    model: str, images: list[bytes] | None = None, prompts: tuple[str, ...] = PERF_PROMPTS, unique: int = 0
) -> dict:
    """perf_analyzer's --input-data JSON: one entry per real item, cycled through by perf_analyzer.
    ``unique``: that many distinct texts (the prompts, each with a suffix of this run's own)."""
    tower = ensemble_tower(model)  # any served model's clip_image / clip_text
    if tower is VISION:
        if images is None:
            images = image_bytes()
        name, items = IMAGE_INPUT, images
    elif tower is not None:
        texts = list(prompts)
        if unique:
            texts = distinct_prompts(prompts, unique)
        name, items = TEXT_INPUT, [t.encode() for t in texts]
    else:
        raise ValueError(f"no sample data for {model}")
    # "b64" holds the raw tensor: for BYTES, each element is a 4-byte little-endian length + the bytes.
    return {"data": [{name: {"b64": base64.b64encode(struct.pack("<I", len(b)) + b).decode("ascii")}} for b in items]}


def run_perf_analyzer(
    url: str,
    model: str,
    *,
    batch_size: int = 1,
    concurrency: int = 1,
    measurement_ms: int = 4000,
    protocol: str = "grpc",
    images: list[bytes] | None = None,
    shared_memory: str = "none",
    timeout: float = 600,
    data: dict | None = None,
) -> PerfResult:
    """One perf_analyzer measurement at one batch size and concurrency.

    perf_analyzer stops with a non-zero exit at the first failed request, which raises here: a
    returned result means every request of the measurement succeeded.
    """
    if data is None:
        data = perf_input_data(url, model, images, protocol)
    with tempfile.TemporaryDirectory(prefix="clip-triton-perf-") as tmp:
        data_file = Path(tmp) / "input.json"
        data_file.write_text(json.dumps(data))
        csv_file = Path(tmp) / "result.csv"
        command = perf_command(
            url,
            model,
            data_file,
            batch_size=batch_size,
            concurrency=concurrency,
            measurement_ms=measurement_ms,
            csv_file=csv_file,
        )
        command[command.index("-i") + 1] = protocol
        command.append(f"--shared-memory={shared_memory}")
        done = subprocess.run(command, capture_output=True, text=True, env=perf_environment(), timeout=timeout)
        # A noisy machine (CI's 2 shared cores): windows twice as long, then four times as long with
        # twice the trials (a clean-clone run beside other load failed "Failed to obtain stable
        # measurement" after the first retry). The stability criterion itself stays as perf_command sets it.
        for factor, trials in ((2, None), (4, 12)):
            if done.returncode == 0 or "stable measurement" not in done.stdout + done.stderr:
                break
            command = [
                f"--measurement-interval={factor * measurement_ms}"
                if arg.startswith("--measurement-interval=")
                else f"--max-trials={trials}"
                if trials and arg.startswith("--max-trials=")
                else arg
                for arg in command
            ]
            done = subprocess.run(command, capture_output=True, text=True, env=perf_environment(), timeout=timeout)
        if done.returncode != 0 or not csv_file.exists():
            raise ClipTritonError(f"perf_analyzer failed ({done.returncode}): {(done.stderr or done.stdout)[-1500:]}")
        rows = list(csv.DictReader(csv_file.open()))
    row = rows[0]
    infer = float(row["Inferences/Second"])
    # perf_analyzer counts an inference per batch item; requests/s = inferences/s / batch size.
    return PerfResult(
        model=model,
        batch_size=batch_size,
        concurrency=concurrency,
        requests_per_sec=infer / batch_size,
        items_per_sec=infer,
        p50_ms=float(row["p50 latency"]) / 1000,
        p99_ms=float(row["p99 latency"]) / 1000,
    )


def distinct_prompts(prompts: tuple[str, ...], count: int) -> list[str]:
    """``count`` distinct texts: each prompt followed by two words that are one BPE token each (so a
    text is 2 tokens longer than its prompt, and stays in its length bucket or the next), the pairs
    starting at a random offset, so another run's texts are not in the cache either."""
    from .tokenizer import _load_vocab  # noqa: PLC0415

    encoder, _ = _load_vocab()
    words = sorted(t[:-4] for t in encoder if t.endswith("</w>") and t[:-4].isalpha() and 3 <= len(t) <= 10)
    words = words[:: max(1, len(words) // 2048)][:2048]
    start = secrets.randbelow(len(words) ** 2)
    out = []
    for i in range(count):
        pair = (start + i) % len(words) ** 2
        out.append(f"{prompts[i % len(prompts)]} {words[pair // len(words)]} {words[pair % len(words)]}")
    return out


def perf_input_data(url: str, model: str, images: list[bytes] | None = None, protocol: str = "grpc") -> dict:
    """The input data for one perf_analyzer run against the server at ``url``: distinct texts where
    ``clip_text`` is cached (:func:`response_cached`), the sample items otherwise."""
    return input_data(model, images, unique=UNIQUE_TEXTS if response_cached(url, model, protocol) else 0)


def response_cached(url: str, model: str, protocol: str = "grpc") -> bool:
    """Whether ``model`` answers repeated requests from Triton's response cache; refuses a cached
    ``clip_image`` (its photos would repeat, and perf_analyzer would time cache hits)."""
    if protocol == "grpc":
        import tritonclient.grpc as client_module  # noqa: PLC0415
    else:
        import tritonclient.http as client_module  # noqa: PLC0415

    def read(client, name: str) -> dict:
        config = client.get_model_config(name, as_json=True) if protocol == "grpc" else client.get_model_config(name)
        return config.get("config", config)  # gRPC wraps the config; HTTP answers it directly

    try:
        with client_module.InferenceServerClient(url) as client:
            config = read(client, model)
            # The cache sits at the inner ensemble that is the public one's step (clip_triton/repository.py
            # cached_towers); an older repository cached the public ensemble itself. Either way repeated
            # inputs are answered from it.
            steps = [step["model_name"] for step in config.get("ensemble_scheduling", {}).get("step", [])]
            cached = any(
                bool(c.get("response_cache", {}).get("enable"))
                for c in [config, *map(lambda n: read(client, n), steps)]
            )
    except Exception as exc:  # noqa: BLE001 (perf_analyzer would fail the same way, less clearly)
        raise ClipTritonError(
            f"cannot read {model}'s config at {url}: {exc}",
            "is the server up at that URL? A repository of several served models names its ensembles "
            "clip_image__<name>: pass --served-model NAME",
        ) from None
    if cached and ensemble_tower(model) is VISION:
        raise ClipTritonError(
            f"{model} answers repeated requests from Triton's response cache (repo --response-cache all): "
            "perf_analyzer cycles through a few photos and would time cache hits",
            "measure a repository written with --response-cache text (the default) or none",
        )
    return cached


def perf_command(
    url: str,
    model: str,
    data_file: str | Path,
    *,
    batch_size: int = 1,
    concurrency: int = 1,
    measurement_ms: int = 4000,
    csv_file: str | Path | None = None,
) -> list[str]:
    """The perf_analyzer command line for one measurement (real inputs from ``data_file``)."""
    name = IMAGE_INPUT if ensemble_tower(model) is VISION else TEXT_INPUT
    command = [
        str(perf_analyzer_binary()),
        "-m",
        model,
        "-u",
        url,
        "-i",
        "grpc",
        "-b",
        str(batch_size),
        f"--concurrency-range={concurrency}",
        f"--input-data={data_file}",
        f"--shape={name}:1",
        f"--measurement-interval={measurement_ms}",
        "--stability-percentage=50",
        "--max-trials=6",
        "--percentile=99",
    ]
    return command + (["-f", str(csv_file), "--verbose-csv"] if csv_file else [])


def perf_table(
    url: str,
    models: list[str],
    *,
    batch_sizes: tuple[int, ...] = (1,),
    concurrencies: tuple[int, ...] = (1, 4),
    measurement_ms: int = 4000,
    print_command: bool = False,
) -> str:
    """``clip-triton perf``: perf_analyzer at each batch size and concurrency, as one table."""
    import shlex  # noqa: PLC0415

    env = perf_environment()
    width = max(12, *(len(model) + 2 for model in models))
    rows = [f"{'ensemble':<{width}}{'batch':>6}{'concurrency':>13}{'items/s':>10}{'p50 ms':>9}{'p99 ms':>9}"]
    for model in models:
        for batch in batch_sizes:
            for concurrency in concurrencies:
                data = perf_input_data(url, model)  # per cell: a cached clip_text gets texts no cell sent
                if print_command:
                    data_file = Path(tempfile.gettempdir()) / f"clip-triton-{model}-input.json"
                    data_file.write_text(json.dumps(data))
                    path = env.get("LD_LIBRARY_PATH", "")
                    print(
                        f"LD_LIBRARY_PATH={shlex.quote(path)} "
                        + shlex.join(
                            perf_command(
                                url,
                                model,
                                data_file,
                                batch_size=batch,
                                concurrency=concurrency,
                                measurement_ms=measurement_ms,
                            )
                        ),
                        file=sys.stderr,
                    )
                result = run_perf_analyzer(
                    url, model, batch_size=batch, concurrency=concurrency, measurement_ms=measurement_ms, data=data
                )
                rows.append(
                    f"{model:<{width}}{batch:>6}{concurrency:>13}{result.items_per_sec:>10.1f}"
                    f"{result.p50_ms:>9.1f}{result.p99_ms:>9.1f}"
                )
    return "\n".join(rows)
