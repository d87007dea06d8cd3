"""Shared plumbing for the python-backend models (runs inside Triton's python stub)."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence

import numpy as np

from ..contract import ModelContract


def parameters(args: dict) -> dict[str, str]:
    config = json.loads(args["model_config"])
    return {key: value["string_value"] for key, value in config.get("parameters", {}).items()}


def contract_from(params: dict[str, str]) -> ModelContract:
    return ModelContract.from_json(params["contract"])


def items(request, name: str) -> list[bytes]:
    """The BYTES items of one request's ``[n, 1]`` input, as a flat list."""
    import triton_python_backend_utils as pb_utils  # noqa: PLC0415 (exists only inside the stub)

    array = pb_utils.get_input_tensor_by_name(request, name).as_numpy()
    return [bytes(x) if not isinstance(x, bytes) else x for x in array.reshape(-1)]


def per_item(requests: Sequence, input_name: str, output_name: str, convert: Callable[[bytes], np.ndarray],
             errors: tuple[type[Exception], ...]) -> list:
    """Run ``convert`` on every item of every request; one bad item fails only its own request.

    A request whose item ``i`` raises gets INVALID_ARGUMENT naming index ``i``; requests batched with it
    are answered normally. ``errors`` are the expected refusals (their message is the reason); any
    other exception (MemoryError, OverflowError, a decoder's own bug on hostile bytes) is caught too,
    named by its type, so that it can never fail the batch-mates.
    """
    import triton_python_backend_utils as pb_utils  # noqa: PLC0415

    responses = []
    for request in requests:
        try:
            rows = []
            for index, item in enumerate(items(request, input_name)):
                try:
                    rows.append(convert(item))
                except errors as exc:
                    raise _ItemError(f"item {index}: {exc}") from None
                except Exception as exc:  # noqa: BLE001 (isolated to this request, by design)
                    raise _ItemError(f"item {index}: cannot be processed ({type(exc).__name__}: {exc})") from None
            if not rows:
                raise _ItemError("the request holds no item")
            out = pb_utils.Tensor(output_name, np.stack(rows))
            responses.append(pb_utils.InferenceResponse(output_tensors=[out]))
        except _ItemError as exc:
            responses.append(pb_utils.InferenceResponse(
                error=pb_utils.TritonError(str(exc), pb_utils.TritonError.INVALID_ARG)))
    return responses


class _ItemError(Exception):
    pass
