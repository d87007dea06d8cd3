"""Scoring, templates and prompt sets: pure numpy, no I/O (shared by every client and the gateway)."""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np


def template_texts(prompts: Sequence[str], templates: Sequence[str]) -> list[str]:
    """Every prompt in every template, ``{}`` replaced literally: never ``str.format``, so a template's
    other braces (``{:>30000000}``, ``{0.__class__}``) are plain text."""
    return [t.replace("{}", p) for p in prompts for t in templates]


DEFAULT_PROMPT_CACHE_BYTES = 64 * 1024 * 1024


def prompt_set_key(prompts: Sequence[str], templates: Sequence[str] | None, language: str | None = None) -> bytes:
    """A prompt set's cache key: the SHA-256 of its prompts, templates and language, each length-prefixed
    (so no two sets share a key by concatenation). 32 bytes, whatever the set holds: keys holding the
    strings made each cached set of 256 long prompts cost +64 MB."""
    digest = hashlib.sha256()
    for group in (prompts, templates or (), (language,) if language else ()):
        digest.update(len(group).to_bytes(8, "little"))
        for text in group:
            data = text.encode("utf-8", "surrogatepass")
            digest.update(len(data).to_bytes(8, "little") + data)
    return digest.digest()


class PromptCache:
    """Prompt-set embeddings (keyed by :func:`prompt_set_key`), least recently used first out: bounded
    in entries and in bytes (the arrays plus their keys), however many and however large the prompt
    sets callers send. A value larger than the whole budget is not kept."""

    def __init__(self, entries: int = 256, max_bytes: int = DEFAULT_PROMPT_CACHE_BYTES):
        self.entries, self.max_bytes = entries, max_bytes
        self._data: OrderedDict = OrderedDict()
        self.bytes = 0

    def get(self, key):
        value = self._data.get(key)
        if value is not None:
            self._data.move_to_end(key)
        return value

    @staticmethod
    def _size(key, value) -> int:
        parts = value if isinstance(value, tuple) else (value,)
        return sum(int(getattr(part, "nbytes", 0)) for part in parts) + len(key)

    def put(self, key, value) -> None:
        size = self._size(key, value)
        if size > self.max_bytes or self.entries <= 0:
            return
        if key in self._data:
            self.bytes -= self._size(key, self._data.pop(key))
        self._data[key] = value
        self.bytes += size
        while len(self._data) > self.entries or self.bytes > self.max_bytes:
            self.bytes -= self._size(*self._data.popitem(last=False))

    def __len__(self) -> int:
        return len(self._data)


def ensemble_templates(embeddings: np.ndarray, n_prompts: int, n_templates: int) -> np.ndarray:
    mean = embeddings.reshape(n_prompts, n_templates, -1).mean(axis=1)
    return mean / np.linalg.norm(mean, axis=-1, keepdims=True)


def rank(
    cosines: np.ndarray, prompts: Sequence[str], logit_scale: float, logit_bias: float | None = None
) -> list[list[dict]]:
    """Per row of ``cosines``: prompts ranked by probability, as the model was trained to score them.

    CLIP (no ``logit_bias``): ``softmax(logit_scale * cos)`` over the prompts, summing to 1. SigLIP
    (a learned ``logit_bias``): ``sigmoid(logit_scale * cos + logit_bias)`` for each prompt on its
    own: a probability that the prompt matches, independent of the other prompts (open_clip's
    ``SigLipLoss``); a softmax there would invent a competition the model never learned."""
    logits = logit_scale * cosines + (logit_bias or 0.0)
    if logit_bias is not None:
        probs = 0.5 * (1.0 + np.tanh(0.5 * logits))  # the sigmoid, without overflow for large |logits|
    else:
        logits = logits - logits.max(axis=1, keepdims=True)
        probs = np.exp(logits)
        probs /= probs.sum(axis=1, keepdims=True)
    results = []
    for row_cos, row_prob in zip(cosines, probs):
        order = np.argsort(-row_prob, kind="stable")
        results.append(
            [{"prompt": prompts[j], "cosine": float(row_cos[j]), "probability": float(row_prob[j])} for j in order]
        )
    return results


def top_k(query: np.ndarray, index: np.ndarray, k: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` rows of ``index`` by cosine to each query row: ``(indices, scores)``."""
    query = np.atleast_2d(np.asarray(query, dtype=np.float32))
    scores = query @ np.asarray(index, dtype=np.float32).T
    k = min(k, scores.shape[1])
    top = np.argsort(-scores, axis=1)[:, :k]
    return top, np.take_along_axis(scores, top, axis=1)
