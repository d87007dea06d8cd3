"""Compare exported graphs with open_clip PyTorch, per output, with explicit tolerances.

Every check is a pass or a failure: a miss raises :class:`VerificationError` (non-zero exit from the
CLI), it never downgrades to a warning.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from clip_triton import samples
from clip_triton.contract import TEXT, TOLERANCES, VISION, ModelContract
from clip_triton.contract import tower as tower_spec
from clip_triton.errors import VerificationError
from clip_triton.fidelity import cosine
from clip_triton.preprocess import refused_pixels
from clip_triton.tokenizer import cut_to_bucket, refused_row


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
        return f"{self.tower:<10}{self.inputs:<11}{self.batch:>6}{self.min_cosine:>16.9f}{self.max_abs_diff:>14.3e}  {mark}"


HEADER = f"{'tower':<10}{'inputs':<11}{'batch':>6}{'min cosine':>16}{'max |diff|':>14}  result"


def verification_inputs(
    contract: ModelContract, batches: tuple[int, ...], seed: int = 1234, tokenizer_dir=None
) -> dict:
    """Deterministic inputs per tower: random tensors at each batch size, and real data.

    Text comes at every served sequence length (``random@16``: rows whose EOT lies inside 16 tokens,
    cut to 16); its reference is open_clip's ``encode_text`` on the same rows padded to the whole
    context (:func:`torch_reference`), so each bucket is checked against the uncut model."""
    from clip_triton.preprocess import Preprocessor  # noqa: PLC0415
    from clip_triton.tokenizer import text_tokenizer  # noqa: PLC0415 (its vocabulary loads on first use)

    rng = np.random.default_rng(seed)
    pixels = contract.pixels
    tok = contract.tokenizer
    vision, text = VISION.name, TEXT.name
    inputs: dict[str, list[tuple[str, np.ndarray]]] = {vision: [], text: []}
    for batch in batches:
        inputs[vision].append(("random", rng.standard_normal((batch, *pixels.shape)).astype(np.float32)))
    # Word ids: CLIP's between 1 and its SOT; a HF tokenizer's above its special ids (the first few).
    low, high = (
        (1, tok.sot_token_id)
        if tok.kind == "clip-bpe"
        else (max(tok.sot_token_id, tok.eot_token_id, tok.pad_token_id) + 1, tok.vocab_size)
    )
    start = [tok.sot_token_id] if tok.sot_token_id >= 0 else []  # Gemma and T5 add no start token
    # A row that starts with the padding id is a refused one (NaN by design): with no start token and
    # EOT = padding (SigLIP), every row holds a word.
    fewest = 1 if not start and tok.eot_token_id == tok.pad_token_id else 0
    for cut in tok.lengths:
        for batch in batches:
            ids = np.full((batch, cut), tok.pad_token_id, dtype=np.int32)
            for row in ids:
                length = int(
                    rng.integers(fewest, cut - len(start))
                )  # words between start and end: 0 .. cut - 1 - len(start)
                row[: len(start)] = start
                row[len(start) : len(start) + length] = rng.integers(low, high, size=length)
                row[len(start) + length] = tok.eot_token_id  # <= cut - 1
            inputs[text].append((_label("random", cut, tok), ids))
    pre = Preprocessor(contract.preprocess, dtype="float32")
    inputs[vision].append(("photos", np.stack([pre.from_bytes(b) for b in samples.image_bytes()])))
    # Real prompts, each in its own bucket (as the tokenizer model would send it alone).
    prompts = text_tokenizer(tok, tokenizer_dir)(list(samples.VERIFICATION_PROMPTS))
    by_length: dict[int, list[np.ndarray]] = {}
    for row in prompts:
        cut = cut_to_bucket(row[None], tok)
        by_length.setdefault(cut.shape[1], []).append(cut[0])
    for cut, rows in sorted(by_length.items()):
        inputs[text].append((_label("prompts", cut, tok), np.stack(rows)))
    return inputs


def _label(kind: str, length: int, tok) -> str:
    return f"{kind}@{length}" if tok.dynamic else kind


def padded(ids: np.ndarray, context_length: int, pad_id: int = 0) -> np.ndarray:
    """Token ids cut to a bucket, padded back to the whole context (what open_clip's tokenizer gives)."""
    out = np.full((ids.shape[0], context_length), pad_id, dtype=ids.dtype)
    out[:, : ids.shape[1]] = ids
    return out


def torch_reference(
    model, tower: str, batches: list[tuple[str, np.ndarray]], pad_id: int = 0, contract: ModelContract | None = None
) -> list[np.ndarray]:
    """open_clip PyTorch fp32 embeddings (L2-normalised) for each input batch: its own ``encode_image``
    and ``encode_text``, text padded to the whole context whatever bucket it was cut to."""
    import torch  # noqa: PLC0415

    from .graphs import text_context, tower_module  # noqa: PLC0415

    module = tower_module(model, tower)
    context = text_context(model, contract) if tower_spec(tower) is TEXT else None
    with torch.no_grad():
        return [module(torch.from_numpy(padded(x, context, pad_id) if context else x)).numpy() for _, x in batches]


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


REFUSAL_LABEL = "refused"
REFUSAL_MAX_DIFF = 1e-6  # the other rows: the unmarked batch's own values (rows never mix; observed 0)


def with_refusal(contract: ModelContract, tower: str, cases: list) -> tuple[list, int]:
    """``cases`` plus one more: a copy of the first case of two or more rows, its row 1 carrying the
    contract's refusal mark (what the fronts send for a refused item); and the copied case's index."""
    index = next(i for i, (_, x) in enumerate(cases) if x.shape[0] >= 2)
    marked = np.array(cases[index][1], copy=True)
    # The very row the preprocess or tokenizer model sends (the tokenizer's cut to this case's length).
    if tower_spec(tower) is VISION:
        marked[1] = refused_pixels(marked.shape[1:], marked.dtype)
    else:
        marked[1] = refused_row(contract.tokenizer)[: marked.shape[1]]
    return [*cases, (REFUSAL_LABEL, marked)], index


def check_refusal(tower: str, plain: np.ndarray, marked: np.ndarray) -> Check:
    """The marked batch's output: row 1 all NaN, every other row the unmarked batch's own."""
    others, base = np.delete(marked, 1, axis=0), np.delete(plain, 1, axis=0)
    cos = float(cosine(base, others).min()) if np.isfinite(others).all() else float("nan")
    diff = float(np.abs(base.astype(np.float64) - others).max())
    ok = bool(np.isnan(marked[1]).all() and np.isfinite(others).all() and diff <= REFUSAL_MAX_DIFF)
    return Check(tower, REFUSAL_LABEL, marked.shape[0], cos, diff, ok)


def compare_with_refusal(tower: str, cases: list, index: int, reference, outputs, precision: str) -> list[Check]:
    """:func:`compare` over ``cases`` less the last (from :func:`with_refusal`), then its refusal check."""
    checks = compare(tower, cases[:-1], reference, outputs[:-1], precision)
    return [*checks, check_refusal(tower, outputs[index], outputs[-1])]


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
