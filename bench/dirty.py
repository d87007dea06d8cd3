"""Dirty data at full speed: a folder with bad files and a text list with empty lines, embedded in the
same run as their clean versions, through ClipClient and `clip-triton embed`.

    python bench/dirty.py [--model ViT-B-32] [--images 1000] [--texts 10000] [--json out.json]

Bad items are flagged per item by the server (STATUS), so a batch holding them is still one round
trip; the target is dirty / clean <= 1.15. Prints a table; --json writes the same rows for tests.
"""

from __future__ import annotations

import argparse
import io
import json
import random
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import bench_repo_options, prepared_export  # bench/common.py

BAD_FILES = (b"", b"not an image at all", b"<!doctype html><p>404</p>", b"\xff\xd8\xff\xe0 truncated")


def photo(seed: int) -> bytes:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    size = (int(rng.integers(180, 400)), int(rng.integers(180, 400)))
    pixels = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()


def make_folders(work: Path, n: int, bad_share: float) -> tuple[Path, Path]:
    """A clean folder of n photos, and the same folder with bad_share of them replaced by bad files."""
    clean, dirty = work / f"photos-clean-{n}", work / f"photos-dirty-{n}"
    if not (clean / ".complete").exists():
        for folder in (clean, dirty):
            folder.mkdir(parents=True, exist_ok=True)
        rng = random.Random(0)
        bad = set(rng.sample(range(n), int(n * bad_share)))
        for i in range(n):
            data = photo(i)
            (clean / f"{i:05d}.jpg").write_bytes(data)
            (dirty / f"{i:05d}.jpg").write_bytes(BAD_FILES[i % len(BAD_FILES)] if i in bad else data)
        (clean / ".complete").write_text("")
    return clean, dirty


def make_texts(n: int, empty_share: float) -> tuple[list[str], list[str]]:
    rng = random.Random(1)
    words = [
        "cat",
        "dog",
        "red",
        "blue",
        "car",
        "street",
        "night",
        "river",
        "photo",
        "painting",
        "of",
        "a",
        "the",
        "small",
        "large",
        "old",
        "new",
    ]
    clean = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) for _ in range(n)]
    dirty = list(clean)
    for i in rng.sample(range(n), int(n * empty_share)):
        dirty[i] = rng.choice(["", "   ", "\t"])
    return clean, dirty


def timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--texts", type=int, default=10000)
    parser.add_argument("--bad-images", type=float, default=0.05)
    parser.add_argument("--empty-texts", type=float, default=0.02)
    parser.add_argument("--workdir", default=".clip-triton/bench")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    from clip_triton.client import ClipClient, ItemErrors
    from clip_triton.repository import write_repository
    from clip_triton.server import TritonServer

    work = Path(args.workdir)
    onnx_dir = prepared_export(args.model, work)
    repo = write_repository(
        work / "dirty-repo",
        onnx_dir=onnx_dir,
        options=bench_repo_options(),
        force=True,
    )
    clean_dir, dirty_dir = make_folders(work, args.images, args.bad_images)
    clean_texts, dirty_texts = make_texts(args.texts, args.empty_texts)
    rows = []
    with (
        TritonServer(repo, log_file=work / "dirty-triton.log", response_cache_mib=0) as server,
        ClipClient(server.grpc_url) as client,
    ):

        def embed(kind, items):
            try:
                return client.embed_images(items) if kind == "images" else client.embed_texts(items)
            except ItemErrors as err:
                return err.embeddings

        def cli(folder: Path, out: str):
            done = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "clip_triton.cli",
                    "embed",
                    "--images",
                    str(folder),
                    "--out",
                    str(work / out),
                    "--force",
                    "--skip-errors",
                    "--url",
                    server.grpc_url,
                ],
                capture_output=True,
                text=True,
            )
            if done.returncode != 0:
                raise SystemExit(f"clip-triton embed failed: {done.stderr[-2000:]}")

        embed("texts", clean_texts[:64])  # warm-up
        for label, clean, dirty in (
            (
                f"ClipClient, {args.images} images, {args.bad_images:.0%} bad files",
                lambda: embed("images", sorted(map(str, clean_dir.glob("*.jpg")))),
                lambda: embed("images", sorted(map(str, dirty_dir.glob("*.jpg")))),
            ),
            (
                f"ClipClient, {args.texts} texts, {args.empty_texts:.0%} empty",
                lambda: embed("texts", clean_texts),
                lambda: embed("texts", dirty_texts),
            ),
            (
                f"clip-triton embed, {args.images} images, {args.bad_images:.0%} bad files",
                lambda: cli(clean_dir, "clean.npy"),
                lambda: cli(dirty_dir, "dirty.npy"),
            ),
        ):
            t_clean, t_dirty = timed(clean), timed(dirty)
            rows.append(
                {
                    "case": label,
                    "clean_s": round(t_clean, 2),
                    "dirty_s": round(t_dirty, 2),
                    "ratio": round(t_dirty / t_clean, 3),
                }
            )
            print(f"{label:<52}{t_clean:>9.2f} s{t_dirty:>9.2f} s{t_dirty / t_clean:>8.2f}x", flush=True)
    print(f"\n{args.model}, random weights, CPU python-backend encoders; target: dirty <= 1.15 x clean")
    print(f"{'case':<52}{'clean':>11}{'dirty':>11}{'ratio':>9}")
    for row in rows:
        print(f"{row['case']:<52}{row['clean_s']:>9.2f} s{row['dirty_s']:>9.2f} s{row['ratio']:>8.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
