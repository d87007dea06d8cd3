"""deploy/gpu-check.sh's wait for triton, driven by a fake `docker` on PATH (issue 26): bounded, with
the bound in the message, and a restart loop is a failure rather than a wait."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from .helpers import ROOT

pytestmark = pytest.mark.integration

FAKE_DOCKER = """#!/usr/bin/env bash
# docker compose ... / docker inspect ...: states come from $FAKE_STATES, one per inspect call
echo "$*" >> "$FAKE_LOG"
case "$1 $2" in
  "compose ps") echo c0ffee ;;
  "compose logs") echo "last triton log line" ;;
  "inspect -f")
    n=$(grep -c '^inspect' "$FAKE_LOG")
    sed -n "${n}p" "$FAKE_STATES" | grep . || tail -n 1 "$FAKE_STATES" ;;
esac
exit 0
"""


def run_check(tmp_path: Path, states: list[str], timeout_s: int = 600) -> subprocess.CompletedProcess:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "docker").write_text(FAKE_DOCKER)
    (bin_dir / "docker").chmod(0o755)
    (tmp_path / "states").write_text("\n".join(states) + "\n")
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "FAKE_STATES": str(tmp_path / "states"),
        "FAKE_LOG": str(tmp_path / "log"),
        "GPU_CHECK_TIMEOUT_S": str(timeout_s),
        "GPU_CHECK_POLL_S": "0",
    }
    return subprocess.run(
        ["bash", str(ROOT / "deploy" / "gpu-check.sh"), "--quick"], capture_output=True, text=True, env=env, timeout=120
    )


def test_a_healthy_triton_goes_on_to_the_check(tmp_path):
    done = run_check(tmp_path, ["created||0", "running|starting|0", "running|healthy|0"])
    assert done.returncode == 0, done.stderr
    assert (
        "compose run --rm sdk python -m clip_triton.gpucheck --url triton:8001 --repo /models/current --quick"
        in (tmp_path / "log").read_text()
    )


@pytest.mark.parametrize(
    "states, reason",
    [
        (["running|starting|0", "restarting|starting|1"], "restarting (a crash loop, restart count 1)"),
        (["running|starting|0", "running|starting|2"], "restarted 2 times while starting"),
        (["running|starting|0", "running|unhealthy|0"], "triton is running (unhealthy)"),
        (["exited||0"], "triton is exited"),
    ],
)
def test_a_failing_triton_stops_the_wait_with_its_logs(tmp_path, states, reason):
    done = run_check(tmp_path, states)
    assert done.returncode == 1 and reason in done.stderr and "last triton log line" in done.stderr, done.stderr
    assert "gpucheck" not in (tmp_path / "log").read_text()


def test_the_wait_is_bounded_and_says_its_bound(tmp_path):
    done = run_check(tmp_path, ["running|starting|0"], timeout_s=0)
    assert done.returncode == 1 and "not healthy after 0 s" in done.stderr, done.stderr
    assert "GPU_CHECK_TIMEOUT_S" in done.stdout
