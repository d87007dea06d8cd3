"""ClipClient against the real server: open_clip parity, order, per-item errors, server facts."""

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clip_triton.client import ClipClient, ItemErrors, rank

from .helpers import cos, local_http_server, run_cli, settled


@pytest.fixture()
def client(triton):
    with ClipClient(triton.grpc_url, batch_size=4, concurrency=3) as c:
        yield c


def _images(n: int) -> list[bytes]:
    out = []
    for i in range(n):
        rng = np.random.default_rng(100 + i)
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (30 + i % 5, 41, 3), dtype=np.uint8)).save(buffer, format="PNG")
        out.append(buffer.getvalue())
    return out


def test_facts_come_from_the_server(client, tiny_export):
    manifest = json.loads((tiny_export / "manifest.json").read_text())
    facts = client.facts
    assert facts.logit_scale == pytest.approx(manifest["logit_scale"])
    assert (facts.embed_dim, facts.max_batch_size, facts.random_weights) == (32, 64, True)


def test_embeddings_equal_open_clip_in_input_order_across_batches(client, open_clip_reference):
    blobs = _images(19)  # 5 batches of <= 4, three in flight
    served = client.embed_images(blobs)
    assert served.shape == (19, 32) and served.dtype == np.float32
    assert cos(served, open_clip_reference.images(blobs)).min() >= 0.9999
    texts = [f"a photo of number {i}" for i in range(11)]
    assert cos(client.embed_texts(texts), open_clip_reference.texts(texts)).min() >= 0.9999


def test_inputs_as_paths_pil_and_bytes(client, photos, tmp_path):
    path = tmp_path / "cat.jpg"
    path.write_bytes(photos["cat"])
    pil = Image.open(io.BytesIO(photos["cat"]))
    out = client.embed_images([str(path), path, photos["cat"], pil])
    assert cos(out, np.repeat(out[:1], 4, axis=0)).min() >= 0.99999


def test_bad_items_are_named_and_the_rest_kept(client, open_clip_reference):
    blobs = _images(10)
    items = list(blobs)
    items[7] = b"not an image"
    items[2] = b""
    with pytest.raises(ItemErrors) as err:
        client.embed_images(items)
    assert set(err.value.errors) == {2, 7}
    assert "not a decodable image" in err.value.errors[7] and "empty image" in err.value.errors[2]
    good = [i for i in range(10) if i not in (2, 7)]
    kept = err.value.embeddings
    assert np.isnan(kept[[2, 7]]).all()
    assert cos(kept[good], open_clip_reference.images([blobs[i] for i in good])).min() >= 0.9999
    with pytest.raises(ItemErrors) as err:
        client.embed_images(["/no/such/file.jpg", blobs[0]])
    assert set(err.value.errors) == {0}


def test_classify_uses_the_server_logit_scale(client, photos):
    prompts = ["a cat", "a dog", "a rocket"]
    result = client.classify([photos["cat"], photos["rocket"]], prompts)
    image = client.embed_images([photos["cat"], photos["rocket"]])
    text = client.embed_texts(prompts)
    logits = client.facts.logit_scale * image @ text.T
    expected = np.exp(logits - logits.max(1, keepdims=True))
    expected /= expected.sum(1, keepdims=True)
    for row, probs in zip(result, expected):
        assert [r["probability"] for r in row] == sorted((r["probability"] for r in row), reverse=True)
        for r in row:
            assert r["probability"] == pytest.approx(probs[prompts.index(r["prompt"])], rel=1e-5)


def test_templates_are_ensembled(client):
    emb = client.prompt_embeddings(["cat", "dog"], ["a photo of a {}.", "a drawing of a {}."])
    manual = client.embed_texts(["a photo of a cat.", "a drawing of a cat."]).mean(0)
    assert cos(emb[:1], (manual / np.linalg.norm(manual))[None])[0] > 0.99999
    assert np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)


def test_search_and_rank_helpers():
    index = np.eye(4, dtype=np.float32)
    top, scores = ClipClient.search(index[2], index, k=2)
    assert top[0, 0] == 2 and scores[0, 0] == pytest.approx(1.0)
    ranked = rank(np.array([[0.1, 0.3]]), ["a", "b"], logit_scale=100.0)
    assert ranked[0][0]["prompt"] == "b" and ranked[0][0]["probability"] > 0.99


def test_async_client_agrees_with_sync(client, triton, photos):
    import asyncio

    from clip_triton.client import AsyncClipClient

    blobs = _images(9) + [photos["cat"]]
    texts = ["a cat", "a dog", "a rocket"]

    async def run():
        async with AsyncClipClient(triton.grpc_url, batch_size=4, concurrency=3) as aclient:
            images = await aclient.embed_images(blobs)
            words = await aclient.embed_texts(texts)
            ranked = await aclient.classify([photos["cat"]], texts)
            bad = None
            try:
                await aclient.embed_images([blobs[0], b"junk", blobs[1]])
            except ItemErrors as err:
                bad = err
            return images, words, ranked, bad

    images, words, ranked, bad = asyncio.run(run())
    assert np.abs(images - client.embed_images(blobs)).max() < 1e-6
    assert np.abs(words - client.embed_texts(texts)).max() < 1e-6
    assert ranked == client.classify([photos["cat"]], texts)
    assert bad is not None and set(bad.errors) == {1} and not np.isnan(bad.embeddings[[0, 2]]).any()


def _cli(*args):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "clip_triton.cli", *args], capture_output=True, text=True, timeout=300)


def test_cli_classify_embed_search(triton, photos, tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for name, data in photos.items():
        (folder / f"{name}.jpg").write_bytes(data)
    url = ["--url", triton.grpc_url]
    result = _cli(
        "classify", str(folder / "cat.jpg"), str(folder / "rocket.jpg"), "--prompts", "a cat", "a rocket", *url
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("a cat") == 2 and "probability" in result.stdout and "RANDOM" in result.stderr

    result = _cli("embed", "--images", str(folder), "--out", str(tmp_path / "index.npy"), *url)
    assert result.returncode == 0, result.stderr
    index = np.load(tmp_path / "index.npy")
    meta = json.loads((tmp_path / "index.json").read_text())
    assert index.shape == (4, 32) and [p.rsplit("/", 1)[-1] for p in meta["items"]] == sorted(
        f"{n}.jpg" for n in photos
    )

    result = _cli(
        "search", "--index", str(tmp_path / "index.npy"), "--image", str(folder / "coffee.jpg"), "-k", "2", *url
    )
    assert result.returncode == 0, result.stderr
    first = result.stdout.splitlines()[1].split()
    assert first[-1].endswith("coffee.jpg") and float(first[1]) == pytest.approx(1.0, abs=1e-5)

    (folder / "broken.jpg").write_bytes(b"nope")
    result = _cli("embed", "--images", str(folder), "--out", str(tmp_path / "x.npy"), *url)
    assert result.returncode == 1 and "broken.jpg" in result.stderr and "not a decodable image" in result.stderr
    result = _cli("embed", "--images", str(folder), "--out", str(tmp_path / "x.npy"), "--skip-errors", *url)
    assert result.returncode == 0 and np.load(tmp_path / "x.npy").shape == (4, 32)


def test_cli_reports_an_unreachable_server():
    from clip_triton.server import free_port

    from .helpers import IMAGES

    cat = str(IMAGES / "cat.jpg")
    result = run_cli("classify", cat, "--prompts", "a", "--url", f"127.0.0.1:{free_port()}", "--connect-timeout", "1")
    assert result.returncode == 2 and "nothing answers at 127.0.0.1:" in result.stderr, result.stderr
    assert "clip-triton serve" in result.stderr and "not ready after" not in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 2  # trying..., error


def test_zero_shot_eval_on_an_image_folder(client, tmp_path, photos):
    """Accuracy through the deployment equals the accuracy computed from its own embeddings."""
    from clip_triton.client.zeroshot import evaluate, templates, topk_accuracy

    root = tmp_path / "dataset"
    for name in ["cat", "cup_of_coffee", "rocket"]:
        (root / name).mkdir(parents=True)
        source = photos["coffee" if name == "cup_of_coffee" else name]
        img = Image.open(io.BytesIO(source))
        for k in range(3):
            buffer = io.BytesIO()
            img.rotate(k * 7).save(buffer, format="JPEG")
            (root / name / f"{k}.jpg").write_bytes(buffer.getvalue())
    result = evaluate(client, root, template_set="simple")
    assert (result.images, result.classes, result.failed) == (9, 3, 0)
    classifier = client.prompt_embeddings(["cat", "cup of coffee", "rocket"], templates("simple"))
    paths = sorted(root.rglob("*.jpg"))
    logits = client.embed_images(paths) @ classifier.T
    labels = np.array([["cat", "cup_of_coffee", "rocket"].index(p.parent.name) for p in paths])
    assert result.top1 == pytest.approx(float((logits.argmax(1) == labels).mean()))
    assert topk_accuracy(logits, labels, 2) is not None
    assert result.top5 is None and topk_accuracy(logits, labels, 3) is None  # 3 classes: top-5 says nothing
    for label, name in enumerate(["cat", "cup of coffee", "rocket"]):
        mask = labels == label
        assert result.per_class[name] == pytest.approx(float((logits[mask].argmax(1) == label).mean()))
        assert result.per_class_images[name] == 3
    assert "n/a" in result.table() and "cup of coffee" in result.table()


def test_zeroshot_metadata_is_open_clips():
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES

    from clip_triton.client.zeroshot import templates, zeroshot_metadata

    assert zeroshot_metadata()["classnames"] == list(IMAGENET_CLASSNAMES)
    assert templates("openai") == [t("{}") for t in OPENAI_IMAGENET_TEMPLATES]
    assert len(templates("openai")) == 80


@pytest.fixture()
def http_server(photos):
    """A loopback HTTP server serving a photo, a large body, and a 404."""
    bodies = {"/cat.jpg": photos["cat"], "/huge.jpg": b"\xff" * (3 * 1024 * 1024)}

    def route(path):
        if path in bodies:
            return 200, {"Content-Type": "image/jpeg"}, bodies[path]
        return 404, {}, b""

    with local_http_server(route) as url:
        yield url


def test_urls_are_fetched_with_limits(triton, http_server, photos):
    from clip_triton.client import inputs

    with ClipClient(triton.grpc_url) as client:
        from_url = client.embed_images([f"{http_server}/cat.jpg"])
        assert np.abs(from_url - client.embed_images([photos["cat"]])).max() < 1e-6
        with pytest.raises(ItemErrors) as err:
            client.embed_images([f"{http_server}/missing.jpg", photos["cat"]])
        assert set(err.value.errors) == {0} and "404" in err.value.errors[0]
    with pytest.raises(ValueError, match="byte limit"):
        inputs.fetch_url(f"{http_server}/huge.jpg", max_bytes=1024 * 1024)
    with pytest.raises(ValueError, match="not an http"):
        inputs.fetch_url("file:///etc/passwd")


def test_dns_target_and_several_urls(triton):
    with ClipClient(f"dns:///localhost:{triton.grpc_port}") as client:
        a = client.embed_texts(["a cat"])
    with ClipClient([triton.grpc_url, triton.grpc_url]) as client:
        b = client.embed_texts(["a cat", "a cat", "a cat"])
        assert len(client.clients) == 2
    assert np.abs(b - a).max() < 1e-6


def test_index_folder_and_search(client, photos, tmp_path):
    """index_folder() returned (paths, embeddings) that ClipClient.search could not take; it returns an
    EmbeddingIndex that searches by text, image or embedding, and saves/loads in the CLI's format."""
    from clip_triton.client import EmbeddingIndex, Hit

    folder = tmp_path / "photos"
    folder.mkdir()
    for name, data in photos.items():
        (folder / f"{name}.jpg").write_bytes(data)
    (folder / "broken.jpg").write_bytes(b"not an image")
    index = client.index_folder(folder)
    assert [Path(p).name for p in index.items] == sorted(f"{n}.jpg" for n in photos)
    assert list(index.failed) == [str(folder / "broken.jpg")] and index.model == client.facts.model
    hits = index.search(folder / "rocket.jpg", k=2)  # a Path is an image
    assert isinstance(hits[0], Hit) and Path(hits[0].item).name == "rocket.jpg"
    assert hits[0].score == pytest.approx(1.0, abs=1e-5) and len(hits) == 2
    assert index.search_image(str(folder / "cat.jpg"), k=1)[0].item.endswith("cat.jpg")
    text_hits = index.search("a photo of a cat", k=4)  # a str is a text
    expected = client.embed_texts(["a photo of a cat"])[0] @ index.embeddings.T
    assert [h.row for h in text_hits] == list(np.argsort(-expected)[:4])
    assert index.search(index.embeddings[2], k=1)[0].row == 2  # an array is an embedding

    index.save(tmp_path / "photos-index")
    loaded = EmbeddingIndex.load(tmp_path / "photos-index.npy", client=client)
    assert loaded.items == index.items and np.array_equal(loaded.embeddings, index.embeddings)
    assert loaded.failed == index.failed and loaded.search("a photo of a cat", k=4) == text_hits
    with pytest.raises(Exception, match="no client"):
        EmbeddingIndex.load(tmp_path / "photos-index").search("a cat")
    result = _cli(
        "search",
        "--index",
        str(tmp_path / "photos-index"),
        "--text",
        "a photo of a cat",
        "-k",
        "1",
        "--url",
        client.target,
    )  # the CLI reads what the API wrote
    assert result.returncode == 0 and result.stdout.splitlines()[1].split()[-1] == text_hits[0].item


def test_embed_cli_writes_every_answered_row_when_the_server_dies(tiny_repo, tmp_path, open_clip_reference):
    """The server goes away for good mid-job: `embed` exits 1 after --retry-seconds, and what it had
    answered is written (with its item list) instead of being thrown away; the rest is listed."""
    import json
    import threading
    import time

    from clip_triton.server import TritonServer

    texts = tmp_path / "captions.txt"
    texts.write_text("\n".join(f"caption number {i}" for i in range(6000)) + "\n")
    server = TritonServer(tiny_repo, log_file=tmp_path / "triton.log").start(timeout=120)

    from clip_triton import contract as C
    from clip_triton.health import completed_requests

    def answered() -> float:  # client requests only: warm-up at load counts in every model's successes
        return completed_requests(server.metrics_url, models=(C.TEXT_ENSEMBLE,)) or 0

    before = answered()

    def stop_once_the_job_runs():  # after 20 answered requests, wherever the CLI's start-up took
        deadline = time.monotonic() + 300
        while answered() - before < 20 and time.monotonic() < deadline:
            time.sleep(0.05)
        server.stop()

    stopper = threading.Thread(target=stop_once_the_job_runs)
    try:
        stopper.start()
        result = _cli(
            "embed",
            "--texts",
            str(texts),
            "--url",
            server.grpc_url,
            "--batch-size",
            "3",
            "--concurrency",
            "1",
            "--retry-seconds",
            "3",
            "--out",
            str(tmp_path / "emb.npy"),
        )
    finally:
        stopper.join()
        server.stop()
    assert result.returncode == 1, result.stdout + result.stderr
    meta = json.loads((tmp_path / "emb.json").read_text())
    rows = np.load(tmp_path / "emb.npy")
    assert 0 < len(meta["items"]) < 6000 and len(meta["unanswered"]) == 6000 - len(meta["items"])
    assert rows.shape == (len(meta["items"]), 32)
    sample = list(range(0, len(meta["items"]), max(1, len(meta["items"]) // 50)))
    expected = open_clip_reference.texts([meta["items"][i] for i in sample])
    assert cos(rows[sample], expected).min() >= 0.9999
    assert f"{6000 - len(meta['items'])} unanswered" in result.stdout


def test_embed_reports_what_it_skips_and_can_try_every_file(triton, photos, tmp_path):
    """Files without an image suffix were ignored without a word; now they are counted on stderr and
    listed with the reason, and --all-files sends every file so the server decides by content."""
    import json

    folder = tmp_path / "mixed"
    (folder / "sub").mkdir(parents=True)
    (folder / "cat.jpg").write_bytes(photos["cat"])
    (folder / "sub" / "rocket.JPEG").write_bytes(photos["rocket"])
    (folder / "coffee").write_bytes(photos["coffee"])  # a real photo without a suffix
    (folder / "notes.txt").write_text("not an image")
    (folder / "sub" / "thumbs.db").write_bytes(b"\0" * 64)
    url = ("--url", triton.grpc_url)
    result = _cli("embed", "--images", str(folder), "--out", str(tmp_path / "a.npy"), *url)
    assert result.returncode == 0, result.stderr
    assert "skipped 3 files whose suffix is not an image suffix" in result.stderr and "--all-files" in result.stderr
    meta = json.loads((tmp_path / "a.json").read_text())
    assert len(meta["items"]) == 2 and sorted(Path(p).name for p in meta["skipped"]) == [
        "coffee",
        "notes.txt",
        "thumbs.db",
    ]
    assert all("not an image suffix" in reason for reason in meta["skipped"].values())

    result = _cli(
        "embed", "--images", str(folder), "--out", str(tmp_path / "b.npy"), "--all-files", "--skip-errors", *url
    )
    assert result.returncode == 0, result.stderr
    meta = json.loads((tmp_path / "b.json").read_text())
    assert sorted(Path(p).name for p in meta["items"]) == ["cat.jpg", "coffee", "rocket.JPEG"]
    assert sorted(Path(p).name for p in meta["failed"]) == ["notes.txt", "thumbs.db"] and not meta["skipped"]
    assert np.load(tmp_path / "b.npy").shape == (3, 32)


def test_a_batch_with_bad_items_costs_one_round_trip(triton, photos, open_clip_reference):
    """3 whitespace-only texts among 64 cost 64 sequential round trips before (the batch failed, then
    every item was re-sent alone); now the server flags them in STATUS and the batch is one request."""
    import tritonclient.grpc as grpcclient

    from clip_triton import contract as C

    texts = [f"caption {i}" for i in range(64)]
    for bad in (5, 17, 40):
        texts[bad] = "   "
    stats = grpcclient.InferenceServerClient(triton.grpc_url)

    def requests_so_far() -> int:
        model = stats.get_inference_statistics(C.TEXT_ENSEMBLE, as_json=True)["model_stats"][0]
        return int(model["inference_stats"]["success"].get("count", 0)) + int(
            model["inference_stats"]["fail"].get("count", 0)
        )

    try:
        before = settled(requests_so_far)
        with ClipClient(triton.grpc_url, batch_size=64, concurrency=1) as client, pytest.raises(ItemErrors) as err:
            client.embed_texts(texts)
        assert settled(requests_so_far, before + 1) - before == 1  # the old code: 65
    finally:
        stats.close()
    assert sorted(err.value.errors) == [5, 17, 40] and all("empty text" in r for r in err.value.errors.values())
    good = [i for i in range(64) if i not in (5, 17, 40)]
    assert cos(err.value.embeddings[good], open_clip_reference.texts([texts[i] for i in good])).min() >= 0.9999
    assert np.isnan(err.value.embeddings[[5, 17, 40]]).all()


def test_embed_parquet_then_search_a_folder_of_generated_images(triton, tmp_path, open_clip_reference):
    """Issue 32's path end to end through the real tritonserver: a folder of 3,000 generated images ->
    `clip-triton embed --format parquet` (shards, int8 and float) -> `--ann` and `--lancedb` ->
    `clip-triton search` (ANN and --exact); the stored rows equal open_clip's embeddings."""
    import lancedb

    from clip_triton import encodings as E
    from clip_triton.client.parquet import shard_files
    from clip_triton.client.store import open_index
    from clip_triton.contract import TOLERANCES

    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(3000):
        rng = np.random.default_rng(i)
        pixels = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8).repeat(4, 0).repeat(4, 1)
        Image.fromarray(pixels).save(folder / f"img_{i:04d}.png")
    url = ["--url", triton.grpc_url]
    out = tmp_path / "store"
    result = _cli(
        "embed", "--images", folder, "--out", out, "--format", "parquet", "--shard-size", "800", "--ann",
        "--lancedb", tmp_path / "lance", *url,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert [p.name for p in shard_files(out)] == [f"part-0000{i}.parquet" for i in range(4)]
    assert "wrote 4 shards" in result.stdout and "(flat over 3000 rows" in result.stdout
    index = open_index(out)
    assert len(index) == 3000 and index.ann is not None and index.items[0].endswith("img_0000.png")
    sample = [0, 799, 800, 2999]
    expected = open_clip_reference.images([Path(index.items[i]).read_bytes() for i in sample])
    tolerance = TOLERANCES["fp32"]
    assert cos(index.embeddings[sample], expected).min() >= tolerance["min_cosine"]
    assert np.abs(index.embeddings[sample] - expected).max() <= tolerance["max_abs_diff"]

    query = folder / "img_1234.png"
    for flags in ([], ["--exact"]):
        result = _cli("search", "--index", out, "--image", query, "-k", "3", *flags, *url)
        assert result.returncode == 0, result.stderr
        first = result.stdout.splitlines()[1].split()
        assert first[-1] == str(query) and float(first[1]) == pytest.approx(1.0, abs=1e-5)
    table = lancedb.connect(str(tmp_path / "lance")).open_table("clip_image")
    assert table.count_rows() == 3000
    assert table.search(index.embeddings[1234]).limit(1).to_list()[0]["source"] == str(query)

    # a rerun resumes (nothing to embed); int8 shards into another folder hold the encoded rows
    result = _cli("embed", "--images", folder, "--out", out, "--format", "parquet", "--shard-size", "800", *url)
    assert result.returncode == 0 and "3000 of 3000 items already embedded" in result.stderr
    result = _cli(
        "embed", "--images", folder, "--out", tmp_path / "int8", "--format", "parquet", "--embedding-type", "int8", *url
    )
    assert result.returncode == 0, result.stderr
    small = open_index(tmp_path / "int8")
    assert small.embedding_type == "int8" and len(small) == 3000
    assert np.array_equal(E.encode(index.embeddings, "int8"), E.encode(small.embeddings, "int8"))


def test_grouped_texts_match_open_clip_in_input_order(triton, open_clip_reference):
    """Issue 33: texts of every length bucket, shuffled, through ClipClient and AsyncClipClient with
    length grouping (``group_by_length=True``) and without it (the default against a server that splits
    requests by length itself): each row is open_clip's encode_text of its own input text (fp32
    tolerance), a refused text keeps its index, and the grouped requests never mixed buckets."""
    import asyncio

    from clip_triton.client import AsyncClipClient
    from clip_triton.contract import TOLERANCES

    from .test_serving import BUCKETED_TEXTS

    rng = np.random.default_rng(7)
    texts = [f"{text} {i}" for i, text in enumerate(list(BUCKETED_TEXTS.values()) * 5)]
    texts = [texts[i] for i in rng.permutation(len(texts))]
    expected = open_clip_reference.texts(texts)
    tolerance = TOLERANCES["fp32"]
    with ClipClient(triton.grpc_url, batch_size=8) as plain:
        assert plain.facts.text_split  # the served tokenizer splits: the default client sends input order
        in_order = plain.embed_texts(texts)
    with ClipClient(triton.grpc_url, batch_size=8, group_by_length=True) as client:
        rows = client.embed_texts(texts)
        from clip_triton.client.core import text_lengths

        lengths = text_lengths(client.facts.contract)
        assert lengths.groups
        with pytest.raises(ItemErrors) as err:
            client.embed_texts([texts[0], "   ", texts[1]])

    async def run():
        async with AsyncClipClient(triton.grpc_url, batch_size=8, group_by_length=True) as aclient:
            return await aclient.embed_texts(texts)

    for got in (rows, in_order, asyncio.run(run())):
        assert cos(got, expected).min() >= tolerance["min_cosine"]
        assert np.abs(got - expected).max() <= tolerance["max_abs_diff"]
    assert list(err.value.errors) == [1] and cos(err.value.embeddings[[0, 2]], expected[:2]).min() >= 0.99999
    assert len({lengths.key(t)[0] for t in texts}) == 4  # the shuffled list spans every bucket
