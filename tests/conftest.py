"""Shared fixtures: a tiny open_clip ViT exported once, and a real tritonserver started once.

The tiny architecture (tests/configs/clip-triton-tiny.json) goes through exactly the code paths of
ViT-bigG-14: open_clip builds it, the real exporter writes it, ONNX Runtime runs it, and the
pip-installed Triton serves it. Weights are random with a fixed seed, so the reference model in a
test is bit-for-bit the model that was exported.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from .helpers import IMAGES, SEED, TINY_CONFIG, export_for_tests, open_clip_reference_for


def pytest_configure(config):
    """The suite behaves the same however it is launched: a run started as a background job of a
    non-interactive shell inherits SIGINT ignored, which its Python children would inherit too (the
    Ctrl-C tests of test processes' own children then hang). Restore Python's handler."""
    import signal

    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", help="run the opt-in full-size ViT-bigG-14 checks")


# The fast tier (`bash dev.sh test -m fast`): in-process tests, fakes only at the project's own seams.
# A test is fast unless it needs one of these session fixtures (an export, a tritonserver, the open_clip
# reference model, the GPU twin's environments) or is marked `integration` (it runs subprocesses: the CLI
# as users run it, servers of its own, kubectl, node, the twin's virtualenvs, benchmarks; or it exports).
# The classification cannot drift: a fast test that starts a subprocess fails (`_fast_tier_stays_in_process`).
SLOW_FIXTURES = {
    "tiny_export",
    "tiny_ir_export",
    "tiny_repo",
    "triton",
    "grpc",
    "reference_model",
    "open_clip_reference",
    "fp16_export",
    "bigg_io_export",
    "written_standins",
    "committed_standins",
    "standin_server",
    "family",
    "ov_triton",
    "ov_grpc",
    "readme_folder",
}


def is_fast(item) -> bool:
    return "integration" not in item.keywords and not SLOW_FIXTURES & set(getattr(item, "fixturenames", ()))


def pytest_collection_modifyitems(config, items):
    for item in items:
        if is_fast(item):
            item.add_marker(pytest.mark.fast)
    if config.getoption("--run-slow"):
        for item in items:  # full-size exports take 6-20 minutes each: above the suite's per-test bound
            if "slow" in item.keywords:
                item.add_marker(pytest.mark.timeout(3 * 3600))
        return
    skip = pytest.mark.skip(reason="full-size check; opt in with --run-slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


# Libraries probe the system on import (ctypes.util.find_library runs `ldconfig -p`; platform runs
# `uname`): milliseconds, and not the test's work. Anything else is a program the test started.
_PROBES = ("ldconfig", "uname")


def _no_subprocess(popen):
    class NoSubprocess(popen):
        def __init__(self, args, *rest, **kwargs):
            argv = [args] if isinstance(args, (str, bytes, os.PathLike)) else list(args)
            if Path(os.fsdecode(argv[0]).split()[0]).name in _PROBES:
                super().__init__(args, *rest, **kwargs)
                return
            raise AssertionError(
                f"a fast-tier test started a subprocess ({argv!r:.160}): mark it @pytest.mark.integration, "
                "or keep it in-process"
            )

    return NoSubprocess


def _no_child_process(self):
    raise AssertionError(
        f"a fast-tier test started a child process ({self.name}: an export?): mark it @pytest.mark.integration"
    )


@pytest.fixture(autouse=True)
def _fast_tier_stays_in_process(request, monkeypatch):
    """The fast tier's promise, enforced: no subprocess (so no tritonserver, no CLI run, no kubectl)."""
    if request.node.get_closest_marker("fast") is not None:
        import multiprocessing.process
        import subprocess

        monkeypatch.setattr(subprocess, "Popen", _no_subprocess(subprocess.Popen))
        monkeypatch.setattr(multiprocessing.process.BaseProcess, "start", _no_child_process)
    yield


@pytest.fixture(scope="session")
def tiny_config() -> Path:
    return TINY_CONFIG


@pytest.fixture(scope="session")
def photos() -> dict[str, bytes]:
    return {p.stem: p.read_bytes() for p in sorted(IMAGES.glob("*.jpg"))}


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory) -> Path:
    """fp32 export of the tiny model."""
    return export_for_tests(tmp_path_factory, "tiny-fp32")


@pytest.fixture(scope="session")
def tiny_ir_export(tmp_path_factory) -> Path:
    """fp32 export of the tiny model with OpenVINO IR converted from the module (export --openvino-ir)."""
    return export_for_tests(tmp_path_factory, "tiny-fp32-ir", openvino_ir=True)


@pytest.fixture(scope="session")
def reference_model():
    """The same open_clip model as the export (same config, same seed), in PyTorch fp32."""
    from clip_triton.export.weights import load_model

    return load_model(str(TINY_CONFIG), "none", seed=SEED).model


@pytest.fixture(scope="session")
def open_clip_reference(reference_model):
    return open_clip_reference_for(TINY_CONFIG, reference_model)


@pytest.fixture(scope="session")
def tiny_repo(tiny_export, tmp_path_factory) -> Path:
    from clip_triton.repository import RepoOptions, write_repository

    out = tmp_path_factory.mktemp("repo") / "model_repository"
    # Small preferred sizes and a generous delay so concurrent requests visibly batch together.
    return write_repository(
        out, onnx_dir=tiny_export, options=RepoOptions(runtime="python", queue_delay_us=20000, preprocess_instances=2)
    )


@pytest.fixture(scope="session")
def triton(tiny_repo, tmp_path_factory):
    """A real tritonserver (the nvidia-pytriton wheel's binary) serving the tiny repository."""
    from clip_triton.server import TritonServer

    log = tmp_path_factory.mktemp("triton-log") / "tritonserver.log"
    server = TritonServer(tiny_repo, log_file=log)
    server.start(timeout=180)
    yield server
    server.stop()


@pytest.fixture()
def grpc(triton):
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(triton.grpc_url)
    yield client
    client.close()
