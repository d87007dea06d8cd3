"""The GPU twin's TensorRT stand-in: a python-backend model running the export's graph with ONNX Runtime,
that refuses what Triton's TensorRT backend refuses.

What it models, from the engine's own record (``engine.json``'s profiles, written into the stand-in's
``twin_tensorrt_profiles`` parameter by tests/gpu_twin.py ``standin_repository``):

- the input and output names, dtypes and dims (the config is the TensorRT repository's own; the graph
  is the one the engine is built from);
- which optimisation profiles the instance group makes available: the listed ones, or profile 0 alone
  when the list is absent (tensorrt_backend r25.10 ``InitOptimizationProfiles``), and a listed index the
  engine lacks fails the load ("Can not set the specified optimization profile");
- each available profile's shape range: a request that no available profile holds is refused with the
  backend's "request specifies invalid shape" (warm-ups included, so a config that leaves a bucket's
  profile out fails its load, as on a GPU).

What it cannot check: TensorRT's numerics (fp16 kernels, tactic choice; build-engines validates them
on the GPU, a refused row's NaN included), device memory, engine deserialisation on another TensorRT or
GPU (check-engines' record is checked instead), CUDA graphs and the backend's execution contexts per
profile (concurrency between profiles). Nor where its output lies: a real engine's output is in GPU
memory, which Triton's response cache cannot keep, and reaches the cached inner ensemble in host memory
only because the GPU deployments turn the CUDA pool off (tests/test_gpu_path.py checks the flag); the
stand-in's output is always in host memory, so the twin's cache hits prove the layout, not the memory.
"""

from __future__ import annotations

import json
import sys

from clip_triton.serving.encoder_model import TritonPythonModel as OnnxRuntimeEncoder

PROFILES_PARAMETER = "twin_tensorrt_profiles"


def said(message: str) -> str:
    """A stand-in's refusal, also written at once to the stub's stderr: the server's own output file.
    tritonserver 2.51 can exit (-11) while a warm-up it refused is unwinding, before it logs the refusal
    itself (seen in loaded CI runs, three starts in a row); the refusal is then still on record."""
    print(f"[twin stand-in] {message}", file=sys.stderr, flush=True)
    return message


class TritonPythonModel(OnnxRuntimeEncoder):
    def initialize(self, args):
        config = json.loads(args["model_config"])
        record = json.loads(config["parameters"][PROFILES_PARAMETER]["string_value"])
        profiles, listed = record["profiles"], record["listed"] or ["0"]  # no list: profile 0 alone
        for name in listed:
            if not 0 <= int(name) < len(profiles):
                raise ValueError(
                    f"Can not set the specified optimization profile {name}[{name}] for {args['model_name']}. "
                    f"Expected optimization profile index range 0-{len(profiles) - 1}"
                )
        self.available = [profiles[int(name)] for name in listed]
        self.instance_name = args["model_instance_name"]
        super().initialize(args)

    def check(self, array):
        shape = array.shape
        if not any(
            len(shape) == len(p["min"]) and all(lo <= n <= hi for lo, n, hi in zip(p["min"], shape, p["max"]))
            for p in self.available
        ):
            ranges = "; ".join(f"{p['min']}..{p['max']}" for p in self.available)
            return said(
                f"request specifies invalid shape for input '{self.spec_in.name}' for {self.instance_name}. "
                f"Error details: model expected the shape {list(shape)} within an available optimization "
                f"profile ({ranges})"
            )
        return super().check(array)
