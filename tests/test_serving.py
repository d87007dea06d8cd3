"""The real tritonserver (pip-installed, CPU) serving the ensembles: bytes and strings in,
embeddings equal to open_clip PyTorch out; batching; bad input isolated per request."""

import io
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from PIL import Image
from tritonclient.utils import InferenceServerException

from clip_triton import contract as C

from .helpers import cos, settled

PARITY = 0.9999  # served path vs open_clip PyTorch in-process, fp32 (observed: 1.0 to 1e-7)


def bytes_input(name: str, items: list[bytes]):
    tensor = grpcclient.InferInput(name, [len(items), 1], "BYTES")
    tensor.set_data_from_numpy(np.array(items, dtype=object).reshape(-1, 1))
    return tensor


def embed(client, model: str, items: list[bytes]) -> np.ndarray:
    return embed_with_status(client, model, items)[0]


def embed_with_status(client, model: str, items: list[bytes]) -> tuple[np.ndarray, list[str]]:
    name = C.IMAGE_INPUT if model == C.IMAGE_ENSEMBLE else C.TEXT_INPUT
    result = client.infer(model, [bytes_input(name, items)])
    return result.as_numpy(C.EMBEDDING_OUTPUT), [s.decode() for s in result.as_numpy(C.STATUS_OUTPUT).reshape(-1)]


def test_images_as_bytes_match_open_clip(grpc, photos, open_clip_reference):
    blobs = list(photos.values())
    served = embed(grpc, C.IMAGE_ENSEMBLE, blobs)
    expected = open_clip_reference.images(blobs)
    assert served.shape == expected.shape == (4, 32) and served.dtype == np.float32
    assert cos(served, expected).min() >= PARITY
    assert np.abs(served - expected).max() < 1e-4


def test_texts_as_strings_match_open_clip(grpc, open_clip_reference):
    texts = ["a photo of a cat", "Ünïcödé 🐱 日本語", "&amp; html &lt;b&gt;", "a long caption " * 40, "x"]
    served = embed(grpc, C.TEXT_ENSEMBLE, [t.encode() for t in texts])
    expected = open_clip_reference.texts(texts)
    assert cos(served, expected).min() >= PARITY
    assert np.abs(served - expected).max() < 1e-4


def _png(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 255, (40 + seed % 7, 50, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    img.save(buffer, format="PNG")
    return buffer.getvalue()


def test_concurrent_requests_are_batched_and_answered_in_kind(triton, open_clip_reference):
    """Many concurrent single-item requests: the server merges them into batches > 1 and every
    response carries the embedding of its own request."""
    blobs = [_png(i) for i in range(48)]
    expected = open_clip_reference.images(blobs)
    stats_client = grpcclient.InferenceServerClient(triton.grpc_url)
    settled(lambda: _items(stats_client, triton.grpc_admin_headers))  # an earlier test's requests, recorded
    before = _batch_sizes(stats_client, C.VISION_MODEL, triton.grpc_admin_headers)
    local = threading.local()

    def one(i: int) -> np.ndarray:
        if not hasattr(local, "client"):
            local.client = grpcclient.InferenceServerClient(triton.grpc_url)
        return embed(local.client, C.IMAGE_ENSEMBLE, [blobs[i]])[0]

    with ThreadPoolExecutor(16) as pool:
        served = np.stack(list(pool.map(one, range(len(blobs)))))
    assert cos(served, expected).min() >= PARITY  # row i answers request i
    settled(lambda: _items(stats_client, triton.grpc_admin_headers), _items(before) + len(blobs))
    after = _batch_sizes(stats_client, C.VISION_MODEL, triton.grpc_admin_headers)
    new = {size: count - before.get(size, 0) for size, count in after.items() if count > before.get(size, 0)}
    assert sum(size * count for size, count in new.items()) == len(blobs)
    assert max(new) > 1, f"no dynamic batch larger than 1: {new}"


def _items(client_or_sizes, headers: dict | None = None) -> int:
    """Images the vision encoder has computed, from its batch statistics (or from _batch_sizes' result)."""
    sizes = (
        client_or_sizes if isinstance(client_or_sizes, dict) else _batch_sizes(client_or_sizes, C.VISION_MODEL, headers)
    )
    return sum(size * count for size, count in sizes.items())


def _batch_sizes(client, model: str, headers: dict) -> dict[int, int]:
    stats = client.get_inference_statistics(model, headers=headers, as_json=True)["model_stats"][0]
    return {int(b["batch_size"]): int(b["compute_infer"].get("count", 0)) for b in stats.get("batch_stats", [])}


BAD_IMAGES = {
    "zero bytes": b"",
    "not an image": b"plain text, not an image",
    "html": b"<!doctype html><html><body>nope</body></html>",
    "svg": b"<svg xmlns='http://www.w3.org/2000/svg' width='10' height='10'/>",
}


def _bomb() -> bytes:
    buffer = io.BytesIO()
    Image.new("1", (15_000, 15_000)).save(buffer, format="PNG")
    return buffer.getvalue()


# Every decoder refusal and its reason is in the in-process corpus (test_reliability.py); here one
# undecodable item and one bomb show the served path: batch mates answered, the refused row NaN.
@pytest.mark.parametrize("label", ["html", "decompression bomb"])
def test_bad_image_is_flagged_and_its_batch_mates_answered(grpc, triton, photos, label, open_clip_reference):
    """One request, one round trip: every good item's embedding and every bad item's reason in STATUS;
    alone, the bad item still fails its request with INVALID_ARGUMENT."""
    data = {"truncated jpeg": photos["cat"][:5000], "decompression bomb": _bomb()}.get(label, BAD_IMAGES.get(label))
    served, status = embed_with_status(grpc, C.IMAGE_ENSEMBLE, [photos["coffee"], data, photos["cat"]])
    assert status[0] == status[2] == "" and status[1].startswith("item 1: ")
    expected = open_clip_reference.images([photos["coffee"], photos["cat"]])
    assert cos(served[[0, 2]], expected).min() >= PARITY
    assert np.isnan(served[1]).all()  # the refused row cannot pass for an embedding (issue 25)
    with pytest.raises(InferenceServerException) as err:
        embed(grpc, C.IMAGE_ENSEMBLE, [data])
    assert err.value.status() == "StatusCode.INVALID_ARGUMENT" and "item 0:" in err.value.message()
    assert triton.ready()


@pytest.mark.parametrize(
    "data, fragment",
    [(b"\xff\xfe\xfd", "not valid UTF-8"), (b"y" * 70_000, "over the limit")],
)
def test_bad_text_is_flagged_and_its_batch_mates_answered(grpc, triton, data, fragment, open_clip_reference):
    served, status = embed_with_status(grpc, C.TEXT_ENSEMBLE, [b"fine", data, b"a photo of a cat"])
    assert status[0] == status[2] == "" and status[1].startswith("item 1: ") and fragment in status[1]
    assert cos(served[[0, 2]], open_clip_reference.texts(["fine", "a photo of a cat"])).min() >= PARITY
    assert np.isnan(served[1]).all() and not np.isnan(served[[0, 2]]).any()
    with pytest.raises(InferenceServerException) as err:
        embed(grpc, C.TEXT_ENSEMBLE, [data])
    assert err.value.status() == "StatusCode.INVALID_ARGUMENT" and fragment in err.value.message()
    assert triton.ready()


def test_bad_requests_do_not_fail_their_batch_mates(triton, photos, open_clip_reference):
    """Good and bad requests arriving together (one dynamic batch): only the bad ones fail."""
    good = [photos[name] for name in ("cat", "coffee", "astronaut", "rocket")] * 4
    bad = [b"", b"garbage", photos["cat"][:3000], b"<svg/>"] * 2
    jobs = [(True, b) for b in good] + [(False, b) for b in bad]
    order = np.random.default_rng(3).permutation(len(jobs))
    expected = open_clip_reference.images(good[:4])

    def run(index: int):
        client = grpcclient.InferenceServerClient(triton.grpc_url)
        try:
            return embed(client, C.IMAGE_ENSEMBLE, [jobs[index][1]])[0]
        except InferenceServerException as exc:
            return exc

    with ThreadPoolExecutor(len(jobs)) as pool:
        results = dict(zip(order, pool.map(run, order)))
    for index, (is_good, _) in enumerate(jobs):
        result = results[index]
        if is_good:
            assert isinstance(result, np.ndarray), result
            assert cos(result[None], expected[index % 4][None])[0] >= PARITY
        else:
            assert isinstance(result, InferenceServerException)
            assert result.status() == "StatusCode.INVALID_ARGUMENT"
    assert triton.ready()


def test_server_exposes_the_export_facts(grpc, tiny_export):
    import json

    manifest = json.loads((tiny_export / "manifest.json").read_text())
    for model in (C.IMAGE_ENSEMBLE, C.TEXT_ENSEMBLE):
        params = grpc.get_model_config(model).config.parameters
        assert params["model"].string_value == "clip-triton-tiny"
        assert float(params["logit_scale"].string_value) == pytest.approx(manifest["logit_scale"])
        assert int(params["embed_dim"].string_value) == 32
        assert params["random_weights"].string_value == "true"
        assert C.ModelContract.from_json(params["contract"].string_value) == C.ModelContract.from_dict(
            manifest["contract"]
        )


BUCKETED_TEXTS = {  # a text for each of the contract's sequence-length buckets (tokens incl. SOT/EOT)
    8: "a cat",
    16: "a photo of a cat sitting on a red chair",
    32: "a photo of a cat sitting on a red chair in the morning sun, next to a cup of coffee and a book",
    77: "a long caption " * 40,  # truncated at 77, as open_clip does
}


def test_each_request_is_cut_to_the_bucket_of_its_longest_text(grpc):
    """The tokenizer answers [n, L] with L the shortest bucket holding the request's longest text."""
    contract = C.ModelContract.from_json(
        grpc.get_model_config(C.TEXT_ENSEMBLE).config.parameters["contract"].string_value
    )
    assert contract.tokenizer.lengths == tuple(BUCKETED_TEXTS)
    for length, text in BUCKETED_TEXTS.items():
        result = grpc.infer(C.TOKENIZER_MODEL, [bytes_input(C.TEXT_INPUT, [text.encode()])])
        assert result.as_numpy(C.INPUT_IDS).shape == (1, length), text
    mixed = grpc.infer(C.TOKENIZER_MODEL, [bytes_input(C.TEXT_INPUT, [b"a cat", BUCKETED_TEXTS[32].encode()])])
    assert mixed.as_numpy(C.INPUT_IDS).shape == (2, 32)  # the longest text decides for its request


def test_a_raw_request_of_mixed_lengths_runs_each_text_at_its_own_bucket(grpc, triton, open_clip_reference):
    """Issue 33, raw clients: one tritonclient request of three short prompts and one 44-token caption.
    The text encoder runs the prompts at 8 positions and the caption in the 77 bucket at 48 (its own
    length rounded up to LENGTH_STEP: tests/test_tokenizer.py checks the cut), in two executions of 3
    and 1 texts (its batch statistics), where it once ran all four at 77 in one execution of 4; every
    embedding is open_clip's (over the whole 77-token context), in request order."""
    texts = ["a cat", "a long caption " * 14, "a dog", "a red car"]
    settled(lambda: sum(_batch_sizes(grpc, C.TEXT_MODEL, triton.grpc_admin_headers).values()))
    before = _batch_sizes(grpc, C.TEXT_MODEL, triton.grpc_admin_headers)
    served, status = embed_with_status(grpc, C.TEXT_ENSEMBLE, [t.encode() for t in texts])
    expected = open_clip_reference.texts(texts)
    assert status == [""] * 4 and cos(served, expected).min() >= PARITY and np.abs(served - expected).max() < 1e-4
    after = settled(lambda: _batch_sizes(grpc, C.TEXT_MODEL, triton.grpc_admin_headers))
    ran = {size: count - before.get(size, 0) for size, count in after.items() if count != before.get(size, 0)}
    assert ran == {3: 1, 1: 1}, ran


def test_concurrent_texts_of_every_bucket_match_open_clip(triton, open_clip_reference):
    """Single-text requests of all four lengths at once: the batcher groups equal shapes, each
    answer is the embedding of open_clip's encode_text over the whole 77-token context."""
    texts = [text for _ in range(6) for text in BUCKETED_TEXTS.values()]
    expected = open_clip_reference.texts(texts)
    local = threading.local()

    def one(text: str) -> np.ndarray:
        if not hasattr(local, "client"):
            local.client = grpcclient.InferenceServerClient(triton.grpc_url)
        return embed(local.client, C.TEXT_ENSEMBLE, [text.encode()])[0]

    with ThreadPoolExecutor(8) as pool:
        served = np.stack(list(pool.map(one, texts)))
    assert cos(served, expected).min() >= PARITY
    assert np.abs(served - expected).max() < 1e-4


@pytest.mark.parametrize("length", [1, 78])
def test_token_ids_of_a_length_the_graph_does_not_take_are_refused(grpc, triton, length):
    ids = grpcclient.InferInput(C.INPUT_IDS, [1, length], "INT32")
    ids.set_data_from_numpy(np.zeros((1, length), np.int32))
    with pytest.raises(InferenceServerException, match=f"2 to 77 positions per text: got {length}"):
        grpc.infer(C.TEXT_MODEL, [ids])
    assert triton.ready()


def _stats(client, model: str, headers: dict) -> dict:
    return client.get_inference_statistics(model, headers=headers, as_json=True)["model_stats"][0]


def test_a_repeated_text_request_is_answered_from_the_response_cache(grpc, triton):
    """clip_text is cached whole (repo --response-cache text, serve's --cache-config), at the inner
    clip_text_cached ensemble that is its step: a repeated request hits without running the tokenizer
    or the encoder, and the answer is identical."""
    import urllib.request
    import uuid

    texts = [f"a photo of a cache probe {uuid.uuid4().hex}".encode(), b"a photo of a dog"]
    headers = triton.grpc_admin_headers
    hits = lambda: int(_stats(grpc, C.TEXT_CACHED, headers)["inference_stats"].get("cache_hit", {}).get("count", 0))  # noqa: E731
    tokenized = lambda: int(_stats(grpc, C.TOKENIZER_MODEL, headers)["inference_count"])  # noqa: E731
    hits_before = settled(hits)
    first = embed(grpc, C.TEXT_ENSEMBLE, texts)
    tokenized_before = settled(tokenized)
    second = embed(grpc, C.TEXT_ENSEMBLE, texts)
    assert settled(hits, hits_before + 1) == hits_before + 1 and settled(tokenized) == tokenized_before  # not run
    assert np.array_equal(first, second)
    metrics = urllib.request.urlopen(triton.metrics_url, timeout=30).read().decode()
    assert any(
        line.startswith("nv_cache_num_hits_per_model") and f'model="{C.TEXT_CACHED}"' in line
        for line in metrics.splitlines()
    )
    assert grpc.get_model_config(C.TEXT_CACHED).config.response_cache.enable
    assert not grpc.get_model_config(C.TEXT_ENSEMBLE).config.response_cache.enable  # the public one: never
    assert not grpc.get_model_config(C.IMAGE_ENSEMBLE).config.response_cache.enable  # images: opt-in (all)
    with pytest.raises(InferenceServerException, match="unknown model|not found"):
        grpc.get_model_config(C.IMAGE_CACHED)  # an uncached tower has no inner ensemble
