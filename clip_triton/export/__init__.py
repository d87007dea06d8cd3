"""Export open_clip models to verified ONNX graphs (installed as ``clip_triton.export``).

Needs the ``export`` extra (torch, open_clip_torch, onnx, onnxruntime).
"""

from .pipeline import export_model, read_manifest, verify_export

__all__ = ["export_model", "read_manifest", "verify_export"]
