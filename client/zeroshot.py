"""Zero-shot evaluation through a deployment, with open_clip's ImageNet class names and templates.

The class names and the 80 OpenAI templates are open_clip's (``open_clip.zero_shot_metadata``),
shipped as data so no torch is needed; a test checks them against open_clip.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def zeroshot_metadata() -> dict:
    return json.loads(resources.files("clip_triton").joinpath("assets", "imagenet_zeroshot.json").read_text())


def templates(name: str) -> list[str]:
    """``openai`` (80 templates), ``simple`` (7), or ``none`` (the class name alone)."""
    if name == "none":
        return ["{}"]
    return zeroshot_metadata()["templates"][name]


def image_folder(root: str | Path) -> tuple[list[Path], np.ndarray, list[str]]:
    """ImageFolder layout: one sub-folder per class, sorted; returns (paths, labels, folder names)."""
    root = Path(root)
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise ValueError(f"{root} has no class sub-folders (ImageFolder layout: ROOT/CLASS/IMAGE)")
    paths, labels = [], []
    for label, name in enumerate(classes):
        for path in sorted((root / name).rglob("*")):
            if path.suffix.lower() in IMAGE_SUFFIXES:
                paths.append(path)
                labels.append(label)
    return paths, np.asarray(labels), classes


def class_names(folders: list[str], source: str) -> list[str]:
    """``imagenet``: open_clip's 1000 names in sorted-wnid order; ``folder``: the folder names."""
    if source == "imagenet":
        names = zeroshot_metadata()["classnames"]
        if len(folders) != len(names):
            raise ValueError(f"--classnames imagenet needs 1000 class folders, found {len(folders)}")
        return names
    return [name.replace("_", " ") for name in folders]


@dataclass
class EvalResult:
    top1: float
    top5: float
    images: int
    classes: int
    failed: int

    def table(self) -> str:
        return (f"{'images':>8}{'classes':>9}{'failed':>8}{'top-1':>9}{'top-5':>9}\n"
                f"{self.images:>8}{self.classes:>9}{self.failed:>8}{self.top1 * 100:>8.2f}%{self.top5 * 100:>8.2f}%")


def topk_accuracy(logits: np.ndarray, labels: np.ndarray, k: int) -> float:
    k = min(k, logits.shape[1])
    top = np.argsort(-logits, axis=1)[:, :k]
    return float((top == labels[:, None]).any(axis=1).mean())


def evaluate(client, root: str | Path, *, classnames: str = "folder", template_set: str = "openai",
             limit: int | None = None) -> EvalResult:
    """Top-1/top-5 zero-shot accuracy of the deployment behind ``client`` on an ImageFolder."""
    from .grpc_client import ItemErrors  # noqa: PLC0415

    paths, labels, folders = image_folder(root)
    if limit:
        paths, labels = paths[:limit], labels[:limit]
    names = class_names(folders, classnames)
    classifier = client.prompt_embeddings(names, templates(template_set))
    failed = 0
    try:
        images = client.embed_images(paths)
    except ItemErrors as err:  # unreadable files do not stop an evaluation; they are counted
        keep = np.array([i not in err.errors for i in range(len(paths))])
        images, labels, failed = err.embeddings[keep], labels[keep], int((~keep).sum())
    logits = images @ classifier.T
    return EvalResult(topk_accuracy(logits, labels, 1), topk_accuracy(logits, labels, 5), len(labels),
                      len(names), failed)
