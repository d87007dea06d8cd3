"""Shared plumbing for the python-backend models (runs inside Triton's python stub)."""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Sequence

import numpy as np

from ..contract import ModelContract

_WATCHING: list[int] = []


def end_with_server(poll_s: float = 1.0) -> None:
    """End this python stub when tritonserver is gone. Every model here calls it in ``initialize``.

    A stub's parent is tritonserver; when tritonserver is SIGKILLed (the death signal clip_triton gives
    it when the process that started it dies, an OOM kill) its stubs are reparented and keep running:
    one was found using CPU 23 minutes after its server had died. A daemon thread watches the parent
    pid and exits the process when it changes. (Not PR_SET_PDEATHSIG: it fires when the *thread* that
    forked the stub ends, and Triton forks stubs from model-loading threads.)"""
    if _WATCHING:
        return
    parent = os.getppid()
    try:
        with open(f"/proc/{parent}/comm") as comm:
            if not comm.read().startswith("tritonserver"):
                return  # not a stub (the models run in-process in tests): nothing to end with
    except OSError:
        return
    _WATCHING.append(parent)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        os._exit(0)

    threading.Thread(target=watch, daemon=True, name="end-with-tritonserver").start()


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


def per_item(
    requests: Sequence,
    input_name: str,
    output_name: str,
    convert: Callable[[bytes], np.ndarray],
    errors: tuple[type[Exception], ...],
    status_name: str,
    blank: np.ndarray,
    finish: Callable[[np.ndarray], np.ndarray] | None = None,
) -> list:
    """Run ``convert`` on every item of every request; a bad item never fails another request.

    A request of several items is answered whole: each good item's row, and for each bad one the
    ``blank`` row plus its reason in ``status_name`` (b"" for good items), so dirty data costs no extra
    round trip. A request of a single bad item fails with INVALID_ARGUMENT naming it (what raw
    clients and perf_analyzer expect). ``errors`` are the expected refusals (their message is the
    reason); any other exception (MemoryError, OverflowError, a decoder's own bug on hostile bytes) is
    caught too, named by its type. ``finish`` shapes a request's stacked rows (the tokenizer cuts
    them to the request's sequence-length bucket).
    """
    import triton_python_backend_utils as pb_utils  # noqa: PLC0415

    responses = []
    for request in requests:
        rows, statuses = [], []
        for index, item in enumerate(items(request, input_name)):
            try:
                rows.append(convert(item))
                statuses.append(b"")
            except errors as exc:
                rows.append(blank)
                statuses.append(f"item {index}: {exc}".encode())
            except Exception as exc:  # noqa: BLE001 (isolated to this item, by design)
                rows.append(blank)
                statuses.append(f"item {index}: cannot be processed ({type(exc).__name__}: {exc})".encode())
        if not rows:
            responses.append(
                pb_utils.InferenceResponse(
                    error=pb_utils.TritonError("the request holds no item", pb_utils.TritonError.INVALID_ARG)
                )
            )
        elif len(rows) == 1 and statuses[0]:
            responses.append(
                pb_utils.InferenceResponse(
                    error=pb_utils.TritonError(statuses[0].decode(), pb_utils.TritonError.INVALID_ARG)
                )
            )
        else:
            responses.append(
                pb_utils.InferenceResponse(
                    output_tensors=[
                        pb_utils.Tensor(output_name, (finish or _same)(np.stack(rows))),
                        pb_utils.Tensor(status_name, np.array(statuses, dtype=object).reshape(-1, 1)),
                    ]
                )
            )
    return responses


def _same(rows: np.ndarray) -> np.ndarray:
    return rows
