"""Shared set-up for the benchmark scripts."""

from __future__ import annotations

from pathlib import Path


def prepared_export(model: str, workdir: str | Path) -> Path:
    """A verified random-weight export of ``model`` under ``workdir``, reused when already there; with
    OpenVINO IR where OpenVINO is installed (OpenVINO rows then run what it serves)."""
    from clip_triton.cpuruntime import openvino_installed
    from clip_triton.export import export_model
    from clip_triton.progress import configure_cli_logging

    configure_cli_logging()  # the export's step lines on stderr, as the CLI shows them

    onnx_dir = Path(workdir) / f"onnx-{Path(model).stem}"
    export_model(model, "none", onnx_dir, reuse=True, openvino_ir=openvino_installed())
    return onnx_dir


def bench_repo_options(**changes):
    """The repository the benches serve: python-backend encoders on ONNX Runtime unless ``changes``
    say otherwise, and no response cache (a bench repeats its bodies; a cache would answer them)."""
    from dataclasses import replace

    from clip_triton.repository import RepoOptions

    return replace(RepoOptions(runtime="python", cpu_runtime="onnxruntime", response_cache="none"), **changes)
