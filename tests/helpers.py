"""Shared test helpers (plain functions and constants; the fixtures are in conftest.py)."""

from __future__ import annotations

import contextlib
import http.server
import io
import os
import threading
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
TINY_CONFIG = ROOT / "tests" / "configs" / "clip-triton-tiny.json"
IMAGES = ROOT / "clip_triton" / "assets" / "images"
SEED = 0


# Exports the fixtures share, cached by content across runs (as the GPU twin's environments are): the
# key is every byte that decides an export (the export code's import closure, the package's assets,
# the test configs and tokenizers, the libraries' versions, the options), so a change to any of them
# exports afresh. Tests of the export itself call export_model directly and never read this cache.
EXPORT_CACHE = Path(os.environ.get("CLIP_TRITON_TEST_CACHE", Path.home() / ".cache" / "clip-triton-tests")) / "exports"
_EXPORT_LIBRARIES = (
    "torch",
    "open_clip_torch",
    "onnx",
    "onnxscript",
    "onnxruntime",
    "openvino",
    "transformers",
    "tokenizers",
)


def export_digest(config: Path, **options) -> str:
    import hashlib
    from importlib import metadata

    from .imports import closure, source_file

    digest = hashlib.sha256()
    files = [
        *sorted(source_file(module) for module in closure("clip_triton.export.pipeline")),
        *sorted(p for p in (ROOT / "clip_triton" / "assets").rglob("*") if p.is_file()),
        *sorted(p for p in config.parent.rglob("*") if p.is_file() and "__pycache__" not in p.parts),
    ]
    for path in files:
        digest.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes())
    for library in _EXPORT_LIBRARIES:
        try:
            digest.update(f"{library}=={metadata.version(library)}".encode())
        except metadata.PackageNotFoundError:
            digest.update(f"{library} absent".encode())
    digest.update(repr(sorted({"config": str(config.relative_to(ROOT)), "seed": SEED, **options}.items())).encode())
    return digest.hexdigest()[:16]


def export_for_tests(
    tmp_path_factory, name: str, config: Path = TINY_CONFIG, precision: str = "fp32", openvino_ir: bool = False
) -> Path:
    """An export with verification (as `clip-triton export` does), random weights with the suite's seed:
    from the content-keyed cache when one exists, copied into the test's own folder."""
    import shutil

    from clip_triton.export import export_model

    key = export_digest(config, precision=precision, openvino_ir=openvino_ir)
    cached = EXPORT_CACHE / f"{name}-{key}"
    if not (cached / ".complete").is_file():
        EXPORT_CACHE.mkdir(parents=True, exist_ok=True)
        partial = EXPORT_CACHE / f".{name}-{key}.partial-{os.getpid()}"
        shutil.rmtree(partial, ignore_errors=True)
        export_model(str(config), "none", partial, precision=precision, seed=SEED, openvino_ir=openvino_ir)
        (partial / ".complete").write_text(key + "\n")
        shutil.rmtree(cached, ignore_errors=True)
        os.replace(partial, cached)
        for stale in EXPORT_CACHE.glob(f"{name}-*"):  # earlier code's exports of this fixture (only)
            suffix = stale.name[len(name) + 1 :]
            if stale != cached and len(suffix) == 16 and all(c in "0123456789abcdef" for c in suffix):
                shutil.rmtree(stale, ignore_errors=True)
    out = tmp_path_factory.mktemp(name)
    shutil.copytree(cached, out, dirs_exist_ok=True, ignore=shutil.ignore_patterns(".complete"))
    return out


def open_clip_reference_for(config: Path, model):
    """open_clip's own transform, tokenizer and ``model``: the reference for every served path."""
    import open_clip
    import torch
    from PIL import Image

    from clip_triton.export.adapter import register_model_config

    name = register_model_config(str(config))
    tokenizer = open_clip.get_tokenizer(name)
    cfg = model.visual.preprocess_cfg
    transform = open_clip.image_transform(
        cfg["size"],
        is_train=False,
        mean=cfg["mean"],
        std=cfg["std"],
        interpolation=cfg["interpolation"],
        resize_mode=cfg["resize_mode"],
    )

    class Reference:
        def images(self, blobs: list[bytes]) -> np.ndarray:
            pixels = torch.stack([transform(Image.open(io.BytesIO(b))) for b in blobs])
            with torch.no_grad():
                return model.encode_image(pixels, normalize=True).numpy()

        def texts(self, texts: list[str], language: str | None = None) -> np.ndarray:
            """open_clip's embeddings; ``language``: NLLB's tokenizer with that ``src_lang`` (what open_clip's
            set_language means to do; tests/test_hf_tokenizer.py)."""
            hf = getattr(tokenizer, "tokenizer", None)
            default = getattr(hf, "src_lang", None)
            if language is not None:
                hf.src_lang = language
            try:
                with torch.no_grad():
                    return model.encode_text(tokenizer(texts), normalize=True).numpy()
            finally:
                if language is not None:
                    hf.src_lang = default

    return Reference()


def cos(a, b) -> np.ndarray:
    from clip_triton.fidelity import cosine

    return cosine(a, b)


@contextlib.contextmanager
def local_http_server(route, hosts: list | None = None):
    """A loopback HTTP server for URL-fetching tests; ``route(path) -> (status, headers, body)``.
    Each request's Host header is appended to ``hosts`` when given."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
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


def settled(read, at_least: float | None = None, *, quiet: float = 0.5, timeout: float = 60.0):
    """A server counter once it has caught up: polled until it is at least `at_least` (when given)
    and has not moved for `quiet` seconds. Triton records a request's statistics after it sends the
    response, so a counter read the moment the client returns can still lack that request (a CI run
    read 24 for 25 on a busy machine). Returns the last reading; the caller asserts on it, so a
    counter that never gets there fails there, with its value."""
    import time

    deadline = time.monotonic() + timeout
    value = read()
    since = time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.05)
        now = read()
        if now != value:
            value, since = now, time.monotonic()
        elif (at_least is None or value >= at_least) and time.monotonic() - since >= quiet:
            break
    return value


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def run_cli(*args, env: dict | None = None, terminal: bool = False):
    """``clip-triton ARGS`` in this process: ``main``'s exit code and what it printed, as a
    CompletedProcess (for the fast tier: flags, rules and one-line errors need no interpreter of
    their own). ``terminal``: stderr says it is a terminal. The logging set-up the CLI does is undone
    afterwards."""
    import logging
    import os
    import subprocess

    from clip_triton.cli import main

    argv = [str(a) for a in args]
    logger = logging.getLogger("clip_triton")
    saved = (list(logger.handlers), logger.propagate, logger.level)
    environ = dict(os.environ)
    out, err = io.StringIO(), (_Terminal() if terminal else io.StringIO())
    try:
        os.environ.update(env or {})
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(argv)
            except SystemExit as exit_:  # argparse: --help, --version, a usage error
                code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    finally:
        os.environ.clear()
        os.environ.update(environ)
        logger.handlers[:], logger.propagate = saved[0], saved[1]
        logger.setLevel(saved[2])
    return subprocess.CompletedProcess(["clip-triton", *argv], code, out.getvalue(), err.getvalue())
