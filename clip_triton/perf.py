"""Run Triton's ``perf_analyzer`` (shipped in the ``tritonclient==2.51.0`` wheel) against the ensembles
with real input data (JPEG bytes for ``clip_image``, prompts for ``clip_text``), and read its CSV.

perf_analyzer needs Debian's ``libb64-0d`` and ``libcudart.so.12`` (from the
``nvidia-cuda-runtime-cu12`` wheel, found automatically when installed) on this CPU machine.
"""

from __future__ import annotations

import base64
import csv
import ctypes.util
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .contract import IMAGE_ENSEMBLE, IMAGE_INPUT, TEXT_ENSEMBLE, TEXT_INPUT
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


def input_data(model: str, images: list[bytes] | None = None, prompts: tuple[str, ...] = PERF_PROMPTS) -> dict:
    """perf_analyzer's --input-data JSON: one entry per real item, cycled through by perf_analyzer."""
    if model == IMAGE_ENSEMBLE:
        if images is None:
            images = image_bytes()
        name, items = IMAGE_INPUT, images
    elif model == TEXT_ENSEMBLE:
        name, items = TEXT_INPUT, [p.encode() for p in prompts]
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
) -> PerfResult:
    """One perf_analyzer measurement at one batch size and concurrency.

    perf_analyzer stops with a non-zero exit at the first failed request, which raises here: a
    returned result means every request of the measurement succeeded.
    """
    with tempfile.TemporaryDirectory(prefix="clip-triton-perf-") as tmp:
        data_file = Path(tmp) / "input.json"
        data_file.write_text(json.dumps(input_data(model, images)))
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
        if done.returncode != 0 and "stable measurement" in done.stdout + done.stderr:
            # noisy machine: one more try with windows twice as long
            command[command.index(f"--measurement-interval={measurement_ms}")] = (
                f"--measurement-interval={2 * measurement_ms}"
            )
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
    name = IMAGE_INPUT if model == IMAGE_ENSEMBLE else TEXT_INPUT
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
    rows = [f"{'ensemble':<12}{'batch':>6}{'concurrency':>13}{'items/s':>10}{'p50 ms':>9}{'p99 ms':>9}"]
    for model in models:
        for batch in batch_sizes:
            for concurrency in concurrencies:
                if print_command:
                    data = Path(tempfile.gettempdir()) / f"clip-triton-{model}-input.json"
                    data.write_text(json.dumps(input_data(model)))
                    path = env.get("LD_LIBRARY_PATH", "")
                    print(
                        f"LD_LIBRARY_PATH={shlex.quote(path)} "
                        + shlex.join(
                            perf_command(
                                url,
                                model,
                                data,
                                batch_size=batch,
                                concurrency=concurrency,
                                measurement_ms=measurement_ms,
                            )
                        ),
                        file=sys.stderr,
                    )
                result = run_perf_analyzer(
                    url, model, batch_size=batch, concurrency=concurrency, measurement_ms=measurement_ms
                )
                rows.append(
                    f"{model:<12}{batch:>6}{concurrency:>13}{result.items_per_sec:>10.1f}"
                    f"{result.p50_ms:>9.1f}{result.p99_ms:>9.1f}"
                )
    return "\n".join(rows)
