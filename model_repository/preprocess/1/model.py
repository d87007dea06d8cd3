"""Triton python-backend entry point, written by `clip-triton repo`. The logic lives in clip_triton.serving.preprocess_model."""

from clip_triton.serving.preprocess_model import TritonPythonModel  # noqa: F401
