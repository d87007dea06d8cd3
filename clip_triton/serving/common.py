"""Shared plumbing for the python-backend models (runs inside Triton's python stub)."""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

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


@dataclass
class Answer:
    """One request's answer, decided without Triton: ``rows`` (a good or ``blank`` row per item) and
    ``statuses`` (b"" for good items, the reason for bad ones), or ``error`` for the whole request."""

    rows: np.ndarray | None
    statuses: list[bytes]
    error: str | None = None
    extras: dict[str, np.ndarray] = field(default_factory=dict)  # further per-item outputs (TOKENS)


def answer_items(
    values: Sequence[bytes],
    convert: Callable[[bytes], np.ndarray],
    errors: tuple[type[Exception], ...],
    blank: np.ndarray,
    finish: Callable[[np.ndarray], np.ndarray] | None = None,
) -> Answer:
    """Run ``convert`` on every item; a bad item never fails another.

    A request of several items is answered whole: each good item's row, and for each bad one the
    ``blank`` row plus its reason in the statuses (b"" for good items), so dirty data costs no extra
    round trip. A request of a single bad item fails (``error``) naming it: what raw clients and
    perf_analyzer expect. ``errors`` are the expected refusals (their message is the reason); any other
    exception (MemoryError, OverflowError, a decoder's own bug on hostile bytes) is caught too, named
    by its type. ``finish`` shapes the stacked rows (the tokenizer cuts them to the request's
    sequence-length bucket). Pure: the fast tests call it through each model's ``answer``.
    """
    rows, statuses = [], []
    for index, item in enumerate(values):
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
        return Answer(None, [], "the request holds no item")
    if len(rows) == 1 and statuses[0]:
        return Answer(None, statuses, statuses[0].decode())
    return Answer((finish or _same)(np.stack(rows)), statuses)


def respond(requests: Sequence, input_name: str, output_name: str, status_name: str, answer) -> list:
    """Triton's side of :func:`answer_items`: each request's items in, its :class:`Answer` out as an
    InferenceResponse (a whole-request error is INVALID_ARGUMENT)."""
    import triton_python_backend_utils as pb_utils  # noqa: PLC0415 (exists only inside the stub)

    responses = []
    for request in requests:
        result = answer(items(request, input_name))
        if result.error is not None:
            responses.append(
                pb_utils.InferenceResponse(error=pb_utils.TritonError(result.error, pb_utils.TritonError.INVALID_ARG))
            )
            continue
        responses.append(
            pb_utils.InferenceResponse(
                output_tensors=[
                    pb_utils.Tensor(output_name, result.rows),
                    pb_utils.Tensor(status_name, np.array(result.statuses, dtype=object).reshape(-1, 1)),
                    *(pb_utils.Tensor(name, values) for name, values in result.extras.items()),
                ]
            )
        )
    return responses


def _same(rows: np.ndarray) -> np.ndarray:
    return rows
