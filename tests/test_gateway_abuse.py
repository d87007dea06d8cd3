"""Issue 27 (abuse, round 2), the rows fixed so far, in-process: no tritonserver, loopback HTTP only.

Each test failed on the code before the fix (the row of the issue's table is named)."""

from __future__ import annotations

import asyncio
import json

import pytest

from clip_triton.gateway import FetchPolicy, GatewaySettings, create_app
from clip_triton.gateway.fetch import FetchError, fetch_image, forbidden, vet

from .fakes import ClientSeam
from .helpers import local_http_server
from .test_gateway import KEY, StubResolver

LOOPBACK = FetchPolicy(allow_private=True, resolver=StubResolver(), timeout_s=10)


def test_row_13_site_local_ipv6_is_refused():
    assert forbidden("fec0::1") and forbidden("feff::1") and forbidden("::ffff:10.0.0.1")
    assert not forbidden("2606:4700:4700::1111") and not forbidden("1.1.1.1")
    with pytest.raises(FetchError, match="private"):
        asyncio.run(vet("http://[fec0::1]/cat.jpg", FetchPolicy(resolver=StubResolver())))


@pytest.mark.parametrize(
    "url, reason",
    [
        ("http://example.com/" + "a" * 70_000, "longer than 8192"),
        ("http://example.com/a\x01b.jpg", "control characters"),
        ("http://[::1/x.jpg", "malformed URL"),
    ],
)
def test_row_10_malformed_urls_are_fetch_errors(url, reason):
    with pytest.raises(FetchError, match=reason):
        asyncio.run(fetch_image(url, LOOPBACK))


def test_row_10_a_redirect_to_a_malformed_url_is_a_fetch_error():
    def route(path):
        return 302, {"Location": "http:\\\\127.0.0.1\\"}, b""

    with local_http_server(route) as base, pytest.raises(FetchError):
        asyncio.run(fetch_image(f"{base}/hop", LOOPBACK))


def test_row_4_bodies_are_fetched_unencoded_and_an_encoded_answer_is_refused_unread():
    """A 1,617-byte brotli body inflated to 1 GiB before the size cap; now no decoder runs."""
    seen: list[str] = []

    def route(path):
        if path == "/plain.jpg":
            return 200, {"Content-Type": "image/jpeg"}, b"\xff\xd8 jpeg bytes"
        return 200, {"Content-Type": "image/jpeg", "Content-Encoding": "br"}, b"\x8b" * 1617

    import http.server

    original = http.server.BaseHTTPRequestHandler.parse_request

    def spy(self):
        ok = original(self)
        seen.append(self.headers.get("Accept-Encoding", ""))
        return ok

    http.server.BaseHTTPRequestHandler.parse_request = spy
    try:
        with local_http_server(route) as base:
            assert asyncio.run(fetch_image(f"{base}/plain.jpg", LOOPBACK)) == b"\xff\xd8 jpeg bytes"
            with pytest.raises(FetchError, match="Content-Encoding br"):
                asyncio.run(fetch_image(f"{base}/bomb.jpg", LOOPBACK))
    finally:
        http.server.BaseHTTPRequestHandler.parse_request = original
    assert seen and all(value == "identity" for value in seen)


def _asgi(app, method: str, path: str, headers: dict, chunks: list[bytes]):
    """Drive the ASGI app directly; returns (status, body, how many body chunks it pulled)."""
    pulled = {"n": 0}
    sent: list[dict] = []

    async def receive():
        if pulled["n"] < len(chunks):
            pulled["n"] += 1
            return {"type": "http.request", "body": chunks[pulled["n"] - 1], "more_body": pulled["n"] < len(chunks)}
        return {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "scheme": "http",
        "server": ("127.0.0.1", 80),
        "client": ("127.0.0.1", 1),
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
    }
    asyncio.run(app(scope, receive, send))
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return status, body, pulled["n"]


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic x"}])
def test_row_1_an_unauthenticated_request_is_refused_before_its_body_is_read(headers):
    """Without a valid key the 401 goes out before a byte of the body is pulled: O(1) memory whatever
    follows (a 67 MB `[{},{},...]` cost 4.5 s and +1.6 GB before its 401), and bad JSON is 401, not 400."""
    app = create_app(GatewaySettings(triton_url="127.0.0.1:1", api_keys=(KEY,)))
    chunks = [b"[" + b"{}," * 100_000] * 20 + [b"{}]"]
    status, body, pulled = _asgi(app, "POST", "/v1/embeddings", {**headers, "Content-Type": "application/json"}, chunks)
    assert status == 401 and pulled == 0, (status, pulled)
    assert json.loads(body)["error"]["code"] in ("missing_api_key", "invalid_api_key")
    status, _, pulled = _asgi(app, "POST", "/v1/classify", headers, [b"{not json"])
    assert status == 401 and pulled == 0


def test_row_12_a_503_names_no_internal_address():
    """Triton went down after the gateway learnt its facts: the client's error names the internal
    address (gRPC's "ipv4:10.0.3.7:8001: Failed to connect"); the caller sees only the kind of failure."""
    from fastapi.testclient import TestClient
    from tritonclient.utils import InferenceServerException

    from clip_triton.facts import ServerFacts

    class DownClient(ClientSeam):  # the seam: app.state.client (AsyncClipClient's interface)
        async def get_facts(self):
            return ServerFacts(
                model="clip-triton-tiny", pretrained="none", embed_dim=4, logit_scale=1.0, served_model_name="tiny"
            )

        async def embed_texts(self, texts):
            raise InferenceServerException(
                "[StatusCode.UNAVAILABLE] failed to connect to all addresses; last error: UNKNOWN: "
                "ipv4:10.0.3.7:8001: Failed to connect to remote host: Connection refused"
            )

        async def embed_images(self, images):
            return await self.embed_texts(images)

        async def close(self):
            pass

    app = create_app(GatewaySettings(triton_url="127.0.0.1:1", api_keys=(KEY,)))
    with TestClient(app) as client:
        app.state.client = DownClient()
        answer = client.post(
            "/v1/embeddings", headers={"Authorization": f"Bearer {KEY}"}, json={"model": "tiny", "input": ["a cat"]}
        )
    assert answer.status_code == 503, answer.text
    assert "10.0.3.7" not in answer.text and "ipv4" not in answer.text.lower(), answer.text
    assert "InferenceServerException" in answer.text  # the kind of failure stays visible


def test_row_9_data_urls_are_parsed_in_linear_time():
    """`data:image/png` + 16 Mi semicolons took 5.6 s of CPU on the event loop (a backtracking regex)."""
    import base64
    import time

    from clip_triton.gateway.inputs import decode_data_url

    hostile = "data:image/png" + ";" * (16 * 2**20)
    started = time.process_time()
    with pytest.raises(ValueError, match="malformed data URL"):
        decode_data_url(hostile)
    with pytest.raises(ValueError, match="malformed data URL"):
        decode_data_url(hostile + ",AAAA")  # the header must end within its first 1,024 characters
    assert time.process_time() - started < 0.5  # measured: ~0.01 s
    payload = base64.b64encode(b"\\x89PNG bytes").decode()
    assert decode_data_url(f"data:image/png;base64,{payload}") == b"\\x89PNG bytes"
    assert decode_data_url(f"DATA:image/png;charset=x;BASE64,{payload}") == b"\\x89PNG bytes"
    with pytest.raises(ValueError, match="not an image"):
        decode_data_url(f"data:text/plain;base64,{payload}")
    with pytest.raises(ValueError, match="malformed"):
        decode_data_url(f"data:image/png,{payload}")  # not base64


def _facts_only_client():
    from clip_triton.facts import ServerFacts

    class FactsOnly(ClientSeam):  # the seam: app.state.client; these requests must be refused before any encoding
        async def get_facts(self):
            return ServerFacts(
                model="clip-triton-tiny", pretrained="none", embed_dim=4, logit_scale=1.0, served_model_name="tiny"
            )

        async def close(self):
            pass

    return FactsOnly()


@pytest.mark.parametrize(
    "prompts, templates, reason",
    [
        (["x" * 260_000], ["{}" * 500] * 16, "needs exactly one {} placeholder"),
        (["x" * 70_000], ["a photo of {}"], "70000 characters, 70011 in its longest template, over the limit of 65536"),
        (["a cat", "x" * 65_530], ["a blurry photo of {}"], "65548 in its longest template"),
    ],
)
def test_row_3_templates_are_sized_before_any_text_is_built(prompts, templates, reason):
    """276 KB of request once built +2.2 GB of strings before its 400: now the sizes are computed from
    the lengths, and nothing is built."""
    import tracemalloc

    from fastapi.testclient import TestClient

    app = create_app(GatewaySettings(triton_url="127.0.0.1:1", api_keys=(KEY,)))
    body = {"model": "tiny", "images": ["data:image/png;base64,AAAA"], "prompts": prompts, "templates": templates}
    with TestClient(app) as client:
        app.state.client = _facts_only_client()
        tracemalloc.start()
        try:
            answer = client.post("/v1/classify", headers={"Authorization": f"Bearer {KEY}"}, json=body)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert answer.status_code == 400 and reason in answer.text, answer.text
    assert peak < 64 * 2**20, f"peak {peak / 2**20:.0f} MiB"


def test_row_11_a_body_of_many_tiny_values_is_refused_before_it_is_parsed():
    """8.4 MB of `[{},{},...]` with a valid key: 0.95 s and +420 MB of dicts before the item count
    refused it; now its values are counted from the bytes and it is refused unparsed."""
    import tracemalloc

    from clip_triton.gateway.inputs import json_values_problem

    app = create_app(GatewaySettings(triton_url="127.0.0.1:1", api_keys=(KEY,)))
    chunks = [b'{"model": "tiny", "input": [' + b"{}," * 100_000] + [b"{}," * 100_000] * 27 + [b"{}]}"]
    tracemalloc.start()
    try:
        status, body, pulled = _asgi(
            app,
            "POST",
            "/v1/embeddings",
            {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
            chunks,
        )
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert status == 400 and json.loads(body)["error"]["code"] == "too_many_values", body[:300]
    assert peak < 3 * sum(map(len, chunks)), f"peak {peak / 2**20:.0f} MiB for {sum(map(len, chunks)) / 2**20:.1f} MiB"
    # What real requests send passes: prose (a comma per ~60 characters), image data URLs (none).
    prose = json.dumps({"model": "m", "input": ["a photo of a cat, on a mat, in the sun. " * 1500] * 200}).encode()
    images = json.dumps({"model": "m", "input": ["data:image/png;base64," + "A" * 4_000_000] * 8}).encode()
    assert len(prose) > 12_000_000 and json_values_problem(prose) is None and json_values_problem(images) is None
    assert json_values_problem(b"[" + b"1," * 200_000 + b"1]") is not None


def test_row_8_the_prompt_cache_is_bounded_in_bytes_and_keyed_by_digest():
    """256 prompts of an emoji and 65,529 characters: the key held the strings, +64 MB per cached set."""
    import numpy as np

    from clip_triton.client.scoring import PromptCache, prompt_set_key

    prompts = ["\N{CAT FACE}" + "x" * 65_529 + str(i) for i in range(256)]
    key = prompt_set_key(prompts, None)
    assert len(key) == 32 and key != prompt_set_key(prompts[:-1], None)
    assert prompt_set_key(["ab", "c"], None) != prompt_set_key(["a", "bc"], None)  # length-prefixed
    assert prompt_set_key(["a"], ["{}"]) != prompt_set_key(["a", "{}"], None)
    cache = PromptCache(entries=1000, max_bytes=1_000_000)
    for i in range(100):
        cache.put(prompt_set_key([str(i)], None), np.zeros((256, 256), np.float32))  # 256 KiB each
    assert cache.bytes <= 1_000_000 and len(cache) == 3
    cache.put(b"k" * 32, np.zeros((1024, 1024), np.float32))  # 4 MiB: over the whole budget, not kept
    assert cache.get(b"k" * 32) is None and len(cache) == 3


def test_row_7_fetches_are_owned_by_their_request_and_wait_for_slots_within_their_deadline(monkeypatch):
    """4 requests each with one malformed data URL and 15 slow URLs: all 400 at once, then 60 fetches
    ran anyway and a victim's URL waited 14 s for a slot. Now a request's failure cancels its fetches,
    and a URL that waits for a slot waits within its own deadline."""
    import time

    from fastapi.testclient import TestClient

    from clip_triton.gateway import routes as R

    started, cancelled = [], []

    async def slow_fetch(url, policy):
        started.append(url)
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.append(url)
            raise
        return b""

    monkeypatch.setattr(R, "fetch_image", slow_fetch)
    settings = GatewaySettings(
        triton_url="127.0.0.1:1", api_keys=(KEY,), max_concurrent_fetches=8, fetch=FetchPolicy(timeout_s=1.5)
    )
    app = create_app(settings)
    headers = {"Authorization": f"Bearer {KEY}"}
    with TestClient(app) as client:
        app.state.client = _facts_only_client()
        t0 = time.monotonic()
        for n in range(4):
            inputs = [f"http://slow.example/{n}/{i}.jpg" for i in range(15)] + ["data:image/png;base64,@@"]
            answer = client.post("/v1/embeddings", headers=headers, json={"model": "tiny", "input": inputs})
            assert answer.status_code == 400 and "input[15]" in answer.text, answer.text
        assert time.monotonic() - t0 < 10  # each answered at once, not after its fetches
        assert len(started) == 4 * 8  # each request's fetches took the 8 slots (the rest waited)...
        assert sorted(cancelled) == sorted(started)  # ...and every one that began was cancelled with it
        # Slots all taken by slow fetches: a URL waiting for one fails at its own deadline, not later.
        started.clear()
        t0 = time.monotonic()
        inputs = [f"http://slow.example/held/{i}.jpg" for i in range(9)]  # 8 slots, the 9th waits
        answer = client.post("/v1/embeddings", headers=headers, json={"model": "tiny", "input": inputs})
        assert answer.status_code == 400 and "was not fetched within 1.5 s" in answer.text, answer.text
        assert time.monotonic() - t0 < 10 and len(started) == 8
