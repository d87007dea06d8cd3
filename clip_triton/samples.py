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
