"""The GPU twin's stand-in for Triton's OpenVINO backend (NGC image, CPU nodes): a python-backend model
running the export's graph with ONNX Runtime, that refuses what openvino_backend refuses.

What it models, read from openvino_backend's src/openvino.cc (main, August 2026; the rules date back
to the releases before 25.10):

- a batching model (``max_batch_size > 0``) is compiled for exactly ``max_batch_size`` rows
  (``ov::set_batch(model, MaxBatchSize())``): an execution whose requests hold another number of rows
  fails every request with "expected requests with batch size 'N', got 'M'", unless the config sets
  ``ENABLE_BATCH_PADDING`` (then the batch is padded to N rows: correct, at N rows' cost);
- a model that does not batch (``max_batch_size: 0``) takes each request as it comes, the batch a
  ``-1`` dim of its own, so any batch size and text length runs (dynamic shapes, CPU plugin);
- with ``RESHAPE_IO_LAYERS``, a config dim that is neither ``-1`` nor positive fails the load.

What it cannot check: OpenVINO's own numerics (bf16 on AMX/AVX512-BF16 CPUs; checked on this CPU by
the python-backend OpenVINO path, tests/test_serving_openvino.py), the backend's autocomplete (it
leaves max_batch_size at 0 here: the exported graphs carry no layout with a batch dim), streams and
instance concurrency.
"""

from __future__ import annotations

import json

from clip_triton.serving.encoder_model import TritonPythonModel as OnnxRuntimeEncoder
from tests.twin_standin import said


class TritonPythonModel(OnnxRuntimeEncoder):
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        self.max_batch_size = int(config.get("max_batch_size", 0))
        self.padding = params.get("ENABLE_BATCH_PADDING", "").upper() == "YES"
        if params.get("RESHAPE_IO_LAYERS", "").lower() == "yes":
            for io in config.get("input", []) + config.get("output", []):
                if any(int(d) < -1 or int(d) == 0 for d in io["dims"]):
                    raise ValueError(
                        "openvino backend does not support dimensions values other than `-1` or positive integers"
                    )
        super().initialize(args)

    def execute(self, requests):
        import triton_python_backend_utils as pb_utils

        if self.max_batch_size > 0 and not self.padding:
            rows = sum(pb_utils.get_input_tensor_by_name(r, self.spec_in.name).as_numpy().shape[0] for r in requests)
            if rows != self.max_batch_size:
                message = (
                    f"expected requests with batch size '{self.max_batch_size}', got '{rows}'... this error can be "
                    "avoided by setting 'ENABLE_BATCH_PADDING' parameter in model configuration to 'YES' at a "
                    "performance cost."
                )
                said(message)
                return [
                    pb_utils.InferenceResponse(error=pb_utils.TritonError(message, pb_utils.TritonError.INTERNAL))
                    for _ in requests
                ]
        return super().execute(requests)
