"""Docs people read: a README of at most 15 KB whose links resolve, a documentation site that builds
strict (MkDocs with Material, in-process), every page in its navigation, and a CLI reference that is
the parser's own output."""

from __future__ import annotations

import re
import shutil

import pytest
import yaml

from .helpers import ROOT

README = ROOT / "README.md"
DOCS = ROOT / "docs"
README_LIMIT = 15_000


def build_site(config_file, site_dir) -> None:
    import os

    os.environ.setdefault("NO_MKDOCS_2_WARNING", "1")
    from mkdocs.commands.build import build
    from mkdocs.config import load_config

    build(load_config(str(config_file), site_dir=str(site_dir), strict=True))


def test_the_site_builds_strict(tmp_path):
    build_site(ROOT / "mkdocs.yml", tmp_path / "site")
    assert (tmp_path / "site" / "index.html").is_file() and (tmp_path / "site" / "cli" / "index.html").is_file()


def test_a_broken_link_fails_the_strict_build(tmp_path):
    """The strict build can fail: a page linking to a page that does not exist stops it."""
    from mkdocs.exceptions import Abort

    shutil.copytree(DOCS, tmp_path / "docs")
    shutil.copy(ROOT / "mkdocs.yml", tmp_path / "mkdocs.yml")
    with open(tmp_path / "docs" / "index.md", "a") as page:
        page.write("\nSee [the missing page](missing.md).\n")
    with pytest.raises(Abort):
        build_site(tmp_path / "mkdocs.yml", tmp_path / "site")


def test_every_page_is_in_the_navigation():
    nav = yaml.safe_load((ROOT / "mkdocs.yml").read_text())["nav"]
    listed = {page for entry in nav for page in entry.values()}
    assert listed == {path.name for path in DOCS.glob("*.md")}


def test_the_cli_reference_is_generated_from_the_parser():
    from clip_triton.cli.reference import render

    assert (DOCS / "cli.md").read_text() == render(), (
        "the CLI changed: run `python -m clip_triton.cli.reference > docs/cli.md`"
    )
    for command in ("export", "repo", "serve", "classify", "embed", "gateway"):
        assert f"\n## {command}\n" in render()


def test_the_readme_is_short_and_its_links_resolve():
    text = README.read_text()
    assert len(text.encode()) <= README_LIMIT, f"README is {len(text.encode())} bytes, over {README_LIMIT}"
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
    local = [link for link in links if not link.startswith(("http://", "https://"))]
    assert len(local) >= 10
    missing = [link for link in local if not (ROOT / link).exists()]
    assert not missing, missing
    for step in ("bash dev.sh demo", "bash dev.sh test", "clip-triton export", "clip-triton repo", "clip-triton serve"):
        assert step in text, step
