"""Day one, round 2 (issue 29), in-process: every check of what the user gave runs before any server
is dialled (exit 2, one line), nothing answering at --url fails after --connect-timeout naming the
address and `clip-triton serve`, and a server that answers but is loading is waited for with a
countdown. The same through the CLI as a user runs it: tests/test_day_one.py."""

from __future__ import annotations

import json

import numpy as np
import pytest

from .fakes import FakeTriton
from .helpers import IMAGES, run_cli


@pytest.fixture()
def no_dialling(monkeypatch) -> FakeTriton:
    """A Triton that fails the test if anything dials it: checks must come first."""
    triton = FakeTriton().install(monkeypatch)
    import tritonclient.grpc

    class Refuse:
        def __init__(self, *args, **kwargs):
            raise AssertionError("dialled the server before checking the command's inputs")

    monkeypatch.setattr(tritonclient.grpc, "InferenceServerClient", Refuse)
    return triton


def one_line_error(result, code: int = 2) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == code, result.stdout + result.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


@pytest.fixture()
def inputs(tmp_path):
    """A flat folder of images (no class folders), a photos folder, text files good and bad."""
    flat = tmp_path / "flat"
    flat.mkdir()
    for path in sorted(IMAGES.glob("*.jpg")):
        (flat / path.name).write_bytes(path.read_bytes())
    (tmp_path / "texts.txt").write_text("a cat\na dog\n")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    (tmp_path / "templates.txt").write_text("no placeholder here\n")
    (tmp_path / "captions.json").write_text(json.dumps({"images": []}))
    return tmp_path


CAT = str(IMAGES / "cat.jpg")
DEAD = ["--url", "127.0.0.1:9"]


@pytest.mark.parametrize(
    "argv, says",
    [
        (["classify", "{t}/missing.jpg", "--prompts", "a", "b"], "missing.jpg: no such file"),
        (["classify", "{t}/flat", "--prompts", "a", "b"], "is a folder"),
        (["classify", CAT, "--prompts", "a", "--top", "0"], "--top 0"),
        (["embed", "--images", "{t}/texts.txt", "--out", "{t}/i"], "is not a folder"),
        (["embed", "--texts", "{t}/missing.txt", "--out", "{t}/i"], "no such file"),
        (["embed", "--texts", "{t}/latin1.txt", "--out", "{t}/i"], "is not UTF-8"),
        (["embed", "--texts", "{t}/texts.txt", "--out", "{t}/no/such/folder/i"], "does not exist"),
        (["search", "--index", "{t}/missing", "--text", "a cat"], "missing"),
        (["eval", "{t}/flat"], "has no class sub-folders"),
        (["eval", "{t}/missing"], "is not a folder"),
        (["eval", "{t}/classes", "--templates", "{t}/templates.txt"], "has no {}"),
        (["eval", "{t}/classes", "--classnames", "a,b,c"], "class folders"),
        (["eval", "{t}/classes", "--json", "{t}/no/such/eval.json"], "does not exist"),
        (["eval-retrieval", "--images", "{t}/missing", "--captions", "{t}/captions.json"], "is not a folder"),
        (["eval-retrieval", "--images", "{t}/flat", "--captions", "{t}/missing.json"], "no such file"),
        (["eval-retrieval", "--images", "{t}/flat", "--captions", "{t}/captions.json", "-k", "0,1"], "positive"),
        (["embed", "--texts", "{t}/texts.txt", "--out", "{t}/i", "--shard-size", "5"], "--format parquet"),
        (["embed", "--texts", "{t}/texts.txt", "--out", "{t}/i", "--embedding-type", "int8"], "--format parquet"),
        (["embed", "--texts", "{t}/texts.txt", "--out", "{t}/texts.txt", "--format", "parquet"], "is a file"),
        (["embed", "--texts", "{t}/texts.txt", "--out", "{t}/p", "--format", "parquet", "--shard-size", "0"], "0"),
        (["search", "--index", "{t}/flat", "--text", "a cat"], "without Parquet shards"),
    ],
    ids=lambda value: value if isinstance(value, str) else " ".join(value[:1] + value[2:3]),
)
def test_every_input_is_checked_before_the_server_is_dialled(no_dialling, inputs, argv, says):
    (inputs / "classes" / "cat").mkdir(parents=True, exist_ok=True)
    (inputs / "classes" / "cat" / "cat.jpg").write_bytes((IMAGES / "cat.jpg").read_bytes())
    (inputs / "classes" / "dog").mkdir(exist_ok=True)
    (inputs / "classes" / "dog" / "dog.jpg").write_bytes((IMAGES / "coffee.jpg").read_bytes())
    line = one_line_error(run_cli(*[a.replace("{t}", str(inputs)) for a in argv], *DEAD))
    assert says in line, line


def test_an_index_of_the_other_kind_is_refused_before_dialling(no_dialling, tmp_path):
    from clip_triton.client.index import EmbeddingIndex

    EmbeddingIndex(["x.jpg"], np.ones((1, 4), np.float32) / 2, kind="image").save(tmp_path / "idx")
    (tmp_path / "texts.txt").write_text("a cat\n")
    line = one_line_error(run_cli("embed", "--texts", tmp_path / "texts.txt", "--out", tmp_path / "idx", *DEAD))
    assert "holds image embeddings, not text" in line


def test_a_damaged_shard_or_a_missing_store_package_is_refused_before_dialling(no_dialling, tmp_path, monkeypatch):
    import importlib.util

    (tmp_path / "texts.txt").write_text("a cat\n")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "part-00000.parquet").write_bytes(b"PAR1 not really")
    argv = ["embed", "--texts", tmp_path / "texts.txt", "--out", tmp_path / "out", "--format", "parquet", *DEAD]
    line = one_line_error(run_cli(*argv))
    assert "part-00000.parquet is not a readable Parquet shard" in line
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "faiss" else real(name, *a))
    line = one_line_error(run_cli("embed", "--texts", tmp_path / "texts.txt", "--out", tmp_path / "x", "--ann", *DEAD))
    assert "--ann needs faiss" in line and "clip-triton[store]" in line


def test_nothing_answering_fails_after_the_connect_timeout_naming_the_address(monkeypatch):
    triton = FakeTriton().install(monkeypatch)
    triton.listening = False
    result = run_cli("classify", CAT, "--prompts", "a", "b", "--url", "127.0.0.1:9", "--connect-timeout", "0.5")
    assert result.returncode == 2, result.stderr
    error = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "nothing answers at 127.0.0.1:9" in error[0] and "clip-triton serve" in error[0]
    assert "Connection refused" in error[0] and "not ready after" not in error[0]
    assert "trying for 0 s" in result.stderr or "trying for 1 s" in result.stderr


def test_a_loading_server_is_waited_for_with_a_countdown(monkeypatch):
    triton = FakeTriton(embed_dim=8).install(monkeypatch)
    triton.loading_polls = 3  # answers, but the models are not ready for three polls
    result = run_cli("classify", CAT, "--prompts", "a", "b", "--url", "fake:1", terminal=True)
    assert result.returncode == 0, result.stderr
    assert "s left (the server at fake:1 is up but" in result.stderr and "\r" in result.stderr
    assert "cat.jpg" in result.stdout


def test_a_loading_server_that_never_gets_ready_says_so(monkeypatch):
    triton = FakeTriton(embed_dim=8).install(monkeypatch)
    triton.loading_polls = 10**9
    result = run_cli("classify", CAT, "--prompts", "a", "b", "--url", "fake:1", "--ready-timeout", "0.5")
    assert result.returncode == 2
    assert "not ready after 0 s" in result.stderr or "not ready after 1 s" in result.stderr
    assert "waiting up to" in result.stderr and "--ready-timeout" in result.stderr
