"""Compact embedding encodings (clip_triton/encodings.py): each type's definition, what it keeps of the
ranking, and the same bytes through ClipClient, AsyncClipClient and the gateway (official `openai`
package and raw HTTP). In-process: FakeTriton and the FakeClipClient-backed gateway. The live path
(real tritonserver) is test_gateway.py::test_compact_encodings_through_the_live_gateway."""

from __future__ import annotations

import asyncio
import base64
import math

import httpx
import numpy as np
import openai
import pytest

from clip_triton import encodings as E
from clip_triton.client import AsyncClipClient, ClipClient, ItemErrors
from clip_triton.contract import EMBEDDING_TYPES, INT8_RANGE_RMS
from clip_triton.errors import ClipTritonError

from .fakes import FakeTriton, fake_embedding
from .test_gateway import KEY, LiveGateway, fake_client_factory, suite_settings

COMPACT = [name for name in EMBEDDING_TYPES if name != "float"]


def unit(n: int, d: int, seed: int = 0, mean: float = 0.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)).astype(np.float32) + mean
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_each_type_is_what_the_docs_define():
    x = unit(5, 64, mean=0.05)
    scale = 127 * math.sqrt(64) / INT8_RANGE_RMS
    assert E.int8_scale(64) == pytest.approx(scale)
    int8 = E.encode(x, "int8")
    assert int8.dtype == np.int8 and np.array_equal(int8, np.clip(np.rint(x * scale), -127, 127).astype(np.int8))
    assert np.array_equal(E.encode(x, "uint8").astype(int), int8.astype(int) + 128)
    assert np.array_equal(E.encode(x, "float16"), x.astype(np.float16))
    ubinary = E.encode(x, "ubinary")
    assert ubinary.shape == (5, 8) and ubinary.dtype == np.uint8
    first = sum(int(x[0, j] > 0) << (7 - j) for j in range(8))  # dimension 0 in the high bit
    assert ubinary[0, 0] == first
    assert np.array_equal(E.encode(x, "binary").astype(int), ubinary.astype(int) - 128)
    assert np.array_equal(E.encode(x, "float"), x) and E.encode(x, "float").dtype == np.float32
    # clipping: a component past the range saturates instead of wrapping
    spike = np.zeros((1, 1024), np.float32)  # R = 8 / 32 = 0.25
    spike[0, 0], spike[0, 1] = 0.8, -0.8
    assert E.encode(spike, "int8")[0, :2].tolist() == [127, -127]


@pytest.mark.parametrize("name", COMPACT)
def test_decoding_and_ranking_keep_what_each_type_promises(name):
    x = unit(200, 512, seed=1, mean=0.03)
    encoded = E.encode(x, name)
    assert encoded.shape == (200, E.width(name, 512)) and encoded.dtype == E.dtype(name)
    back = E.decode(encoded, name, 512)
    cosine = (back * x).sum(1) / np.linalg.norm(back, axis=1)
    floor = {"float16": 0.99999, "int8": 0.999, "uint8": 0.999, "binary": 0.75, "ubinary": 0.75}[name]
    assert cosine.min() > floor, (name, cosine.min())
    # the encoded scores rank like the float ones: top-1 of each query among 200 rows is itself
    s = E.scores(encoded[:20], encoded, name)
    assert np.array_equal(np.argmax(s, axis=1), np.arange(20))
    if name in ("int8", "uint8"):  # exact integer dot products, the offset removed
        q = encoded[:3].astype(np.int64) - (128 if name == "uint8" else 0)
        r = encoded.astype(np.int64) - (128 if name == "uint8" else 0)
        assert np.array_equal(s[:3], q @ r.T)
    if name in ("binary", "ubinary"):  # the dot product of the ±1 signs
        signs = np.where(x > 0, 1, -1)
        assert np.array_equal(E.scores(encoded[:3], encoded, name), signs[:3] @ signs.T)


@pytest.mark.parametrize("name", list(EMBEDDING_TYPES))
def test_wire_forms_round_trip(name):
    row = E.encode(unit(1, 24, seed=2), name)[0]
    assert np.array_equal(E.from_base64(E.to_base64(row), name), row)
    import json

    import orjson  # the gateway's renderer

    as_json = json.loads(orjson.dumps(E.to_json(row, name), option=orjson.OPT_SERIALIZE_NUMPY))
    assert all(isinstance(v, int if name in E.INTEGER_TYPES else float) for v in as_json)
    assert np.array_equal(np.array(as_json, dtype=E.dtype(name)), row)


def test_an_unknown_type_is_refused_with_the_list():
    with pytest.raises(ClipTritonError, match="float, float16, int8, uint8, binary, ubinary"):
        E.check_type("int4")


# -- the clients -----------------------------------------------------------------------------------
@pytest.fixture()
def fake_triton(monkeypatch) -> FakeTriton:
    return FakeTriton(embed_dim=16, max_batch_size=4).install(monkeypatch)


def expected(texts, dim: int = 16) -> np.ndarray:
    return np.stack([fake_embedding(t.encode(), dim) for t in texts])


@pytest.mark.parametrize("name", COMPACT)
def test_clients_return_each_type(fake_triton, name):
    texts = [f"caption {i}" for i in range(6)]
    with ClipClient("fake:1") as client:
        got = client.embed_texts(texts, embedding_type=name)
        images = client.embed_images([b"img-a", b"img-b"], embedding_type=name)
    assert got.dtype == E.dtype(name) and np.array_equal(got, E.encode(expected(texts), name))
    assert np.array_equal(images, E.encode(np.stack([fake_embedding(b, 16) for b in (b"img-a", b"img-b")]), name))

    async def run():
        async with AsyncClipClient("fake:1") as client:
            return await client.embed_texts(texts, embedding_type=name)

    assert np.array_equal(asyncio.run(run()), got)


def test_item_errors_carry_encoded_rows_and_a_bad_type_sends_nothing(fake_triton):
    fake_triton.bad = {b"bad": "not a text we like"}
    with ClipClient("fake:1") as client:
        with pytest.raises(ItemErrors) as err:
            client.embed_texts(["good", "bad", "fine"], embedding_type="int8")
        before = len(fake_triton.requests)
        with pytest.raises(ClipTritonError, match="int4"):
            client.embed_texts(["x"], embedding_type="int4")
        assert len(fake_triton.requests) == before
    assert list(err.value.errors) == [1] and err.value.embeddings.dtype == np.int8
    assert np.array_equal(err.value.embeddings[[0, 2]], E.encode(expected(["good", "fine"]), "int8"))
    assert not err.value.embeddings[1].any()  # the refused row encodes as zeros


# -- the gateway -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gateway(fake_world):
    live = LiveGateway(suite_settings(), fake_client_factory(fake_world))
    yield live
    live.stop()


@pytest.fixture(scope="module")
def fake_world(tmp_path_factory):
    from clip_triton.contract import ModelContract

    from .fakes import front_models, tiny_facts

    facts = tiny_facts()
    return facts, front_models(ModelContract.from_json(facts.contract), tmp_path_factory.mktemp("front"))


@pytest.mark.parametrize("name", list(EMBEDDING_TYPES))
def test_the_gateway_returns_each_type_to_the_openai_package(gateway, fake_world, name):
    oai = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=KEY, max_retries=0)
    texts = ["a photo of a cat", "a rocket"]
    want = E.encode(expected(texts, fake_world[0].embed_dim), name)
    as_numbers = oai.embeddings.create(
        model="clip-triton-tiny", input=texts, encoding_format="float", extra_body={"embedding_type": name}
    )
    assert np.array_equal(np.array([d.embedding for d in as_numbers.data]).astype(E.dtype(name)), want)
    as_base64 = oai.embeddings.create(
        model="clip-triton-tiny", input=texts, encoding_format="base64", extra_body={"embedding_type": name}
    )
    assert np.array_equal(np.stack([E.from_base64(d.embedding, name) for d in as_base64.data]), want)
    raw = httpx.post(
        f"{gateway.url}/v1/embeddings",
        headers={"Authorization": f"Bearer {KEY}"},
        json={"model": "clip-triton-tiny", "input": texts, "embedding_type": name},
    ).json()
    assert raw.get("embedding_type", "float") == name
    assert np.array_equal(np.array([d["embedding"] for d in raw["data"]], dtype=E.dtype(name)), want)


def test_the_gateway_refuses_an_unknown_type(gateway):
    response = httpx.post(
        f"{gateway.url}/v1/embeddings",
        headers={"Authorization": f"Bearer {KEY}"},
        json={"model": "clip-triton-tiny", "input": "x", "embedding_type": "int4"},
    )
    assert response.status_code == 400 and "embedding_type" in response.text, response.text
    float_b64 = httpx.post(
        f"{gateway.url}/v1/embeddings",
        headers={"Authorization": f"Bearer {KEY}"},
        json={"model": "clip-triton-tiny", "input": "x", "encoding_format": "base64"},
    ).json()
    assert "embedding_type" not in float_b64  # the OpenAI shape is unchanged without the field
    assert len(base64.b64decode(float_b64["data"][0]["embedding"])) == 4 * 32
