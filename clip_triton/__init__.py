"""clip-triton: serve open_clip CLIP models (ViT-bigG-14 by default) on NVIDIA Triton Inference Server."""

__version__ = "0.1.0"
