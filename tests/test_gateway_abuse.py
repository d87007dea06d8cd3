"""Issue 27 (abuse, round 2), the rows fixed so far, in-process: no tritonserver, loopback HTTP only.

Each test failed on the code before the fix (the row of the issue's table is named)."""

from __future__ import annotations

import asyncio
import json

import pytest

from clip_triton.gateway import FetchPolicy, GatewaySettings, create_app
from clip_triton.gateway.fetch import FetchError, fetch_image, forbidden, vet

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

    class DownClient:  # the seam: app.state.client (AsyncClipClient's interface)
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

    from clip_triton.gateway.app import decode_data_url

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

    class FactsOnly:  # the seam: app.state.client; these requests must be refused before any encoding
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
