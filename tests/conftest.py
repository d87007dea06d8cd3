"""Shared fixtures: a tiny open_clip ViT exported once, and a real tritonserver started once.

The tiny architecture (tests/configs/clip-triton-tiny.json) goes through exactly the code paths of
ViT-bigG-14: open_clip builds it, the real exporter writes it, ONNX Runtime runs it, and the
pip-installed Triton serves it. Weights are random with a fixed seed, so the reference model in a
test is bit-for-bit the model that was exported.
"""

from __future__ import annotations

import contextlib
import http.server
import io
import threading
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
TINY_CONFIG = ROOT / "tests" / "configs" / "clip-triton-tiny.json"
IMAGES = ROOT / "clip_triton" / "assets" / "images"
SEED = 0


def tied_to_this_process() -> dict:
    """Popen/run keyword arguments for a child that starts servers: it gets SIGKILL when the test
    process dies (a timed-out or killed test run), and its tritonserver goes with it."""
    import os

    from clip_triton.server import _die_with

    return {"preexec_fn": _die_with(os.getpid())}


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", help="run the opt-in full-size ViT-bigG-14 checks")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--run-slow"):
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


def export_for_tests(tmp_path_factory, name: str, config: Path = TINY_CONFIG, precision: str = "fp32") -> Path:
    """An export with verification (as `clip-triton export` does), random weights with the suite's seed."""
    from clip_triton.export import export_model

    out = tmp_path_factory.mktemp(name)
    export_model(str(config), "none", out, precision=precision, seed=SEED)
    return out


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory) -> Path:
    """fp32 export of the tiny model."""
    return export_for_tests(tmp_path_factory, "tiny-fp32")


@pytest.fixture(scope="session")
def reference_model():
    """The same open_clip model as the export (same config, same seed), in PyTorch fp32."""
    from clip_triton.export.weights import load_model

    return load_model(str(TINY_CONFIG), "none", seed=SEED).model


def open_clip_reference_for(config: Path, model):
    """open_clip's own transform, tokenizer and ``model``: the reference for every served path."""
    import open_clip
    import torch
    from PIL import Image

    from clip_triton.contract import register_model_config

    name = register_model_config(str(config))
    tokenizer = open_clip.get_tokenizer(name)
    cfg = model.visual.preprocess_cfg
    transform = open_clip.image_transform(cfg["size"], is_train=False, mean=cfg["mean"], std=cfg["std"],
                                          interpolation=cfg["interpolation"], resize_mode=cfg["resize_mode"])

    class Reference:
        def images(self, blobs: list[bytes]) -> np.ndarray:
            pixels = torch.stack([transform(Image.open(io.BytesIO(b))) for b in blobs])
            with torch.no_grad():
                return model.encode_image(pixels, normalize=True).numpy()

        def texts(self, texts: list[str]) -> np.ndarray:
            with torch.no_grad():
                return model.encode_text(tokenizer(texts), normalize=True).numpy()

    return Reference()


@pytest.fixture(scope="session")
def open_clip_reference(reference_model):
    return open_clip_reference_for(TINY_CONFIG, reference_model)


@pytest.fixture(scope="session")
def tiny_repo(tiny_export, tmp_path_factory) -> Path:
    from clip_triton.repository import RepoOptions, write_repository

    out = tmp_path_factory.mktemp("repo") / "model_repository"
    # Small preferred sizes and a generous delay so concurrent requests visibly batch together.
    return write_repository(out, onnx_dir=tiny_export, options=RepoOptions(runtime="python", queue_delay_us=20000,
                                                                           preprocess_instances=2))


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


def cos(a, b) -> np.ndarray:
    from clip_triton.contract import cosine

    return cosine(a, b)


@contextlib.contextmanager
def local_http_server(route, hosts: list | None = None):
    """A loopback HTTP server for URL-fetching tests; ``route(path) -> (status, headers, body)``.
    Each request's Host header is appended to ``hosts`` when given."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            if hosts is not None:
                hosts.append(self.headers.get("Host"))
            status, headers, body = route(self.path)
            self.send_response(status)
            for key, value in {"Content-Length": str(len(body)), **headers}.items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    class Server(http.server.ThreadingHTTPServer):
        def handle_error(self, request, client_address):
            pass  # clients that stop reading (byte caps) break the pipe: expected here

    server = Server(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
