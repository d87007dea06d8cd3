"""Shared fixtures: a tiny open_clip ViT exported once, and a real tritonserver started once.

The tiny architecture (tests/configs/clip-triton-tiny.json) goes through exactly the code paths of
ViT-bigG-14: open_clip builds it, the real exporter writes it, ONNX Runtime runs it, and the
pip-installed Triton serves it. Weights are random with a fixed seed, so the reference model in a
test is bit-for-bit the model that was exported.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from .helpers import IMAGES, SEED, TINY_CONFIG, export_for_tests, open_clip_reference_for


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", help="run the opt-in full-size ViT-bigG-14 checks")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--run-slow"):
        for item in items:  # full-size exports take 6-20 minutes each: above the suite's per-test bound
            if "slow" in item.keywords:
                item.add_marker(pytest.mark.timeout(3 * 3600))
        return
    skip = pytest.mark.skip(reason="full-size check; opt in with --run-slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


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
