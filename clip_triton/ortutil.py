"""ONNX Runtime sessions configured the same way wherever clip-triton runs a graph."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import ClipTritonError


def make_session(
    path: str | Path,
    threads: int | None = None,
    fp16: bool | None = None,
    device: str = "cpu",
    spinning: bool | None = None,
):
    """An ``InferenceSession`` for an exported encoder.

    ``fp16`` graphs on the CPU provider are created with the ``NchwcTransformer`` disabled: with it,
    ONNX Runtime crashes while creating the session (seen with ORT 1.2x on x86-64).
    ``threads`` sets intra-op threads (default: one per physical core this process may use, ORT's own
    count). The count is always set: left to ORT, it also pins each worker thread to one core, and a
    pinned worker waits while Triton's preprocessing processes hold its core although another core is
    free (the reason OpenVINO runs with ``ENABLE_CPU_PINNING`` off). ``spinning=False`` stops idle ORT
    threads from busy-waiting, which matters when other processes share the cores.
    """
    import onnxruntime as ort  # noqa: PLC0415 (only the roles that run graphs need it)

    path = Path(path)
    if not path.is_file():
        raise ClipTritonError(f"ONNX graph {path} not found", "run `clip-triton export` first")
    if fp16 is None:
        fp16 = _graph_is_fp16(path)
    options = ort.SessionOptions()
    options.intra_op_num_threads = int(threads or physical_cores())
    options.inter_op_num_threads = 1
    if spinning is not None:
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    providers = ["CPUExecutionProvider"]
    if device == "cuda":
        providers.insert(0, "CUDAExecutionProvider")
    disabled = ["NchwcTransformer"] if fp16 and device == "cpu" else []
    try:
        return ort.InferenceSession(os.fspath(path), options, providers=providers, disabled_optimizers=disabled)
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/... types
        raise ClipTritonError(
            f"ONNX Runtime could not load {path}: {str(exc).splitlines()[0][:300]}",
            "the graph may be corrupt or incomplete; re-run `clip-triton export`",
        ) from exc


def physical_cores() -> int:
    """Physical cores among the CPUs this process may run on (its affinity mask; hyperthreads of one
    core count once), as ONNX Runtime counts them for its default thread pool."""
    allowed = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
    cores = set()
    for cpu in allowed:
        topology = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            cores.add(
                ((topology / "physical_package_id").read_text().strip(), (topology / "core_id").read_text().strip())
            )
        except OSError:  # no sysfs topology (containers may hide it): count the CPU itself
            cores.add(("cpu", str(cpu)))
    return max(1, len(cores))


def _graph_is_fp16(path: Path) -> bool:
    import onnx  # noqa: PLC0415

    graph = onnx.load(os.fspath(path), load_external_data=False).graph
    return any(i.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16 for i in graph.input)
