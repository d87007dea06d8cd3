"""Triton python model ``vision_encoder``/``text_encoder``: the exported graph on a CPU runtime (the
ONNX graph, or for OpenVINO the IR converted from the module when the export has one).

For the pip-installed Triton, which has neither an ONNX Runtime nor an OpenVINO backend. The engine
is ONNX Runtime (fp32, exact) or OpenVINO (fp32, or bf16 on CPUs with native bf16). All requests of a
dynamic batch run as one call per input shape (Triton batches only requests of one shape; text requests
of different sequence-length buckets would arrive apart), then the rows are handed back to their requests.
"""

from __future__ import annotations

import os

import numpy as np

from ..contract import TEXT
from ..cpuruntime import open_session
from .common import contract_from, end_with_server, parameters


class TritonPythonModel:
    def initialize(self, args):
        end_with_server()
        import triton_python_backend_utils as pb_utils  # noqa: PLC0415

        params = parameters(args)
        contract = contract_from(params)
        encoder = contract.encoder(params["tower"])  # written by `clip-triton repo`, never guessed from a name
        self.spec_in, self.spec_out = encoder.input, encoder.output
        self.vocab_size = contract.tokenizer.vocab_size if encoder.tower is TEXT else None
        self.context_length = contract.context_length
        path = os.path.join(args["model_repository"], args["model_version"], params["graph_file"])
        threads = int(params.get("threads", "0")) or None
        runtime, precision = params.get("cpu_runtime", "onnxruntime"), params.get("compute_precision", "fp32")
        spinning = {"true": True, "false": False}.get(params.get("ort_spinning", ""))
        self.session = open_session(
            path, runtime, precision, threads=threads, spinning=spinning, fp16_graph=contract.precision == "fp16"
        )
        effective = getattr(self.session, "effective_precision", precision)
        if effective != precision:
            pb_utils.Logger.log_warn(
                f"{args['model_name']}: this CPU has no native {precision}; {runtime} computes in {effective}"
            )

    def execute(self, requests):
        import triton_python_backend_utils as pb_utils  # noqa: PLC0415

        arrays = [pb_utils.get_input_tensor_by_name(r, self.spec_in.name).as_numpy() for r in requests]
        # Each request is checked on its own: one with bad values (ids outside the vocabulary sent
        # straight to text_encoder) is refused, and the requests batched with it still run.
        problems = [self.check(array) for array in arrays]
        rows = self.encode([array for array, problem in zip(arrays, problems) if problem is None])
        responses = []
        for problem in problems:
            if problem is not None:
                responses.append(
                    pb_utils.InferenceResponse(error=pb_utils.TritonError(problem, pb_utils.TritonError.INVALID_ARG))
                )
                continue
            responses.append(
                pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(self.spec_out.name, rows.pop(0))])
            )
        return responses

    def encode(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        """Each array's embeddings, in order: one runtime call per distinct input shape."""
        groups: dict[tuple[int, ...], list[int]] = {}
        for index, array in enumerate(arrays):
            groups.setdefault(array.shape[1:], []).append(index)
        results: list[np.ndarray] = [np.empty(0)] * len(arrays)
        for members in groups.values():
            feed = np.concatenate([arrays[i] for i in members])
            out = self.session.run([self.spec_out.name], {self.spec_in.name: feed})[0]
            start = 0
            for i in members:
                results[i] = out[start : start + len(arrays[i])]
                start += len(arrays[i])
        return results

    def check(self, array: np.ndarray) -> str | None:
        """Why a request's input cannot be encoded, or None."""
        if self.vocab_size is not None:
            if not 2 <= array.shape[-1] <= self.context_length:
                return (
                    f"token ids must have 2 to {self.context_length} positions per text: got {array.shape[-1]}"
                    " (send text to clip_text, which tokenizes it)"
                )
            if array.size and (array.min() < 0 or array.max() >= self.vocab_size):
                return (
                    f"token ids must lie in [0, {self.vocab_size}): got {int(array.min())}..{int(array.max())}"
                    " (send text to clip_text, which tokenizes it)"
                )
        elif not np.isfinite(array).all():
            return "pixel values must be finite (send encoded images to clip_image, which preprocesses them)"
        return None
