"""The OpenAI-compatible gateway, live on loopback in front of the live Triton, driven by the
official `openai` package (and httpx for the endpoints OpenAI's client has no method for)."""

import base64
import threading
import time

import httpx
import numpy as np
import openai
import pytest

from clip_triton.client import ClipClient
from clip_triton.errors import ClipTritonError
from clip_triton.gateway import FetchPolicy, GatewaySettings, create_app, server_config
from clip_triton.server import free_port

from .helpers import cos, local_http_server

KEY = "sk-test-key-123"


class StubResolver:
    """DNS for the suite: a fixed table, and every name it was asked. Nothing here resolves a real
    name or leaves loopback."""

    def __init__(self, table: dict[str, list[str]] | None = None):
        self.table = {"localhost": ["127.0.0.1"], **(table or {})}
        self.asked: list[str] = []

    async def __call__(self, host: str, port: int) -> list[str]:
        self.asked.append(host)
        if host in self.table:
            return list(self.table[host])
        try:
            import ipaddress

            return [str(ipaddress.ip_address(host))]  # literals resolve to themselves, as getaddrinfo does
        except ValueError:
            raise OSError(f"stub resolver: no such name {host}") from None


class LiveGateway:
    """The gateway app under uvicorn on loopback, in a thread of this process. ``client_factory``: the
    app's Triton client (default: the real AsyncClipClient at ``settings.triton_url``)."""

    def __init__(self, settings: GatewaySettings, client_factory=None):
        import uvicorn

        self.settings = settings
        self.port = free_port()
        app = create_app(settings) if client_factory is None else create_app(settings, client_factory)
        self.server = uvicorn.Server(server_config(app, "127.0.0.1", self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        assert self.server.started
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self):
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="module")
def fake_world(tmp_path_factory):
    """(facts, front models) of the tiny repository, in-process: the FakeClipClient's world."""
    from clip_triton.contract import ModelContract

    from .fakes import front_models, tiny_facts

    facts = tiny_facts()
    return facts, front_models(ModelContract.from_json(facts.contract), tmp_path_factory.mktemp("front"))


def fake_client_factory(fake_world):
    from .fakes import FakeClipClient

    return lambda settings: FakeClipClient(*fake_world)


@pytest.fixture(scope="module")
def engine(fake_world):
    """The fake encoders' answers: what a fake-backed gateway must return, item by item."""
    from .fakes import FakeEngine

    return FakeEngine(fake_world[0].embed_dim)


def suite_settings(triton_url: str = "127.0.0.1:1") -> GatewaySettings:
    """The suite's gateway: one key, a 2 MiB body limit, the stub resolver."""
    return GatewaySettings(
        triton_url=triton_url,
        api_keys=(KEY,),
        max_body_bytes=2 * 1024 * 1024,
        fetch=FetchPolicy(resolver=StubResolver()),
    )


@pytest.fixture(scope="module")
def gateway(fake_world):
    """The gateway in front of a FakeClipClient (tests/fakes.py): routes, schemas, limits and errors,
    in the fast tier. Parity through the real Triton uses ``live_gateway``."""
    live = LiveGateway(suite_settings(), fake_client_factory(fake_world))
    yield live
    live.stop()


@pytest.fixture(scope="module")
def live_gateway(triton):
    live = LiveGateway(suite_settings(triton.grpc_url))
    yield live
    live.stop()


@pytest.fixture(scope="module")
def offline_gateway():
    """The same gateway with nothing at its Triton address: for what it decides before any model call
    (auth, body limits, metrics labels, docs), in the fast tier."""
    live = LiveGateway(suite_settings())
    yield live
    live.stop()


@pytest.fixture()
def oai(gateway):
    return openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=KEY, max_retries=0)


@pytest.fixture()
def live_oai(live_gateway):
    return openai.OpenAI(base_url=f"{live_gateway.url}/v1", api_key=KEY, max_retries=0)


@pytest.fixture(scope="module")
def reference(triton):
    with ClipClient(triton.grpc_url) as client:
        yield client


def data_url(data: bytes, kind: str = "image/jpeg") -> str:
    return f"data:{kind};base64,{base64.b64encode(data).decode()}"


def test_text_embeddings_match_the_client(live_oai, reference):
    oai = live_oai
    texts = ["a photo of a cat", "Ünïcödé 🐱"]
    result = oai.embeddings.create(model="clip-triton-tiny", input=texts, encoding_format="float")
    got = np.array([d.embedding for d in result.data], dtype=np.float32)
    assert [d.index for d in result.data] == [0, 1]
    assert cos(got, reference.embed_texts(texts)).min() > 0.99999
    assert result.usage.prompt_tokens == result.usage.total_tokens > 4
    single = oai.embeddings.create(model="clip-triton-tiny", input="a photo of a cat")  # openai asks for base64
    assert np.abs(np.array(single.data[0].embedding, np.float32) - got[0]).max() < 1e-6


def test_data_url_images_and_mixed_lists(live_oai, reference, photos):
    oai = live_oai
    items = ["a rocket", data_url(photos["rocket"]), data_url(photos["cat"]), "a cat"]
    result = oai.embeddings.create(model="clip-triton-tiny", input=items)
    got = np.array([d.embedding for d in result.data], dtype=np.float32)
    expected = np.concatenate(
        [
            reference.embed_texts(["a rocket"]),
            reference.embed_images([photos["rocket"], photos["cat"]]),
            reference.embed_texts(["a cat"]),
        ]
    )
    assert got.shape == (4, 32) and cos(got, expected).min() > 0.99999


def test_base64_encoding_is_little_endian_float32(live_gateway, reference):
    gateway = live_gateway
    response = httpx.post(
        f"{gateway.url}/v1/embeddings",
        headers={"Authorization": f"Bearer {KEY}"},
        json={"model": "clip-triton-tiny", "input": "a cat", "encoding_format": "base64"},
    )
    assert response.status_code == 200
    vector = np.frombuffer(base64.b64decode(response.json()["data"][0]["embedding"]), dtype="<f4")
    assert np.abs(vector - reference.embed_texts(["a cat"])[0]).max() < 1e-6


def test_compact_encodings_through_the_live_gateway(live_oai, reference):
    """Each compact type through the real Triton, via the official openai package: the gateway's rows
    are the encoding of what ClipClient gets (issue 32; definitions in clip_triton/encodings.py)."""
    from clip_triton import encodings as E

    texts = ["a photo of a cat", "a rocket on a launch pad"]
    floats = reference.embed_texts(texts)
    for name in ("float16", "int8", "uint8", "binary", "ubinary"):
        numbers = live_oai.embeddings.create(
            model="clip-triton-tiny", input=texts, encoding_format="float", extra_body={"embedding_type": name}
        )
        got = np.array([d.embedding for d in numbers.data]).astype(E.dtype(name))
        want = E.encode(floats, name)
        if name == "float16":
            assert np.abs(got.astype(np.float32) - floats).max() < 1e-3
        elif name in ("int8", "uint8"):  # the float rows may differ in the last bits: one step at most
            assert np.abs(got.astype(int) - want.astype(int)).max() <= 1
        else:
            assert np.mean(got == want) > 0.95
        raw = live_oai.embeddings.create(
            model="clip-triton-tiny", input=texts, encoding_format="base64", extra_body={"embedding_type": name}
        )
        assert np.array_equal(np.stack([E.from_base64(d.embedding, name) for d in raw.data]), got)


def test_zero_shot_endpoint(live_gateway, reference, photos):
    gateway = live_gateway
    prompts = ["a cat", "a rocket", "a cup of coffee"]
    response = httpx.post(
        f"{gateway.url}/v1/classify",
        headers={"Authorization": f"Bearer {KEY}"},
        json={
            "model": "clip-triton-tiny",
            "images": [data_url(photos["cat"]), data_url(photos["coffee"])],
            "prompts": prompts,
        },
        timeout=60,
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["logit_scale"] == pytest.approx(reference.facts.logit_scale)
    assert body["scoring"] == "softmax" and body["logit_bias"] is None  # CLIP: a softmax over the prompts
    expected = reference.classify([photos["cat"], photos["coffee"]], prompts)
    for item, ranked in zip(body["data"], expected):
        assert [s["prompt"] for s in item["scores"]] == [r["prompt"] for r in ranked]
        assert [s["probability"] for s in item["scores"]] == pytest.approx([r["probability"] for r in ranked], rel=1e-5)
        assert sum(s["probability"] for s in item["scores"]) == pytest.approx(1.0, abs=1e-5)


def test_models_health_and_metrics(oai, gateway):
    assert [m.id for m in oai.models.list().data] == ["clip-triton-tiny"]
    oai.embeddings.create(model="clip-triton-tiny", input=["a cat"])
    assert httpx.get(f"{gateway.url}/healthz").status_code == 200
    assert httpx.get(f"{gateway.url}/readyz").json() == {"status": "ready"}
    metrics = httpx.get(f"{gateway.url}/metrics").text
    assert 'clip_gateway_requests_total{endpoint="/v1/embeddings",status="200"}' in metrics
    assert "clip_gateway_request_seconds_bucket" in metrics


def test_auth_failures(offline_gateway):
    gateway = offline_gateway
    client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as err:
        client.embeddings.create(model="clip-triton-tiny", input="x")
    assert err.value.status_code == 401 and err.value.body["code"] == "invalid_api_key"
    for headers in ({}, {"Authorization": "Basic abc"}, {"Authorization": "Bearer"}):
        response = httpx.post(
            f"{gateway.url}/v1/embeddings", headers=headers, json={"model": "clip-triton-tiny", "input": "x"}
        )
        assert response.status_code == 401 and response.json()["error"]["code"] == "missing_api_key"
    assert httpx.get(f"{gateway.url}/v1/models").status_code == 401


def test_bad_items_are_400_naming_the_index(oai, photos):
    cases = [
        (["fine", data_url(b"not an image")], "input[1]", "not a decodable image"),
        (["fine", "data:image/png;base64,@@@"], "input[1]", "invalid base64"),
        # A data URL that is not data:image/ is text (issue 18); a data:image/ one must be base64.
        (["fine", "data:image/png,raw-not-base64"], "input[1]", "malformed data URL"),
        (["fine", ""], "input[1]", "empty text"),
        ([data_url(photos["cat"]), "x" * 70_000], "input[1]", "over the limit"),
        (["a", "b", data_url(photos["cat"][:4000])], "input[2]", "corrupt or truncated"),
    ]
    for items, param, fragment in cases:
        with pytest.raises(openai.BadRequestError) as err:
            oai.embeddings.create(model="clip-triton-tiny", input=items)
        assert err.value.status_code == 400
        assert err.value.body["param"] == param and fragment in err.value.body["message"], err.value.body


def test_schema_model_and_size_errors(gateway, oai):
    headers = {"Authorization": f"Bearer {KEY}"}
    missing = httpx.post(f"{gateway.url}/v1/embeddings", headers=headers, json={"model": "clip-triton-tiny"})
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "input"
    tokens = httpx.post(
        f"{gateway.url}/v1/embeddings", headers=headers, json={"model": "clip-triton-tiny", "input": [[1, 2]]}
    )
    assert tokens.status_code == 400 and tokens.json()["error"]["type"] == "invalid_request_error"
    with pytest.raises(openai.NotFoundError) as err:
        oai.embeddings.create(model="text-embedding-3-small", input="x")
    assert err.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError, match="dimensions"):
        oai.embeddings.create(model="clip-triton-tiny", input="x", dimensions=8)
    huge = httpx.post(
        f"{gateway.url}/v1/embeddings",
        headers=headers,
        json={"model": "clip-triton-tiny", "input": "y" * (3 * 1024 * 1024)},
    )
    assert huge.status_code == 413 and huge.json()["error"]["code"] == "body_too_large"
    empty = httpx.post(f"{gateway.url}/v1/embeddings", headers=headers, json={"model": "clip-triton-tiny", "input": []})
    assert empty.status_code == 400


def test_triton_down_is_503(photos):
    live = LiveGateway(GatewaySettings(triton_url=f"127.0.0.1:{free_port()}", api_keys=(KEY,)))
    try:
        client = openai.OpenAI(base_url=f"{live.url}/v1", api_key=KEY, max_retries=0)
        with pytest.raises(openai.InternalServerError) as err:
            client.embeddings.create(model="clip-triton-tiny", input="x")
        assert err.value.status_code == 503 and err.value.body["code"] == "triton_unavailable"
        assert httpx.get(f"{live.url}/readyz").status_code == 503
        assert httpx.get(f"{live.url}/healthz").status_code == 200
    finally:
        live.stop()


def test_auth_is_required_unless_disabled():
    from clip_triton.errors import ClipTritonError

    with pytest.raises(ClipTritonError, match="no API keys"):
        GatewaySettings(triton_url="x:1")
    assert GatewaySettings(triton_url="x:1", auth=False).auth is False


@pytest.fixture(scope="module")
def image_host(photos):
    """A loopback HTTP server that serves an image, redirect chains, HTML and a huge body."""
    routes = {
        "/cat.jpg": (200, {"Content-Type": "image/jpeg"}, photos["cat"]),
        "/page.html": (200, {"Content-Type": "text/html"}, b"<html></html>"),
        "/huge.jpg": (200, {"Content-Type": "image/jpeg"}, b"\xff" * (2 * 1024 * 1024)),
    }

    def route(path):
        if path.startswith("/hop"):
            hops = int(path[4:] or 0)
            return 302, {"Location": "/cat.jpg" if hops == 0 else f"/hop{hops - 1}"}, b""
        return routes.get(path, (404, {"Content-Type": "text/plain"}, b"missing"))

    with local_http_server(route) as url:
        yield url


def test_urls_to_loopback_are_refused_by_default(oai, image_host):
    with pytest.raises(openai.BadRequestError) as err:
        oai.embeddings.create(model="clip-triton-tiny", input=["a cat", f"{image_host}/cat.jpg"])
    assert err.value.body["param"] == "input[1]" and "private, loopback or link-local" in err.value.body["message"]
    for url in (
        "http://169.254.169.254/latest/meta-data/",
        "http://10.0.0.1/x.jpg",
        "http://[::1]/x.jpg",
        "http://localhost/x.jpg",
        "http://[::ffff:127.0.0.1]/x.jpg",
    ):
        with pytest.raises(openai.BadRequestError) as err:
            oai.embeddings.create(model="clip-triton-tiny", input=[url])
        assert "refused" in err.value.body["message"]


def test_other_schemes_are_text_never_fetched(oai, engine):
    """Only data:image and http(s) items are images (NV-CLIP's convention); file:// is plain text."""
    items = ["file:///etc/passwd", "ftp://example.com/x.jpg"]
    got = oai.embeddings.create(model="clip-triton-tiny", input=items)
    vectors = np.array([d.embedding for d in got.data], dtype=np.float32)
    assert cos(vectors, engine.embed_texts(items)).min() > 0.99999


def test_url_fetching_when_loopback_is_allowed(fake_world, engine, image_host, photos):
    settings = GatewaySettings(
        triton_url="127.0.0.1:1",
        api_keys=(KEY,),
        fetch=FetchPolicy(allow_private=True, max_bytes=1024 * 1024, max_redirects=2, resolver=StubResolver()),
    )
    live = LiveGateway(settings, fake_client_factory(fake_world))
    try:
        client = openai.OpenAI(base_url=f"{live.url}/v1", api_key=KEY, max_retries=0)
        got = client.embeddings.create(model="clip-triton-tiny", input=[f"{image_host}/cat.jpg", f"{image_host}/hop1"])
        vectors = np.array([d.embedding for d in got.data], dtype=np.float32)
        assert cos(vectors, engine.embed_images([photos["cat"]] * 2)).min() > 0.99999
        for path, fragment in (
            ("/page.html", "not image/*"),
            ("/huge.jpg", "byte limit"),
            ("/missing.jpg", "HTTP 404"),
            ("/hop5", "redirects"),
        ):
            with pytest.raises(openai.BadRequestError) as err:
                client.embeddings.create(model="clip-triton-tiny", input=["ok", f"{image_host}{path}"])
            assert err.value.body["param"] == "input[1]" and fragment in err.value.body["message"], err.value.body
    finally:
        live.stop()


# -- SSRF ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "10.1.2.3",
        "169.254.169.254",
        "100.64.0.1",
        "::1",
        "fe80::1",
        "fd00::1",
        "::ffff:10.0.0.1",
        "2002:7f00:1::",  # 6to4 of 127.0.0.1 (passed the old check)
        "2002:a9fe:a9fe::",  # 6to4 of the cloud metadata address
        "2001:0:4136:e378:8000:63bf:3fff:fdd2",  # Teredo
        "64:ff9b::7f00:1",
        "64:ff9b::a9fe:a9fe",  # NAT64 well-known prefix around private IPv4
        "64:ff9b:1::a00:1",  # NAT64 local-use prefix
        "0.0.0.0",
        "::",
        "224.0.0.1",
        "240.0.0.1",
    ],
)
def test_private_addresses_are_refused_however_wrapped(address):
    from clip_triton.gateway.fetch import forbidden

    assert forbidden(address)


@pytest.mark.parametrize("address", ["93.184.216.34", "2606:4700:4700::1111", "8.8.8.8"])
def test_public_addresses_are_allowed(address):
    from clip_triton.gateway.fetch import forbidden

    assert not forbidden(address)


def test_idna_2008_name_is_what_gets_resolved_and_connected():
    """`straße.example`: Python's IDNA 2003 codec says strasse.example, httpx's IDNA 2008 says
    xn--strae-oqa.example. An attacker's DNS answered the first with a public address and the
    second with 127.0.0.1: the check passed, the fetch hit loopback. Now one name is resolved, once,
    and the connection goes to the address that was checked."""
    import asyncio

    from clip_triton.gateway.fetch import FetchError, vet

    resolver = StubResolver({"strasse.example": ["93.184.216.34"], "xn--strae-oqa.example": ["127.0.0.1"]})
    with pytest.raises(FetchError, match="private, loopback"):
        asyncio.run(vet("http://straße.example/cat.jpg", FetchPolicy(resolver=resolver)))
    assert resolver.asked == ["xn--strae-oqa.example"]
    resolver = StubResolver({"xn--strae-oqa.example": ["93.184.216.34"]})
    target = asyncio.run(vet("https://Straße.example:8443/a/cat.jpg?x=1", FetchPolicy(resolver=resolver)))
    assert target.url == "https://93.184.216.34:8443/a/cat.jpg?x=1"  # the vetted address, not the name
    assert target.host_header == "xn--strae-oqa.example:8443" and target.server_name == "xn--strae-oqa.example"
    assert resolver.asked == ["xn--strae-oqa.example"]  # once: a rebinding second answer is never asked for


def test_fetch_connects_to_the_vetted_address_with_the_name_as_host(photos):
    """End to end on loopback (private addresses allowed): `images.test` exists only in the stub
    resolver, so the request can only have reached the server through the vetted address; the server
    sees the name in its Host header."""
    import asyncio

    from clip_triton.gateway.fetch import fetch_image

    seen, hosts = [], []

    def route(path):
        seen.append(path)
        return 200, {"Content-Type": "image/jpeg"}, photos["cat"]

    with local_http_server(route, hosts) as base:
        port = base.rsplit(":", 1)[1]
        resolver = StubResolver({"images.test": ["127.0.0.1"]})
        body = asyncio.run(
            fetch_image(f"http://images.test:{port}/cat.jpg", FetchPolicy(allow_private=True, resolver=resolver))
        )
    assert body == photos["cat"] and seen == ["/cat.jpg"] and resolver.asked == ["images.test"]
    assert hosts == [f"images.test:{port}"]


# -- cost per request is bounded by what is kept -----------------------------------------------------
def _rss_mib() -> float:
    with open("/proc/self/status") as handle:
        return next(int(line.split()[1]) for line in handle if line.startswith("VmRSS")) / 1024


@pytest.mark.parametrize("keyed", [False, True])
def test_a_chunked_body_is_refused_as_it_arrives(offline_gateway, keyed):
    """No Content-Length, 64 MiB announced chunk by chunk. Without an API key the gateway answers 401
    before reading any of it (issue 27: before, the key was checked after parsing); with a key it
    answers 413 once it has counted past its 2 MiB limit and reads no further (before, only
    Content-Length was read: a 300 MiB chunked body drove it to 1.14 GiB)."""
    gateway = offline_gateway
    import select
    import socket

    before = _rss_mib()
    sock = socket.create_connection(("127.0.0.1", gateway.port), timeout=30)
    chunk = b"x" * (256 * 1024)
    sent, answer = 0, b""
    key = f"Authorization: Bearer {KEY}\r\n".encode() if keyed else b""
    try:
        sock.sendall(
            b"POST /v1/embeddings HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
            + key
            + b"Transfer-Encoding: chunked\r\n\r\n"
        )
        while sent < 64 * 1024 * 1024:
            try:
                sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            except OSError:
                break  # the gateway hung up after answering
            sent += len(chunk)
            if select.select([sock], [], [], 0)[0]:
                break
        sock.settimeout(30)
        while b"\r\n\r\n" not in answer:
            data = sock.recv(65536)
            if not data:
                break
            answer += data
    finally:
        sock.close()
    if keyed:
        assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
        assert b"body_too_large" in answer or b"content-length" in answer.lower()
        metrics = httpx.get(f"{gateway.url}/metrics").text
        refused = [line for line in metrics.splitlines() if line.startswith("clip_gateway_bodies_refused_total ")]
        assert refused and float(refused[0].split()[1]) >= 1
    else:
        assert answer.startswith(b"HTTP/1.1 401"), answer[:200]  # its body: tests/test_gateway_abuse.py
    assert sent < 16 * 1024 * 1024  # it stopped reading long before the end
    assert _rss_mib() - before < 64


def test_templates_are_literal_and_bounded(gateway, oai, photos):
    headers = {"Authorization": f"Bearer {KEY}"}
    body = {
        "model": "clip-triton-tiny",
        "images": [data_url(photos["cat"])],
        "prompts": ["cat", "dog"],
        "templates": ["{:>30000000} {}", "{0.__class__} a photo of a {}."],
    }
    before = _rss_mib()
    literal = httpx.post(f"{gateway.url}/v1/classify", headers=headers, json=body, timeout=120)
    assert literal.status_code == 200, literal.text  # str.format would have padded to 30 MB, or failed (500)
    assert _rss_mib() - before < 64
    too_many = httpx.post(
        f"{gateway.url}/v1/classify",
        headers=headers,
        timeout=120,
        json={**body, "prompts": [f"p{i}" for i in range(32)], "templates": [f"t{i} {{}}" for i in range(32)]},
    )
    assert too_many.status_code == 400 and too_many.json()["error"]["code"] == "too_many_texts"
    assert "32 prompts x 32 templates = 1024" in too_many.json()["error"]["message"]
    for templates, fragment in (
        (["no placeholder"], "placeholder"),
        (["{}" + "x" * 2000], "characters"),
        ([f"{{}} {i}" for i in range(65)], "templates, over the limit"),
    ):
        bad = httpx.post(f"{gateway.url}/v1/classify", headers=headers, json={**body, "templates": templates})
        assert bad.status_code == 400 and fragment in bad.json()["error"]["message"], bad.text


def test_classify_usage_counts_every_templated_text(gateway, photos):
    from clip_triton.tokenizer import ClipTokenizer

    headers = {"Authorization": f"Bearer {KEY}"}
    templates = ["a photo of a {}.", "a sketch of the {}, in pencil"]
    body = {
        "model": "clip-triton-tiny",
        "images": [data_url(photos["cat"])],
        "prompts": ["cat", "red panda"],
        "templates": templates,
    }
    usage = httpx.post(f"{gateway.url}/v1/classify", headers=headers, json=body, timeout=120).json()["usage"]
    tokenizer = ClipTokenizer()
    expected = sum(int((tokenizer.ids(t.replace("{}", p)) != 0).sum()) for p in body["prompts"] for t in templates)
    assert usage["prompt_tokens"] == expected


def test_url_count_per_request_is_capped(oai):
    with pytest.raises(openai.BadRequestError) as err:
        oai.embeddings.create(model="clip-triton-tiny", input=[f"http://127.0.0.1:9/{i}.jpg" for i in range(17)])
    assert err.value.body["code"] == "too_many_urls" and "limit of 16" in err.value.body["message"]


def test_lone_surrogates_are_400_not_500(gateway, photos):
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    raw = '{"model": "clip-triton-tiny", "input": ["fine", "bad \\ud800 text"]}'
    response = httpx.post(f"{gateway.url}/v1/embeddings", headers=headers, content=raw)
    assert response.status_code == 400 and response.json()["error"]["param"] == "input[1]", response.text
    assert "surrogate" in response.json()["error"]["message"]
    raw = (
        '{"model": "clip-triton-tiny", "images": ["'
        + data_url(photos["cat"])
        + '"], "prompts": ["cat"], "templates": ["a {} \\udfff"]}'
    )
    response = httpx.post(f"{gateway.url}/v1/classify", headers=headers, content=raw)
    assert response.status_code == 400 and response.json()["error"]["param"] == "templates[0]", response.text
    raw = (
        '{"model": "clip-triton-tiny", "images": ["'
        + data_url(photos["cat"])
        + '"], "prompts": ["cat", "dog \\ud800"], "templates": ["a {}", "the {}"]}'
    )
    response = httpx.post(f"{gateway.url}/v1/classify", headers=headers, content=raw)
    assert response.status_code == 400 and response.json()["error"]["param"] == "prompts[1]", response.text


def test_metrics_label_by_route_not_raw_path(offline_gateway):
    gateway = offline_gateway
    for i in range(300):
        httpx.get(f"{gateway.url}/no/such/path/{i}")
    metrics = httpx.get(f"{gateway.url}/metrics").text
    assert "/no/such/path" not in metrics
    assert 'clip_gateway_requests_total{endpoint="(unmatched)",status="404"}' in metrics


def test_tokenizing_happens_off_the_event_loop(gateway, oai, monkeypatch):
    import threading

    from clip_triton.tokenizer import ClipTokenizer

    threads = []
    original = ClipTokenizer.ids

    def recording(self, text):
        threads.append(threading.current_thread())
        return original(self, text)

    monkeypatch.setattr(ClipTokenizer, "ids", recording)
    oai.embeddings.create(model="clip-triton-tiny", input=["a photo of a cat"])
    assert threads and gateway.thread not in threads  # uvicorn's event loop runs on gateway.thread


def test_api_docs_are_off_unless_asked_for(offline_gateway):
    gateway = offline_gateway
    for path in ("/docs", "/redoc", "/openapi.json"):
        assert httpx.get(f"{gateway.url}{path}").status_code == 404
    live = LiveGateway(GatewaySettings(triton_url="127.0.0.1:1", api_keys=(KEY,), docs=True))
    try:
        assert httpx.get(f"{live.url}/openapi.json").status_code == 200
    finally:
        live.stop()


def test_prompt_cache_is_bounded():
    from clip_triton.client.scoring import PromptCache

    cache = PromptCache(entries=3)
    for i in range(10):
        cache.put(("p", i), i)
    assert len(cache) == 3 and cache.get(("p", 0)) is None and cache.get(("p", 9)) == 9
    cache.get(("p", 7))
    cache.put(("p", 10), 10)  # least recently used (8) goes, 7 was just used
    assert cache.get(("p", 8)) is None and cache.get(("p", 7)) == 7


# -- inputs are classified exactly as documented ------------------------------------------------------
def test_data_prefixed_text_is_text_and_only_data_image_is_an_image(oai, engine, photos):
    """Only `data:image/...` items are images; "data: the quick brown fox" is a caption (it was refused
    as a malformed data URL)."""
    items = [
        "data: the quick brown fox",
        "data:text/plain;base64,aGVsbG8=",
        "Data: Sources and methods",
        data_url(photos["cat"]),
        "DATA:IMAGE/JPEG;BASE64," + data_url(photos["cat"]).split(",", 1)[1],
    ]
    got = oai.embeddings.create(model="clip-triton-tiny", input=items)
    vectors = np.array([d.embedding for d in got.data], dtype=np.float32)
    assert cos(vectors[:3], engine.embed_texts(items[:3])).min() > 0.99999
    assert cos(vectors[3:], engine.embed_images([photos["cat"]] * 2)).min() > 0.99999
    for bad in ("data:image/png,not-base64-data", "data:image/png;base64,@@@"):
        with pytest.raises(openai.BadRequestError) as err:
            oai.embeddings.create(model="clip-triton-tiny", input=["fine", bad])
        assert err.value.body["param"] == "input[1]", err.value.body


def test_typed_items_say_what_they_are(gateway, engine, photos):
    """A caption that is a URL is embedded as text when typed so, and never fetched."""
    headers = {"Authorization": f"Bearer {KEY}"}
    resolver = gateway_resolver(gateway)
    asked_before = list(resolver.asked)
    items = [
        {"type": "text", "text": "https://example.com/cat.jpg"},
        {"type": "image_url", "image_url": {"url": data_url(photos["cat"])}},
        {"type": "image_url", "image_url": data_url(photos["rocket"])},
        "a plain caption",
    ]
    response = httpx.post(
        f"{gateway.url}/v1/embeddings", headers=headers, timeout=60, json={"model": "clip-triton-tiny", "input": items}
    )
    assert response.status_code == 200, response.text
    vectors = np.array([d["embedding"] for d in response.json()["data"]], dtype=np.float32)
    assert cos(vectors[[0, 3]], engine.embed_texts(["https://example.com/cat.jpg", "a plain caption"])).min() > 0.99999
    assert cos(vectors[[1, 2]], engine.embed_images([photos["cat"], photos["rocket"]])).min() > 0.99999
    assert resolver.asked == asked_before  # the URL-looking caption was never resolved, let alone fetched
    for bad, fragment in (
        ({"type": "image_url", "image_url": "file:///etc/passwd"}, "image_url must be"),
        ({"type": "audio", "data": "x"}, "a typed item is"),
        ({"text": "no type"}, "a typed item is"),
    ):
        response = httpx.post(
            f"{gateway.url}/v1/embeddings", headers=headers, json={"model": "clip-triton-tiny", "input": ["fine", bad]}
        )
        assert response.status_code == 400 and response.json()["error"]["param"] == "input[1]", response.text
        assert fragment in response.json()["error"]["message"]


def gateway_resolver(gateway) -> StubResolver:
    return gateway.settings.fetch.resolver


def test_served_model_name_is_the_only_public_id(fake_world):
    """`gateway --served-model-name` gives the model the id clients use; the architecture name (and any
    checkpoint path behind it) is not accepted or shown."""
    live = LiveGateway(
        GatewaySettings(
            triton_url="127.0.0.1:1",
            api_keys=(KEY,),
            served_model_name="clip-tiny-v1",
            fetch=FetchPolicy(resolver=StubResolver()),
        ),
        fake_client_factory(fake_world),
    )
    try:
        client = openai.OpenAI(base_url=f"{live.url}/v1", api_key=KEY, max_retries=0)
        listed = client.models.list().data
        assert [m.id for m in listed] == ["clip-tiny-v1"] and listed[0].model_extra["pretrained"] == "none"
        got = client.embeddings.create(model="clip-tiny-v1", input=["a cat"], encoding_format="float")
        assert got.model == "clip-tiny-v1" and len(got.data[0].embedding) == 32
        with pytest.raises(openai.NotFoundError, match="serves 'clip-tiny-v1'"):
            client.embeddings.create(model="clip-triton-tiny", input=["a cat"])
    finally:
        live.stop()
    with pytest.raises(ClipTritonError, match="not a model id"):
        GatewaySettings(api_keys=(KEY,), served_model_name="../etc/passwd x")


def test_a_language_the_model_does_not_have_is_refused_before_any_work(gateway, photos):
    """``language`` (NLLB models' source language) is checked against the model's codes first: this tiny
    CLIP has none, so the mark would be read as text; 400 naming the field, on both endpoints. The
    served path with real codes: tests/test_hf_towers.py (NLLB on the real tritonserver)."""
    headers = {"Authorization": f"Bearer {KEY}"}
    for path, body in (
        ("/v1/embeddings", {"model": "clip-triton-tiny", "input": ["un chat"], "language": "fra_Latn"}),
        (
            "/v1/classify",
            {
                "model": "clip-triton-tiny",
                "images": [data_url(photos["cat"])],
                "prompts": ["chat"],
                "language": "fra_Latn",
            },
        ),
    ):
        answer = httpx.post(f"{gateway.url}{path}", headers=headers, json=body, timeout=60)
        assert answer.status_code == 400, answer.text
        error = answer.json()["error"]
        assert (error["param"], error["code"]) == ("language", "unknown_language")
        assert "has no language codes" in error["message"]
        no_language = {k: v for k, v in body.items() if k != "language"}
        assert httpx.post(f"{gateway.url}{path}", headers=headers, json=no_language, timeout=60).status_code == 200


def test_a_model_is_named_by_arch_and_tag_too(gateway):
    """The gateway routes ``ARCH/TAG`` to the one model served without a name of its own (the rule of
    facts.resolve_alias, which the clients use too) and answers with its public id."""
    headers = {"Authorization": f"Bearer {KEY}"}
    listed = httpx.get(f"{gateway.url}/v1/models", headers=headers, timeout=30).json()["data"][0]
    alias = f"{listed['id']}/{listed['pretrained']}"
    answer = httpx.post(f"{gateway.url}/v1/embeddings", headers=headers, json={"model": alias, "input": "a cat"})
    assert answer.status_code == 200, answer.text
    assert answer.json()["model"] == listed["id"]
    wrong = httpx.post(f"{gateway.url}/v1/embeddings", headers=headers, json={"model": alias + "x", "input": "a cat"})
    assert wrong.status_code == 404 and repr(listed["id"]) in wrong.json()["error"]["message"]


def test_embeddings_are_serialized_once_as_shortest_float32(gateway, engine, monkeypatch):
    """/v1/embeddings renders its answer once, without the per-number walk of FastAPI's
    ``jsonable_encoder`` over every embedding (6.4 of 10 ms for 16 x 512 floats, issue 33's gateway
    rows), and writes each float as the shortest decimal that reads back as the same float32, as
    OpenAI's API does: 0.0055017625, not the 17 digits of its float64 value (0.005501762498170137),
    which made the body 1.7x larger and cost 3.8 ms to render and 1.3 ms more to parse per request
    of 16 (issue 33's gateway rows). Read as float32, every row is the engine's, bit for bit."""
    import fastapi.routing

    walked = []
    original = fastapi.routing.jsonable_encoder

    def counting(obj, *args, **kwargs):
        if isinstance(obj, dict) and "data" in obj:
            walked.append(obj)
        return original(obj, *args, **kwargs)

    monkeypatch.setattr(fastapi.routing, "jsonable_encoder", counting)
    texts = [f"a photo of item {i} ünïcode" for i in range(16)]
    response = httpx.post(
        f"{gateway.url}/v1/embeddings",
        headers={"Authorization": f"Bearer {KEY}"},
        timeout=60,
        json={"model": "clip-triton-tiny", "input": texts},
    )
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    answer = response.json()
    vectors = np.array([d["embedding"] for d in answer["data"]], dtype=np.float32)
    assert np.array_equal(vectors, engine.embed_texts(texts))  # exact once read as float32
    numbers = response.text.split('"embedding":[', 1)[1].split("]", 1)[0].split(",")
    for text, value in zip(numbers, vectors[0], strict=True):  # no digit more than float32 needs
        assert float(np.float32(text)) == float(value)
        assert len(text.lstrip("-").replace(".", "").replace("e", "").lstrip("0")) <= 12, text
    assert walked == []


def test_every_embedding_type_reads_back_exactly_from_its_json_numbers(oai, gateway):
    """The JSON numbers of every ``embedding_type``, read as that type, are the row its base64 form
    carries, bit for bit: floats as their shortest float32 / float16 decimals, integers as integers."""
    from clip_triton import encodings as E

    texts = ["a photo of a cat", "a rocket on a launch pad", "ünïcode"]
    for name in E.EMBEDDING_TYPES:
        extra = {"embedding_type": name}
        numbers = oai.embeddings.create(
            model="clip-triton-tiny", input=texts, encoding_format="float", extra_body=extra
        )
        raw = oai.embeddings.create(model="clip-triton-tiny", input=texts, encoding_format="base64", extra_body=extra)
        want = np.stack([E.from_base64(d.embedding, name) for d in raw.data])
        got = np.array([d.embedding for d in numbers.data], dtype=np.float64)
        assert np.array_equal(got.astype(E.dtype(name)), want), name
        answer = httpx.post(  # the raw JSON (openai's client reads every number as a float)
            f"{gateway.url}/v1/embeddings",
            headers={"Authorization": f"Bearer {KEY}"},
            json={"model": "clip-triton-tiny", "input": texts, **extra},
        ).json()
        kinds = {type(x) for d in answer["data"] for x in d["embedding"]}
        assert kinds == ({float} if name in ("float", "float16") else {int}), name


def test_a_non_finite_embedding_is_a_server_error_not_null(fake_world):
    """orjson writes NaN as null: a NaN row from the model server (the encoders refuse them, so a
    defect) is a 502 that says so, never an answer with nulls in it."""
    from .fakes import FakeClipClient

    class NaNTexts(FakeClipClient):
        async def embed_texts_counted(self, texts, *, language=None):
            vectors, counts = await super().embed_texts_counted(texts, language=language)
            vectors = vectors.copy()
            vectors[-1, 0] = np.nan
            return vectors, counts

    live = LiveGateway(suite_settings(), lambda settings: NaNTexts(*fake_world))
    try:
        response = httpx.post(
            f"{live.url}/v1/embeddings",
            headers={"Authorization": f"Bearer {KEY}"},
            json={"model": "clip-triton-tiny", "input": ["a cat", "a dog"]},
        )
    finally:
        live.stop()
    assert response.status_code == 502, response.text
    assert response.json()["error"]["code"] == "triton_bad_output"


def test_an_idle_keep_alive_connection_outlives_the_clients_expiry(offline_gateway):
    """httpx (the openai package's transport) keeps an idle connection for 5 s; uvicorn closed it at
    5 s too, so a client reusing one at that moment failed with "Connection error" (seen once in 31
    threads x 60 s of tests/test_mixed_clients.py). The gateway keeps idle connections longer
    (``KEEP_ALIVE_S``): a request on a connection idle for 6 s is still answered."""
    import http.client

    from clip_triton.gateway import KEEP_ALIVE_S

    assert KEEP_ALIVE_S > 60  # the clients' expiry (5 s) and common load balancers' idle timeouts
    connection = http.client.HTTPConnection("127.0.0.1", offline_gateway.port, timeout=30)
    try:
        connection.request("GET", "/healthz")
        first = connection.getresponse()
        first.read()
        assert first.status == 200 and not first.will_close
        time.sleep(6)
        connection.request("GET", "/healthz")  # the same socket: http.client does not reconnect silently
        second = connection.getresponse()
        second.read()
        assert second.status == 200
    finally:
        connection.close()
