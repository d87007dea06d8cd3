"""The CPU runtimes that run the exported graphs, behind one ``run(output_names, feeds)`` call.

ONNX Runtime (fp32, the exact reference path) or OpenVINO (fp32 or bf16).

OpenVINO reads the exported ONNX graphs as they are (external data included). Its CPU plugin runs
bf16 on processors with native bf16 (AVX512-BF16, AMX): there the matrix products go through AMX
tiles, which fp32 cannot use. ``compute_precision="fp32"`` forces fp32 everywhere; ``"bf16"`` asks for bf16
and falls back to fp32 on CPUs without it (``effective_precision`` says which one runs).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .contract import CPU_PRECISIONS, CPU_RUNTIMES
from .errors import ClipTritonError

_OV_PRECISION = {"fp32": "f32", "bf16": "bf16"}


def openvino_installed() -> bool:
    """Whether OpenVINO (the ``cpu`` extra) can be imported here, without importing it."""
    import importlib.util  # noqa: PLC0415

    return importlib.util.find_spec("openvino") is not None


def resolve_cpu_runtime(choice: str, precision: str = "fp32", has_ir: bool = False) -> str:
    """The CPU runtime ``choice`` means for an export: itself, or for ``auto`` OpenVINO where bf16 is asked
    (only OpenVINO computes it) or where the export holds its IR (``export --openvino-ir``) and OpenVINO
    is installed (fp32, exact at the fp32 tolerance, 1.15-1.28x ONNX Runtime on 16-image requests:
    docs/benchmarks.md), else ONNX Runtime."""
    if choice != "auto":
        return choice
    if precision == "bf16":
        return "openvino"
    return "openvino" if has_ir and openvino_installed() else "onnxruntime"


def check_cpu_runtime(runtime: str, precision: str | None = None) -> None:
    """Refuse a CPU runtime, or a runtime/compute-precision pair, that cannot run here (repository
    writer and graph loader alike)."""
    if runtime not in CPU_RUNTIMES:
        raise ClipTritonError(f"unknown CPU runtime {runtime!r}", f"choose one of {CPU_RUNTIMES}")
    if precision is None:
        return
    if precision not in CPU_PRECISIONS:
        raise ClipTritonError(f"unknown CPU precision {precision!r}", f"choose one of {CPU_PRECISIONS}")
    if precision == "bf16" and runtime != "openvino":
        raise ClipTritonError(
            "bf16 on the CPU needs OpenVINO (ONNX Runtime's CPU kernels have no bf16 GEMM)",
            "add --cpu-runtime openvino (for a repository, or use --runtime openvino)",
        )


def cpu_supports_bf16() -> bool:
    """Whether this CPU executes bf16 natively (OpenVINO's CPU plugin reports it as a capability)."""
    try:
        import openvino as ov  # noqa: PLC0415
    except ImportError:
        return False
    return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


class OpenVINOSession:
    """A compiled OpenVINO model with one infer request, called like ``onnxruntime.InferenceSession``.

    ``threads``: inference threads (default: all cores). ``streams``: parallel executors inside this
    model (default 1: one request at a time, all threads on it, which is what one Triton instance needs).
    ``static_batch`` compiles for that one batch size instead of any (faster; see bench/forward.py).
    """

    def __init__(
        self,
        path: str | Path,
        compute_precision: str = "bf16",
        threads: int | None = None,
        streams: int = 1,
        static_batch: int | None = None,
    ):
        try:
            import openvino as ov  # noqa: PLC0415
        except ImportError as exc:
            raise ClipTritonError(
                "OpenVINO is not installed", "pip install 'clip-triton[serve]' (or [cpu] for OpenVINO alone)"
            ) from exc
        precision = compute_precision
        check_cpu_runtime("openvino", precision)
        path = Path(path)
        if not path.is_file():
            raise ClipTritonError(f"graph {path} not found", "run `clip-triton export` first")
        config = {
            "INFERENCE_PRECISION_HINT": _OV_PRECISION[precision],
            "PERFORMANCE_HINT": "LATENCY",
            "NUM_STREAMS": str(int(streams)),
            # Triton runs several processes on the same cores (preprocess instances, other encoders):
            # pinned OpenVINO threads then queue behind them. Measured here with 2 encoder instances x
            # 1 thread: 43 images/s pinned, 61 unpinned; 1 instance x 2 threads: equal within noise.
            "ENABLE_CPU_PINNING": False,
        }
        if threads:
            config["INFERENCE_NUM_THREADS"] = str(int(threads))
        core = ov.Core()
        try:
            model = core.read_model(os.fspath(path))
            if static_batch:
                shapes = {}
                for port in model.inputs:
                    shape = port.get_partial_shape()
                    shape[0] = int(static_batch)
                    shapes[port.get_any_name()] = shape
                model.reshape(shapes)
            self.compiled = core.compile_model(model, "CPU", config)
        except Exception as exc:  # OpenVINO raises RuntimeError with a multi-line message
            raise ClipTritonError(
                f"OpenVINO could not load {path}: {str(exc).strip().splitlines()[0][:300]}",
                "the graph may be corrupt or incomplete; re-run `clip-triton export`",
            ) from exc
        self.request = self.compiled.create_infer_request()
        effective = self.compiled.get_property("INFERENCE_PRECISION_HINT")
        self.effective_precision = "bf16" if effective == ov.Type.bf16 else "fp32"
        self._outputs = {port.get_any_name(): port for port in self.compiled.outputs}

    def run(self, output_names, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        result = self.request.infer(feeds)
        names = output_names or list(self._outputs)
        # The arrays alias the request's output buffers, which the next call overwrites: copy them.
        return [np.array(result[self._outputs[name]], copy=True) for name in names]


def open_session(
    path: str | Path,
    runtime: str = "onnxruntime",
    compute_precision: str = "fp32",
    threads: int | None = None,
    spinning: bool | None = None,
    fp16_graph: bool | None = None,
):
    """An ONNX Runtime session or an :class:`OpenVINOSession` for one exported graph, computing in
    ``compute_precision`` (the graph's own precision is ``fp16_graph``)."""
    check_cpu_runtime(runtime, compute_precision)
    if runtime == "openvino":
        return OpenVINOSession(path, compute_precision=compute_precision, threads=threads)
    from .ortutil import make_session  # noqa: PLC0415

    return make_session(path, threads=threads, fp16=fp16_graph, spinning=spinning)
