"""How close two embeddings are: the measure every fidelity check (export, engines, benches) reports
against the contract's ``TOLERANCES``. numpy only."""

from __future__ import annotations

from typing import Any


def cosine(a, b) -> Any:
    """Row-wise cosine similarity of two (N, D) arrays (numpy), in float64."""
    import numpy as np  # noqa: PLC0415

    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    num = (a * b).sum(-1)
    den = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    return num / np.maximum(den, 1e-30)
