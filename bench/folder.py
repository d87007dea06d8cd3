"""A user's folder of camera photos through `clip-triton embed`, with every default, beside a fixed
per-request deadline (what the client did before: 60 s whatever the batch and the queue).

    python bench/folder.py [--model ViT-B-32] [--photos 300] [--size 3000x2250] [--json out.json]

One server, one run: the same folder is embedded with the automatic deadlines (the default) and with
`--timeout 60`. Prints a table: wall time, rows written, exit code, the error line if any.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import bench_repo_options, prepared_export  # bench/common.py


def make_photos(folder: Path, n: int, size: tuple[int, int]) -> Path:
    """``n`` camera-sized JPEGs, variations of the bundled photographs (made once, then reused)."""

    from PIL import Image, ImageEnhance

    folder.mkdir(parents=True, exist_ok=True)
    if len(list(folder.glob("*.jpg"))) == n:
        return folder
    from clip_triton.samples import image_paths

    sources = [Image.open(path).convert("RGB").resize(size) for path in image_paths()]
    for i in range(n):
        image = ImageEnhance.Brightness(sources[i % 4]).enhance(0.7 + (i % 13) * 0.05).rotate((i // 4) % 9 - 4)
        image.save(folder / f"IMG_{i:04d}.jpg", quality=90)
    return folder


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--photos", type=int, default=300)
    parser.add_argument("--size", default="3000x2250", help="photo size WxH (default: a 6.75 Mpx camera)")
    parser.add_argument("--workdir", default=".clip-triton/bench")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    from clip_triton.repository import write_repository
    from clip_triton.server import TritonServer

    work = Path(args.workdir)
    size = tuple(int(v) for v in args.size.split("x"))
    onnx_dir = prepared_export(args.model, work)
    repo = write_repository(
        work / "folder-repo",
        onnx_dir=onnx_dir,
        options=bench_repo_options(),
        force=True,
    )
    photos = make_photos(work / f"photos-{args.photos}-{args.size}", args.photos, size)
    rows = []
    with TritonServer(repo, log_file=work / "folder-triton.log", response_cache_mib=0) as server:
        for label, extra in (
            ("defaults (automatic deadlines)", []),
            ("--timeout 60 (fixed, as before)", ["--timeout", "60"]),
        ):
            out = work / "folder-index"
            started = time.monotonic()
            done = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "clip_triton.cli",
                    "embed",
                    "--images",
                    str(photos),
                    "--out",
                    str(out),
                    "--force",
                    "--url",
                    server.grpc_url,
                    *extra,
                ],
                capture_output=True,
                text=True,
            )
            seconds = time.monotonic() - started
            written = (
                len(json.loads(out.with_suffix(".json").read_text())["items"])
                if out.with_suffix(".json").exists()
                else 0
            )
            error = next((line for line in done.stderr.splitlines() if line.startswith("error:")), "")
            rows.append(
                {"case": label, "seconds": round(seconds, 1), "rows": written, "exit": done.returncode, "error": error}
            )
            print(
                f"{label:<34}{seconds:>8.1f} s{written:>6}/{args.photos} rows  exit {done.returncode}  {error[:90]}",
                flush=True,
            )
    print(
        f"\n{args.model}, random weights, {args.photos} JPEGs of {args.size}, CPU python-backend encoders, "
        "client defaults otherwise (batch = server max 64, 4 requests in flight)"
    )
    print(f"{'case':<34}{'time':>10}{'rows':>11}{'exit':>6}")
    for row in rows:
        print(f"{row['case']:<34}{row['seconds']:>8.1f} s{row['rows']:>7}/{args.photos}{row['exit']:>6}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
