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
    ``threads`` sets intra-op threads (default: ORT's choice, one per core). ``spinning=False`` stops
    idle ORT threads from busy-waiting, which matters when other processes (Triton's preprocessing
    instances) share the cores.
    """
    import onnxruntime as ort  # noqa: PLC0415 (only the roles that run graphs need it)

    path = Path(path)
    if not path.is_file():
        raise ClipTritonError(f"ONNX graph {path} not found", "run `clip-triton export` first")
    if fp16 is None:
        fp16 = _graph_is_fp16(path)
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = int(threads)
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


def _graph_is_fp16(path: Path) -> bool:
    import onnx  # noqa: PLC0415

    graph = onnx.load(os.fspath(path), load_external_data=False).graph
    return any(i.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16 for i in graph.input)
