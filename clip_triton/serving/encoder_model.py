"""Triton python model ``vision_encoder``/``text_encoder``: the exported ONNX graph under onnxruntime.

For the pip-installed Triton, which has no ONNX Runtime backend. All requests of a dynamic batch
run as one ONNX Runtime call, then the rows are handed back to their requests.
"""

from __future__ import annotations

import os

import numpy as np

from ..ortutil import make_session
from .common import contract_from, parameters


class TritonPythonModel:
    def initialize(self, args):
        params = parameters(args)
        contract = contract_from(params)
        tower = "vision" if args["model_name"].startswith("vision") else "text"
        self.spec_in, self.spec_out = contract.encoder_io(tower)
        folder = os.path.join(args["model_repository"], args["model_version"])
        threads = int(params.get("ort_threads", "0")) or None
        spinning = {"true": True, "false": False}.get(params.get("ort_spinning", ""), None)
        self.session = make_session(os.path.join(folder, params["onnx_file"]), threads=threads,
                                    fp16=contract.precision == "fp16", spinning=spinning)

    def execute(self, requests):
        import triton_python_backend_utils as pb_utils  # noqa: PLC0415

        arrays = [pb_utils.get_input_tensor_by_name(r, self.spec_in.name).as_numpy() for r in requests]
        (out,) = self.session.run([self.spec_out.name], {self.spec_in.name: np.concatenate(arrays)})
        responses, start = [], 0
        for array in arrays:
            rows = out[start : start + len(array)]
            start += len(array)
            responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(self.spec_out.name, rows)]))
        return responses
