"""ONNX Runtime sessions as clip-triton opens them (ortutil.make_session), on a graph built in-process."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from clip_triton.ortutil import make_session, physical_cores


def _matmul_graph(folder: Path) -> Path:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.eye(64, dtype=np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "matmul",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 64])],
        [weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = folder / "matmul.onnx"
    onnx.save(model, path)
    return path


def _threads() -> dict[str, str]:
    """Each thread of this process: its allowed CPUs (Cpus_allowed_list)."""
    out = {}
    for task in Path(f"/proc/{os.getpid()}/task").iterdir():
        try:
            status = (task / "status").read_text()
        except OSError:  # ended meanwhile
            continue
        out[task.name] = next(line.split()[1] for line in status.splitlines() if line.startswith("Cpus_allowed_list"))
    return out


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="one CPU: ONNX Runtime starts no worker thread")
def test_default_sessions_do_not_pin_their_threads(tmp_path):
    """Left to ONNX Runtime, the thread count also pins each intra-op worker to one core; in Triton a
    pinned worker waits while a preprocessing process holds its core, though another core is free. The
    default session has one thread per physical core, each free to run on any CPU of the process."""
    path = _matmul_graph(tmp_path)
    mine = _threads()[str(os.getpid())]
    before = set(_threads())
    session = make_session(path)
    started = {tid: cpus for tid, cpus in _threads().items() if tid not in before}
    assert started, "ONNX Runtime started no intra-op worker on a machine with several cores"
    assert all(cpus == mine for cpus in started.values()), (mine, started)
    x = np.arange(128, dtype=np.float32).reshape(2, 64)
    assert (session.run(None, {"x": x})[0] == x).all()  # the identity weight (numpy.testing runs lscpu)


def test_physical_cores_counts_each_core_once():
    allowed = os.sched_getaffinity(0)
    assert 1 <= physical_cores() <= len(allowed)
    siblings = set()
    for cpu in allowed:  # the hyperthread sibling sets of the allowed CPUs: one per core
        path = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list")
        siblings.add(path.read_text().strip() if path.is_file() else str(cpu))
    assert physical_cores() == len(siblings)
