"""Zero-shot evaluation through a deployment, with open_clip's ImageNet class names and templates.

The class names and the 80 OpenAI templates are open_clip's (``open_clip.zero_shot_metadata``),
shipped as data so no torch is needed; a test checks them against open_clip.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np

from clip_triton.errors import ClipTritonError

from .errors import ItemErrors
from .index import IMAGE_SUFFIXES


def zeroshot_metadata() -> dict:
    return json.loads(resources.files("clip_triton").joinpath("assets", "imagenet_zeroshot.json").read_text())


def templates(name: str) -> list[str]:
    """``openai`` (80 templates), ``simple`` (7), ``none`` (the class name alone), or a UTF-8 file with one
    template per line, ``{}`` standing for the class name."""
    if name == "none":
        return ["{}"]
    sets = zeroshot_metadata()["templates"]
    if name in sets:
        return sets[name]
    path = Path(name)
    if not path.is_file():
        raise ClipTritonError(f"--templates {name!r} is neither {', '.join([*sets, 'none'])} nor a file")
    lines = [line.strip() for line in _read(path, "--templates").splitlines() if line.strip()]
    bad = [line for line in lines if "{}" not in line]
    if not lines or bad:
        raise ClipTritonError(
            f"--templates {name}: {'no templates' if not lines else f'{bad[0]!r} has no {{}}'}",
            "one template per line, {} standing for the class name, e.g. 'a photo of a {}.'",
        )
    return lines


def _read(path: Path, flag: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ClipTritonError(f"{flag} {path} is not UTF-8", "convert it to UTF-8 first") from None


def image_folder(root: str | Path) -> tuple[list[Path], np.ndarray, list[str]]:
    """ImageFolder layout: one sub-folder per class, sorted; returns (paths, labels, folder names)."""
    root = Path(root)
    if not root.is_dir():
        raise ClipTritonError(f"{root} is not a folder", "pass an ImageFolder tree: ROOT/CLASS/IMAGE")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise ClipTritonError(
            f"{root} has no class sub-folders",
            "eval needs the ImageFolder layout ROOT/CLASS/IMAGE, one folder per class",
        )
    paths, labels = [], []
    for label, name in enumerate(classes):
        for path in sorted((root / name).rglob("*")):
            if path.suffix.lower() in IMAGE_SUFFIXES:
                paths.append(path)
                labels.append(label)
    if not paths:
        raise ClipTritonError(f"{root}'s class folders hold no images", f"image suffixes: {sorted(IMAGE_SUFFIXES)}")
    return paths, np.asarray(labels), classes


def class_names(folders: list[str], source: str) -> list[str]:
    """The prompt name of each class folder (in sorted folder order), from ``source``:

    ``folder``: the folder names (``_`` as space); ``imagenet``: open_clip's 1000 names in sorted-wnid
    order; a file with one name per line; or a comma-separated list.
    """
    if source == "folder":
        return [name.replace("_", " ") for name in folders]
    if source == "imagenet":
        names, what = zeroshot_metadata()["classnames"], "--classnames imagenet has 1000 names"
    elif Path(source).is_file():
        names = [line.strip() for line in _read(Path(source), "--classnames").splitlines() if line.strip()]
        what = f"--classnames {source} has {len(names)} names"
    else:
        names = [name.strip() for name in source.split(",") if name.strip()]
        what = f"--classnames has {len(names)} comma-separated names"
        if len(names) < 2 and len(folders) != len(names):
            what = f"--classnames {source!r} is not folder, imagenet, a file or a comma-separated list"
    if len(names) != len(folders):
        raise ClipTritonError(
            f"{what}, but the dataset has {len(folders)} class folders",
            "one name per class folder, in sorted folder order",
        )
    return names


@dataclass
class EvalResult:
    """Zero-shot accuracy: ``top1``/``top5`` are None ("n/a") where there are no more classes than k."""

    top1: float | None
    top5: float | None
    images: int
    classes: int
    failed: int
    per_class: dict[str, float] = field(default_factory=dict)  # class name -> top-1 accuracy
    per_class_images: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    def table(self) -> str:
        def pct(value):
            return "n/a" if value is None else f"{value * 100:.2f}%"

        lines = [
            f"{'images':>8}{'classes':>9}{'failed':>8}{'top-1':>9}{'top-5':>9}",
            f"{self.images:>8}{self.classes:>9}{self.failed:>8}{pct(self.top1):>9}{pct(self.top5):>9}",
        ]
        if self.per_class:
            width = min(40, max(len(name) for name in self.per_class) + 2)
            lines += ["", f"{'class':<{width}}{'images':>8}{'top-1':>9}"]
            lines += [
                f"{name[: width - 2]:<{width}}{self.per_class_images[name]:>8}{pct(acc):>9}"
                for name, acc in self.per_class.items()
            ]
        return "\n".join(lines)


def topk_accuracy(logits: np.ndarray, labels: np.ndarray, k: int) -> float | None:
    """Share of rows whose label is among the k highest logits; None when k >= the number of classes
    (every label would be in the top k: the figure would say nothing)."""
    if k >= logits.shape[1] or not len(labels):
        return None
    top = np.argsort(-logits, axis=1)[:, :k]
    return float((top == labels[:, None]).any(axis=1).mean())


@dataclass
class ZeroShotTask:
    """What an evaluation will send, read and checked before any server is dialled."""

    paths: list[Path]
    labels: np.ndarray
    names: list[str]
    templates: list[str]

    @classmethod
    def prepare(
        cls, root: str | Path, *, classnames: str = "folder", template_set: str = "openai", limit: int | None = None
    ) -> ZeroShotTask:
        paths, labels, folders = image_folder(root)
        if limit:
            paths, labels = paths[:limit], labels[:limit]
        return cls(paths, labels, class_names(folders, classnames), templates(template_set))


def evaluate(
    client, root: str | Path, *, classnames: str = "folder", template_set: str = "openai", limit: int | None = None
) -> EvalResult:
    """Top-1/top-5 and per-class zero-shot accuracy of the deployment behind ``client`` on an ImageFolder."""
    task = ZeroShotTask.prepare(root, classnames=classnames, template_set=template_set, limit=limit)
    return evaluate_task(client, task)


def evaluate_task(client, task: ZeroShotTask) -> EvalResult:
    """:func:`evaluate` of a prepared task."""
    paths, labels, names = task.paths, task.labels, task.names
    classifier = client.prompt_embeddings(names, task.templates)
    failed = 0
    try:
        images = client.embed_images(paths)
    except ItemErrors as err:  # unreadable files do not stop an evaluation; they are counted
        keep = np.array([i not in err.errors for i in range(len(paths))])
        images, labels, failed = err.embeddings[keep], labels[keep], int((~keep).sum())
    logits = images @ classifier.T
    predicted = logits.argmax(axis=1) if len(labels) else np.zeros(0, dtype=int)
    per_class, counts = {}, {}
    for label in sorted(set(labels.tolist())):
        mask = labels == label
        per_class[names[label]] = float((predicted[mask] == label).mean())
        counts[names[label]] = int(mask.sum())
    top1 = float((predicted == labels).mean()) if len(labels) and len(names) > 1 else None
    return EvalResult(top1, topk_accuracy(logits, labels, 5), len(labels), len(names), failed, per_class, counts)
