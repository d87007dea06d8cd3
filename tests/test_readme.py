"""README commands work as written: every `clip-triton` command in README.md, docs/, docker-compose.yml
and the Kubernetes build Job parses with the real CLI (flags that exist, combinations that mean
something), and the blocks marked `<!-- runs-in-tests: NAME -->` run against a real server."""

from __future__ import annotations

import ctypes.util
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from clip_triton import children

from .helpers import IMAGES, ROOT

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
CONFIGS = [ROOT / "docker-compose.yml", ROOT / "deploy" / "k8s" / "base" / "build-job.yaml"]


def bash_blocks(path: Path) -> list[tuple[str | None, str]]:
    """(marker name or None, block text) of each ```bash block."""
    text = path.read_text()
    found = []
    for match in re.finditer(r"(?:<!-- runs-in-tests: (\S+) -->\n)?```bash\n(.*?)```", text, re.S):
        found.append((match.group(1), match.group(2)))
    return found


def command_lines(block: str) -> list[str]:
    """Shell lines of a block, continuation lines joined."""
    return [line.strip() for line in block.replace("\\\n", " ").splitlines() if line.strip()]


def clip_triton_invocations(line: str) -> list[list[str]]:
    """Each `clip-triton ...` command in a shell line, as argv after `clip-triton` (up to &&, |, ; or &)."""
    found = []
    for part in re.split(r"&&|\|\||;|\|", line):
        try:
            words = shlex.split(part, comments=True)
        except ValueError as exc:  # a README command a shell could not parse is a defect, not a skip
            if "clip-triton" in part:
                raise AssertionError(f"README line cannot be parsed by a shell ({exc}): {line!r}") from None
            continue
        # the command, not a namespace or a name that happens to be spelled the same (kubectl -n clip-triton)
        at = [
            i
            for i, w in enumerate(words)
            if w == "clip-triton" and (i == 0 or words[i - 1] not in ("-n", "--namespace"))
        ]
        if at:
            argv = words[at[0] + 1 :]
            found.append([w for w in argv if w != "&"])
    return found


def documented_commands() -> list[tuple[str, list[str]]]:
    commands = []
    for path in DOCS:
        for _, block in bash_blocks(path):
            for line in command_lines(block):
                commands += [(f"{path.name}: {line}", argv) for argv in clip_triton_invocations(line)]
    import yaml

    def walk(node, where):
        if isinstance(node, dict):
            for value in node.values():
                walk(value, where)
        elif isinstance(node, list):
            if node[:1] == ["clip-triton"]:  # an argument list
                commands.append((f"{where}: {' '.join(node)}", [str(a) for a in node[1:]]))
            else:
                for value in node:
                    walk(value, where)
        elif isinstance(node, str) and "clip-triton " in node:  # a shell script
            script = node.replace("$(", "(")
            # A line built from shell variables (the loops over CLIP_MODELS) is parsed as the shell
            # expands it: tests/test_multi_model.py and tests/test_kubernetes.py run those scripts with
            # clip-triton recorded, and parse each recorded call with the real CLI.
            commands.extend(
                (f"{where}: {script[:60]}", argv)
                for argv in clip_triton_invocations(script)
                if not any("$" in word for word in argv)
            )

    for path in CONFIGS:
        for document in yaml.safe_load_all(path.read_text()):
            walk(document, path.name)
    return commands


def test_every_documented_command_parses_with_the_real_cli():
    from clip_triton.cli import build_parser, check_combinations
    from clip_triton.errors import ClipTritonError

    commands = documented_commands()
    assert len(commands) >= 30, len(commands)
    for where, argv in commands:
        parser = build_parser()
        try:
            args = parser.parse_args(argv)
            check_combinations(parser, args)
        except SystemExit:
            pytest.fail(f"does not parse: {where}")
        except ClipTritonError as exc:
            pytest.fail(f"refused ({exc}): {where}")
        if args.command in ("repo", "export") and any(a in ("--out",) or a.startswith("--out=") for a in argv):
            pytest.fail(f"old spelling --out (use --repo / --onnx-dir): {where}")


def test_repo_examples_write_to_different_folders():
    """Within a page, each `repo` example writes its own folder: copying them in turn overwrites nothing."""
    from clip_triton.cli import build_parser

    pages: dict[str, list[str]] = {}
    for where, argv in documented_commands():
        if argv[:1] == ["repo"] and where.endswith(".md", 0, where.index(":")):
            pages.setdefault(where.split(":")[0], []).append(build_parser().parse_args(argv).repo)
    assert sum(len(folders) for folders in pages.values()) >= 5, pages
    for page, folders in pages.items():
        assert len(set(folders)) == len(folders), (page, folders)


@pytest.fixture()
def readme_folder(tmp_path, photos) -> Path:
    """The files the README's client block names: cat.jpg, dog.jpg, photos/, captions.txt, dataset/, coco/."""
    (tmp_path / "cat.jpg").write_bytes(photos["cat"])
    (tmp_path / "dog.jpg").write_bytes(photos["coffee"])
    (tmp_path / "photos").mkdir()
    for path in IMAGES.glob("*.jpg"):
        for k in range(3):
            Image.open(path).rotate(k * 10).save(tmp_path / "photos" / f"{path.stem}-{k}.jpg")
    (tmp_path / "captions.txt").write_text("a red car\na cat on a sofa\na cup of coffee\n")
    for name in ("cat", "coffee", "rocket"):
        (tmp_path / "dataset" / name).mkdir(parents=True)
        (tmp_path / "dataset" / name / "1.jpg").write_bytes(photos[name])
    (tmp_path / "coco").mkdir()
    names = ["cat", "coffee", "rocket", "astronaut"]
    for i, name in enumerate(names):
        (tmp_path / "coco" / f"{i:012d}.jpg").write_bytes(photos[name])
    (tmp_path / "coco" / "captions.json").write_text(
        json.dumps(
            {
                "images": [{"id": i, "file_name": f"{i:012d}.jpg"} for i in range(len(names))],
                "annotations": [{"image_id": i, "caption": f"a photo of a {name}"} for i, name in enumerate(names)],
            }
        )
    )
    return tmp_path


def marked_block(name: str) -> list[str]:
    blocks = [block for path in DOCS for marker, block in bash_blocks(path) if marker == name]
    assert len(blocks) == 1, f"README and docs/ have {len(blocks)} blocks marked {name}"
    return command_lines(blocks[0])


def shell(line: str, cwd: Path, env: dict) -> subprocess.CompletedProcess:
    return children.run(
        ["bash", "-c", f"set -euo pipefail\n{line}"],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def readme_env(triton) -> dict:
    bin_dir = str(Path(sys.executable).parent)  # where `clip-triton` is installed
    return {**os.environ, "PATH": bin_dir + os.pathsep + os.environ["PATH"], "CLIP_TRITON_URL": triton.grpc_url}


def test_the_client_command_line_block_runs_as_written(triton, readme_folder):
    env = readme_env(triton)
    lines = marked_block("client-cli")
    assert len(lines) >= 7
    for line in lines:
        result = shell(line, readme_folder, env)
        assert result.returncode == 0, f"{line}\n{result.stdout}\n{result.stderr}"
    assert (readme_folder / "photos.npy").exists() and (readme_folder / "captions.json").exists()
    assert (readme_folder / "photos.parquet" / "part-00000.parquet").exists()
    assert (readme_folder / "photos.parquet" / "index.faiss").exists()
    assert json.loads((readme_folder / "eval.json").read_text())["images"] == 3


@pytest.mark.skipif(not ctypes.util.find_library("b64"), reason="perf_analyzer needs Debian's libb64-0d")
def test_the_perf_block_runs_as_written(triton, tmp_path):
    for line in marked_block("perf"):
        result = shell(line, tmp_path, readme_env(triton))
        assert result.returncode == 0, f"{line}\n{result.stdout}\n{result.stderr}"
        rows = [row.split() for row in result.stdout.splitlines()[1:]]
        assert [row[:3] for row in rows] == [["clip_text", "1", "1"], ["clip_text", "1", "2"]]
        assert all(float(row[3]) > 0 for row in rows)
    # --print-command prints a perf_analyzer line that runs by hand as printed (libcudart on its path)
    printed = shell(
        "clip-triton perf --ensembles clip_image --concurrency 1 --measurement-ms 1000 --print-command",
        tmp_path,
        readme_env(triton),
    )
    assert printed.returncode == 0, printed.stderr
    by_hand = next(line for line in printed.stderr.splitlines() if line.startswith("LD_LIBRARY_PATH="))
    result = shell(by_hand, tmp_path, readme_env(triton))
    assert result.returncode == 0 and "Throughput" in result.stdout, result.stdout + result.stderr


@pytest.mark.skipif(shutil.which("curl") is None, reason="the README's gateway block uses curl")
def test_the_gateway_block_runs_as_written(triton, readme_folder):
    """Run line by line; only the ports are changed (the session's Triton, a free gateway port)."""
    from clip_triton.server import free_port

    port = str(free_port())
    env = readme_env(triton)
    lines = [line.replace("localhost:8001", triton.grpc_url).replace("8080", port) for line in marked_block("gateway")]
    exports = [line for line in lines if line.startswith("export ")]
    server_line = next(line for line in lines if line.startswith("clip-triton gateway"))
    prefix = "\n".join(exports)  # lines, not "; ": a line's comment would swallow what follows
    gateway = children.spawn(
        ["bash", "-c", f"{prefix}\nexec {server_line.split(' &')[0]}"],
        cwd=readme_folder,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while shell(f"curl -sf localhost:{port}/healthz", readme_folder, env).returncode != 0:
            assert gateway.poll() is None and time.monotonic() < deadline, gateway.communicate()[0]
            time.sleep(0.2)
        answers = [shell(f"{prefix}\n{line}", readme_folder, env) for line in lines if line.startswith("curl")]
    finally:
        if gateway.poll() is None:
            os.killpg(gateway.pid, signal.SIGTERM)
        gateway.wait(timeout=30)
    bodies = [json.loads(answer.stdout) for answer in answers]
    assert [m["id"] for m in bodies[0]["data"]] == ["clip"]
    assert bodies[1]["model"] == "clip" and len(bodies[1]["data"]) == 2
    assert bodies[2]["model"] == "clip" and [s["prompt"] for s in bodies[2]["data"][0]["scores"]] != []
