"""Image-text retrieval recall@k through a deployment (the COCO / Flickr30k benchmark of CLIP papers).

Captions come from either JSON layout the datasets ship in:

* COCO captions (``captions_val2017.json``): ``images[] {id, file_name}`` and
  ``annotations[] {image_id, caption}``;
* Karpathy splits (``dataset_flickr30k.json``, ``dataset_coco.json``): ``images[] {filename,
  [filepath], [split], sentences[] {raw}}``; ``split`` selects one split (``test`` is the benchmark's).

Image-to-text recall@k: an image counts when any of its captions is among the k texts closest to it.
Text-to-image recall@k: a caption counts when its image is among the k images closest to it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from clip_triton.errors import ClipTritonError

from .errors import ItemErrors


@dataclass(frozen=True)
class CaptionedImage:
    path: Path
    captions: tuple[str, ...]


def load_captions(images_root: str | Path, captions_file: str | Path, split: str | None = None) -> list[CaptionedImage]:
    """The images with their captions, in the file's order (images without a caption are left out)."""
    root, path = Path(images_root), Path(captions_file)
    if not root.is_dir():
        raise ClipTritonError(
            f"--images {root} is not a folder", "pass the folder the captions file's image names are relative to"
        )
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ClipTritonError(f"--captions {path}: no such file") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ClipTritonError(f"--captions {path} is not UTF-8 JSON ({exc})") from None
    images = document.get("images") if isinstance(document, dict) else None
    if not isinstance(images, list):
        raise ClipTritonError(
            f"--captions {path} has no 'images' list",
            "expected COCO captions JSON (images + annotations) or a Karpathy split JSON",
        )
    found: list[CaptionedImage] = []
    if "annotations" in document and split:
        raise ClipTritonError(
            f"--split {split}: {path} is a COCO captions file, which has no splits",
            "leave out --split (a COCO file is one split already)",
        )
    if "annotations" in document:  # COCO
        captions: dict[int, list[str]] = {}
        for note in document["annotations"]:
            captions.setdefault(note["image_id"], []).append(str(note["caption"]).strip())
        for image in images:
            if captions.get(image["id"]):
                found.append(CaptionedImage(root / image["file_name"], tuple(captions[image["id"]])))
    else:  # Karpathy
        for image in images:
            if split and image.get("split") != split:
                continue
            texts = tuple(str(s.get("raw", "")).strip() for s in image.get("sentences", []) if s.get("raw"))
            if texts:
                found.append(CaptionedImage(root / image.get("filepath", "") / image["filename"], texts))
    if not found:
        raise ClipTritonError(f"--captions {path} lists no captioned image" + (f" in split {split!r}" if split else ""))
    return found


@dataclass
class RetrievalResult:
    """Recall@k in both directions (fractions), with what was evaluated."""

    image_to_text: dict[int, float]
    text_to_image: dict[int, float]
    images: int
    captions: int
    failed: int

    def to_dict(self) -> dict:
        return asdict(self)

    def table(self) -> str:
        ks = sorted(self.image_to_text)
        lines = [
            f"{self.images} images, {self.captions} captions, {self.failed} images failed",
            f"{'direction':<16}" + "".join(f"{f'R@{k}':>9}" for k in ks),
        ]
        for name, values in (("image -> text", self.image_to_text), ("text -> image", self.text_to_image)):
            lines.append(f"{name:<16}" + "".join(f"{values[k] * 100:>8.2f}%" for k in ks))
        return "\n".join(lines)


def recall_at_k(images: np.ndarray, texts: np.ndarray, owner: np.ndarray, ks: tuple[int, ...]) -> tuple[dict, dict]:
    """``owner[j]`` is the row of ``images`` that caption ``j`` describes."""
    scores = images @ texts.T  # (images, texts)
    ranked_texts = np.argsort(-scores, axis=1, kind="stable")
    ranked_images = np.argsort(-scores.T, axis=1, kind="stable")
    i2t, t2i = {}, {}
    for k in ks:
        hits = owner[ranked_texts[:, :k]] == np.arange(len(images))[:, None]
        i2t[k] = float(hits.any(axis=1).mean())
        t2i[k] = float((ranked_images[:, :k] == owner[:, None]).any(axis=1).mean())
    return i2t, t2i


def evaluate_retrieval(
    client,
    images_root: str | Path,
    captions_file: str | Path,
    *,
    ks: tuple[int, ...] = (1, 5, 10),
    limit: int | None = None,
    split: str | None = None,
) -> RetrievalResult:
    """Recall@k of the deployment behind ``client``; images it refuses are left out with their captions."""
    return evaluate_captions(client, load_captions(images_root, captions_file, split)[:limit], ks=ks)


def evaluate_captions(client, dataset: list[CaptionedImage], *, ks: tuple[int, ...] = (1, 5, 10)) -> RetrievalResult:
    """:func:`evaluate_retrieval` of captions already loaded (and checked) by :func:`load_captions`."""
    failed: set[int] = set()
    try:
        image_rows = client.embed_images([item.path for item in dataset])
    except ItemErrors as err:
        image_rows, failed = err.embeddings, set(err.errors)
    kept = [i for i in range(len(dataset)) if i not in failed]
    texts = [caption for i in kept for caption in dataset[i].captions]
    owner = np.array([row for row, i in enumerate(kept) for _ in dataset[i].captions])
    text_rows = client.embed_texts(texts)
    i2t, t2i = recall_at_k(image_rows[kept], text_rows, owner, tuple(sorted(set(ks))))
    return RetrievalResult(i2t, t2i, len(kept), len(texts), len(failed))
