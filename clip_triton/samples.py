"""The sample data every part uses, declared once: the bundled photographs (public domain / CC0, see
``assets/images/PROVENANCE.md``) and prompts.

Verification, the demo, perf_analyzer's input data and the benchmarks all read these.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

IMAGES = ("cat.jpg", "coffee.jpg", "astronaut.jpg", "rocket.jpg")

# What the demo asks about its photographs (one prompt per photograph, and one that fits none).
DEMO_PROMPTS = (
    "a photo of a cat",
    "a photo of a cup of coffee",
    "a photo of an astronaut",
    "a photo of a rocket launch",
    "a photo of a dog",
)

# Real text for verification: plain captions, Unicode and emoji, and one longer than the context.
VERIFICATION_PROMPTS = (
    "a photo of a cat",
    "a cup of coffee on a saucer",
    "an astronaut in a space suit",
    "a rocket launching into the sky",
    "a diagram of a neural network",
    "Ünïcödé, emoji 🐱 and 日本語 together",
    "a very long caption " + "that keeps going " * 30,
)

# Short queries for load generation (perf_analyzer's input data, the client-vs-perf_analyzer bench).
PERF_PROMPTS = (
    "a photo of a cat",
    "a photo of a dog",
    "a diagram",
    "an astronaut on the moon",
    "a cup of coffee",
    "a rocket launch at night",
    "a bowl of soup",
    "a city street in the rain",
)


# Texts of the side-by-side benchmark (bench/run.py).
BENCH_PROMPTS = (
    "a photo of a cat",
    "a photo of a dog",
    "a diagram of a neural network",
    "an astronaut on the moon",
    "a cup of coffee on a wooden table",
    "a rocket launch at night",
    "a bowl of soup",
    "a rainy city street",
)


def image_paths() -> list[Path]:
    folder = resources.files("clip_triton").joinpath("assets", "images")
    return [Path(str(folder.joinpath(name))) for name in IMAGES]


def image_bytes() -> list[bytes]:
    return [path.read_bytes() for path in image_paths()]


# The demo's working folder, and the sample dataset it writes there: the bundled photographs as an
# ImageFolder (one class folder each) with a COCO captions file, so that every example in the docs
# and in each command's --help runs as written after `clip-triton demo`.
DEMO_WORKDIR = ".clip-triton/demo"
SAMPLE_CLASSES = {"cat.jpg": "cat", "coffee.jpg": "cup_of_coffee", "astronaut.jpg": "astronaut", "rocket.jpg": "rocket"}
SAMPLE_CAPTIONS = {
    "cat.jpg": "a cat looking at the camera",
    "coffee.jpg": "a cup of coffee on a table",
    "astronaut.jpg": "an astronaut in a space suit",
    "rocket.jpg": "a rocket launching into the sky",
}


def write_sample_dataset(folder: str | Path) -> Path:
    """``folder/CLASS/NAME.jpg`` for each bundled photograph and ``folder/captions.json`` (COCO
    layout); idempotent. Returns ``folder``."""
    import json  # noqa: PLC0415

    root = Path(folder)
    images, annotations = [], []
    for index, (name, path) in enumerate(zip(IMAGES, image_paths())):
        target = root / SAMPLE_CLASSES[name] / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists() or target.read_bytes() != path.read_bytes():
            target.write_bytes(path.read_bytes())
        images.append({"id": index, "file_name": f"{SAMPLE_CLASSES[name]}/{name}"})
        annotations.append({"id": index, "image_id": index, "caption": SAMPLE_CAPTIONS[name]})
    (root / "captions.json").write_text(json.dumps({"images": images, "annotations": annotations}, indent=1) + "\n")
    return root


# One example per command, each run as written after `clip-triton demo` (with the serve line running
# in another shell): ends every command's --help, and the demo prints the use lines as its next steps.
# {work} is the demo's folder, {url} where clients look for Triton by default.
EXAMPLES = {
    "export": "clip-triton export --model ViT-B-32 --pretrained none --onnx-dir {work}/onnx --reuse",
    "verify": "clip-triton verify --onnx-dir {work}/onnx",
    "repo": "clip-triton repo --onnx-dir {work}/onnx --repo {work}/model_repository --runtime python --force",
    "build-engines": "clip-triton build-engines --onnx-dir /exports/bigG --root /models   # GPU host, TensorRT image",
    "check-engines": "clip-triton check-engines --repo /models/current   # GPU host, TensorRT image",
    "serve": "clip-triton serve --repo {work}/model_repository",
    "health": "clip-triton health --url {url}",
    "demo": "clip-triton demo",
    "gateway": "clip-triton gateway --url {url} --no-auth   # local use only",
    "perf": "clip-triton perf --ensembles clip_text --concurrency 1 --measurement-ms 1500",
    "classify": 'clip-triton classify {work}/samples/cat/cat.jpg --prompts "a cat" "a dog" "a rocket"',
    "embed": "clip-triton embed --images {work}/samples --out {work}/photos",
    "search": 'clip-triton search --index {work}/photos --text "a cup of coffee" -k 2',
    "eval": "clip-triton eval {work}/samples --templates simple",
    "eval-retrieval": "clip-triton eval-retrieval --images {work}/samples --captions {work}/samples/captions.json -k 1,2",
}


def example(command: str, work: str | Path = DEMO_WORKDIR) -> str:
    from .contract import DEFAULT_URL  # noqa: PLC0415

    return EXAMPLES[command].format(work=work, url=DEFAULT_URL)
