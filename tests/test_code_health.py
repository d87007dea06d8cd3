"""The habits CI keeps: ruff's lint rules and format over the code, mypy over the client users import
(configured in pyproject.toml; the same commands as .pre-commit-config.yaml)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from .helpers import ROOT

pytestmark = pytest.mark.integration

CODE = ["clip_triton", "tests", "bench"]


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_ruff_lint_passes():
    result = run("ruff", "check", *CODE)
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_format_is_applied():
    result = run("ruff", "format", "--check", *CODE)
    assert result.returncode == 0, "run `ruff format` (or pre-commit):\n" + result.stdout + result.stderr


def test_mypy_passes_on_the_client():
    result = run("mypy", "clip_triton/client")
    assert result.returncode == 0, result.stdout + result.stderr
    assert (
        ROOT / "clip_triton" / "client" / "py.typed"
    ).is_file()  # shipped: users' type checkers read the client's hints
