"""Micro-benchmarks: clip-triton's torch-free preprocessing and tokenizer vs open_clip's own, one run.

python bench/micro.py
"""

from __future__ import annotations

import io
import time

import numpy as np


def rate(fn, items, seconds: float = 3.0) -> float:
    fn(items[0])
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        fn(items[done % len(items)])
        done += 1
    return done / (time.perf_counter() - start)


def _clear(tokenizer) -> None:
    """Empty open_clip's BPE cache (it starts with the special tokens only)."""
    tokenizer.cache = {t: t for t in ("<start_of_text>", "<end_of_text>")}


def main() -> None:
    import open_clip
    from PIL import Image
    from run import photos  # bench/run.py

    from clip_triton.contract import ModelContract
    from clip_triton.preprocess import Preprocessor
    from clip_triton.tokenizer import ClipTokenizer

    contract = ModelContract.default()
    pre = contract.preprocess
    transform = open_clip.image_transform(pre.image_size, is_train=False, mean=pre.mean, std=pre.std)
    ours = Preprocessor(pre)
    blobs = photos()
    reference_tok = open_clip.get_tokenizer(contract.model)
    tok = ClipTokenizer(contract.tokenizer)
    corpus = [
        f"a photo of a {w} number {i}, {w}s everywhere"
        for i, w in enumerate(
            ["cat", "dog", "car", "tree", "house", "bird", "boat", "plane", "chair", "table", "lamp", "phone"] * 50
        )
    ]

    rows = [
        (
            "preprocess JPEG -> [3,224,224]",
            rate(lambda b: transform(Image.open(io.BytesIO(b))), blobs),
            rate(ours.from_bytes, blobs),
        ),
        (
            "tokenize (word caches cleared per text)",
            rate(lambda t: (_clear(reference_tok), reference_tok([t])), corpus),
            rate(lambda t: (tok._words.clear(), tok.ids(t)), corpus),
        ),
        ("tokenize (warm word cache)", rate(lambda t: reference_tok([t]), corpus), rate(tok.ids, corpus)),
    ]
    print(f"{'operation (one item, one core)':<40}{'open_clip /s':>14}{'clip-triton /s':>16}{'ratio':>8}")
    for name, ref, mine in rows:
        print(f"{name:<40}{ref:>14.0f}{mine:>16.0f}{mine / ref:>8.2f}")
    same = all(np.array_equal(transform(Image.open(io.BytesIO(b))).numpy(), ours.from_bytes(b)) for b in blobs)
    print(
        f"outputs identical to open_clip: preprocessing {same}, "
        f"tokens {bool((reference_tok(corpus).numpy() == tok(corpus)).all())}"
    )


if __name__ == "__main__":
    main()
