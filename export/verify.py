"""Compare exported graphs with open_clip PyTorch, per output, with explicit tolerances.

Every check is a pass or a failure: a miss raises :class:`VerificationError` (non-zero exit from the
CLI), it never downgrades to a warning.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from clip_triton import samples
from clip_triton.contract import TEXT, TOLERANCES, VISION, ModelContract, cosine
from clip_triton.errors import VerificationError


def tolerance_key(graph_precision: str, cpu_precision: str = "fp32") -> str:
    """Which tolerance applies: the graph's precision, or bf16 when the CPU runtime computes in bf16."""
    return "bf16" if cpu_precision == "bf16" else graph_precision


@dataclass
class Check:
    tower: str
    inputs: str
    batch: int
    min_cosine: float
    max_abs_diff: float
    passed: bool

    def row(self) -> str:
        mark = "ok" if self.passed else "FAIL"
        return (
            f"{self.tower:<7}{self.inputs:<10}{self.batch:>6}{self.min_cosine:>16.9f}{self.max_abs_diff:>14.3e}  {mark}"
        )


HEADER = f"{'tower':<7}{'inputs':<10}{'batch':>6}{'min cosine':>16}{'max |diff|':>14}  result"


def verification_inputs(contract: ModelContract, batches: tuple[int, ...], seed: int = 1234) -> dict:
    """Deterministic inputs per tower: random tensors at each batch size, and real data."""
    from clip_triton.preprocess import Preprocessor  # noqa: PLC0415
    from clip_triton.tokenizer import ClipTokenizer  # noqa: PLC0415

    rng = np.random.default_rng(seed)
    pixels = contract.pixels
    tok = contract.tokenizer
    vision, text = VISION.name, TEXT.name
    inputs: dict[str, list[tuple[str, np.ndarray]]] = {vision: [], text: []}
    for batch in batches:
        inputs[vision].append(("random", rng.standard_normal((batch, *pixels.shape)).astype(np.float32)))
        ids = np.zeros((batch, tok.context_length), dtype=np.int32)
        for row in ids:
            length = int(rng.integers(1, tok.context_length - 1))
            row[0] = tok.sot_token_id
            row[1 : length + 1] = rng.integers(1, tok.sot_token_id, size=length)
            row[length + 1] = tok.eot_token_id  # length + 1 <= context_length - 1
        inputs[text].append(("random", ids))
    pre = Preprocessor(contract.preprocess, dtype="float32")
    inputs[vision].append(("photos", np.stack([pre.from_bytes(b) for b in samples.image_bytes()])))
    inputs[text].append(("prompts", ClipTokenizer(tok)(list(samples.VERIFICATION_PROMPTS))))
    return inputs


def torch_reference(model, tower: str, batches: list[tuple[str, np.ndarray]]) -> list[np.ndarray]:
    """open_clip PyTorch fp32 embeddings (L2-normalised) for each input batch."""
    import torch  # noqa: PLC0415

    from .graphs import tower_module  # noqa: PLC0415

    module = tower_module(model, tower)
    with torch.no_grad():
        return [module(torch.from_numpy(x)).numpy() for _, x in batches]


def run_graph(
    path,
    contract: ModelContract,
    tower: str,
    batches,
    threads: int | None = None,
    log=None,
    runtime: str = "onnxruntime",
    cpu_precision: str = "fp32",
) -> list[np.ndarray]:
    from clip_triton.cpuruntime import open_session  # noqa: PLC0415

    spec_in, _ = contract.encoder_io(tower)
    session = open_session(path, runtime, cpu_precision, threads=threads, fp16_graph=contract.precision == "fp16")
    if log:
        log(f"{runtime} session ready for {tower} ({getattr(session, 'effective_precision', cpu_precision)})")
    outputs = []
    for _, x in batches:
        x = x.astype(spec_in.dtype)
        (out,) = session.run(None, {spec_in.name: x})
        if out.shape != (x.shape[0], contract.embed_dim) or out.dtype != np.float32:
            raise VerificationError(
                f"{tower} graph returned {out.dtype}{list(out.shape)}, "
                f"expected float32[{x.shape[0]}, {contract.embed_dim}]"
            )
        outputs.append(out)
    del session
    return outputs


def compare(tower: str, batches, reference, outputs, precision: str) -> list[Check]:
    tol = TOLERANCES[precision]
    checks = []
    for (label, x), ref, out in zip(batches, reference, outputs):
        cos = float(cosine(ref, out).min())
        diff = float(np.abs(ref.astype(np.float64) - out).max())
        ok = bool(np.isfinite(out).all() and cos >= tol["min_cosine"] and diff <= tol["max_abs_diff"])
        checks.append(Check(tower, label, x.shape[0], cos, diff, ok))
    return checks


def report(checks: list[Check], precision: str, stream=None, note: str = "") -> None:
    import sys  # noqa: PLC0415

    stream = stream or sys.stdout
    tol = TOLERANCES[precision]
    print(
        f"verification ({precision}; pass: cosine >= {tol['min_cosine']}, max |diff| <= {tol['max_abs_diff']:g},"
        f" reference: open_clip PyTorch fp32){note}",
        file=stream,
    )
    print(HEADER, file=stream)
    for check in checks:
        print(check.row(), file=stream)


def raise_on_failure(checks: list[Check]) -> None:
    failed = [c for c in checks if not c.passed]
    if failed:
        worst = min(failed, key=lambda c: c.min_cosine)
        raise VerificationError(
            f"{len(failed)} of {len(checks)} verification checks failed (worst: {worst.tower} {worst.inputs} "
            f"batch {worst.batch}: cosine {worst.min_cosine:.9f}, max |diff| {worst.max_abs_diff:.3e})",
            "the exported graph does not match open_clip; do not serve it",
        )


def as_dicts(checks: list[Check]) -> list[dict]:
    return [asdict(c) for c in checks]
