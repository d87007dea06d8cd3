"""Several served models behind one deployment (issue 30): one repository, one tritonserver, one gateway.

Fast tier: the naming rule, the repository of two exports, discovery and its refusals in both clients
(tritonclient faked), repeated flags, the gateway's routing, metrics and `usage` against fake clients,
and the tokenizer model's per-item token counts. Integration: a tiny CLIP and a tiny SigLIP 2 (different
embedding sizes, softmax and sigmoid scoring) served by the real tritonserver from one repository, each
exact against open_clip through ClipClient, AsyncClipClient, raw tritonclient and the gateway (the
official ``openai`` package), with the gateway holding no tokenizer files.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
import pytest

from clip_triton import contract as C
from clip_triton.client import AsyncClipClient, ClipClient, ClipClientError
from clip_triton.contract import ModelNames
from clip_triton.errors import ClipTritonError
from clip_triton.facts import ServerFacts

from .fakes import FakeTriton, fake_embedding
from .helpers import ROOT, SEED, cos, export_for_tests, open_clip_reference_for

SIGLIP_CONFIG = ROOT / "tests" / "configs" / "clip-triton-tiny-siglip2.json"
TINY = "tiny-clip"
SIGLIP = "tiny-siglip2"


# -- the naming rule ------------------------------------------------------------------------------------
def test_names_of_a_served_model_follow_one_rule():
    single = ModelNames()
    assert (single.image, single.text, single.front(C.VISION), single.encoder(C.TEXT)) == (
        "clip_image",
        "clip_text",
        "preprocess",
        "text_encoder",
    )
    names = ModelNames.for_served("laion/ViT-B-32:v2.1")
    assert names.image == "clip_image__laion-ViT-B-32-v2-1"
    assert names.cached(C.TEXT) == "clip_text_cached__laion-ViT-B-32-v2-1"
    assert names.front(C.TEXT) == "tokenizer__laion-ViT-B-32-v2-1"
    for name in (names.image, names.text):
        assert ModelNames.of_ensemble(name) == names
    assert ModelNames.of_ensemble("clip_text") == single
    for other in ("clip_text_cached", "clip_image_cached__x", "clip_image__", "tokenizer__x", "vision_encoder"):
        assert ModelNames.of_ensemble(other) is None, other
    assert C.ensemble_tower(names.text) is C.TEXT and C.ensemble_tower(single.image) is C.VISION
    assert C.ensemble_tower(names.front(C.TEXT)) is None


# -- the repository -------------------------------------------------------------------------------------
def _fake_export(folder: Path, contract: C.ModelContract, logit_bias: float | None = None) -> Path:
    """An export folder's manifest (no graphs: a TensorRT repository places none)."""
    folder.mkdir(parents=True)
    manifest = {
        "format": C.EXPORT_FORMAT,
        "contract": contract.to_dict(),
        "logit_scale": 100.0,
        "logit_bias": logit_bias,
        "model": contract.model,
        "pretrained": contract.pretrained,
    }
    (folder / C.MANIFEST).write_text(json.dumps(manifest))
    return folder


def _contracts() -> tuple[C.ModelContract, C.ModelContract]:
    bigg = C.ModelContract.default()
    small = bigg.with_(model="ViT-B-32", pretrained="laion2b_s34b_b79k", embed_dim=512)
    return bigg, small


def test_a_repository_of_two_exports_names_each_models_own_pipeline(tmp_path):
    from clip_triton.repository import RepoOptions, parse, served_models, write_repository

    bigg, small = _contracts()
    a, b = _fake_export(tmp_path / "a", bigg), _fake_export(tmp_path / "b", small)
    options = RepoOptions(runtime="tensorrt")
    repo = write_repository(tmp_path / "repo", options=options, exports=[(a, "bigG"), (b, None)])
    expected = set()
    for served, contract in (("bigG", bigg), ("ViT-B-32", small)):
        names = ModelNames.for_served(served)
        expected |= set(served_models(options, names))
        configs = {name: parse((repo / name / "config.pbtxt").read_text()) for name in served_models(options, names)}
        for tower in C.TOWERS:
            # every step of this model's pipeline is this model's: nothing crosses to the other
            steps = [
                s.model_name
                for s in configs[
                    names.cached(tower) if tower is C.TEXT else names.ensemble(tower)
                ].ensemble_scheduling.step
            ]
            if tower is C.TEXT:  # the tokenizer calls its own model's encoder (BLS, one call per bucket)
                assert steps == [names.front(tower)], steps
                assert configs[names.front(tower)].parameters["encoder"].string_value == names.encoder(tower)
            else:
                assert steps == [names.front(tower), names.encoder(tower)], steps
        params = configs[names.image].parameters
        assert params["served_model_name"].string_value == served
        assert params["embed_dim"].string_value == str(contract.embed_dim)
        assert params["token_counts"].string_value == "true"
        assert params["text_split"].string_value == "true"  # clients need not group texts by length
        assert (repo / f"manifest__{names.slug}.json").is_file()
    folders = {p.name for p in repo.iterdir() if p.is_dir()}
    assert folders == expected and not {"clip_image", "clip_text"} & folders  # no default among several


def test_one_export_keeps_the_single_model_names(tmp_path):
    from clip_triton.repository import RepoOptions, write_repository

    bigg, _ = _contracts()
    repo = write_repository(
        tmp_path / "r", options=RepoOptions(runtime="tensorrt"), exports=[(_fake_export(tmp_path / "a", bigg), "x")]
    )
    assert (repo / "clip_image").is_dir() and (repo / C.MANIFEST).is_file()
    assert 'string_value: "x"' in (repo / "clip_image" / "config.pbtxt").read_text()


@pytest.mark.parametrize(
    "names, says",
    [
        (("same", "same"), "two served models would be named 'same'"),
        ((None, None), "two served models would be named 'ViT-B-32'"),
        (("a/b", "a:b"), "give the same Triton model names"),
        (("ok", "bad name"), "is not a model id"),
    ],
)
def test_served_names_must_differ_after_the_rule(tmp_path, names, says):
    from clip_triton.repository import RepoOptions, write_repository

    _, small = _contracts()
    a, b = _fake_export(tmp_path / "a", small), _fake_export(tmp_path / "b", small)
    with pytest.raises(ClipTritonError, match=".*".join(map(str, [says]))):
        write_repository(
            tmp_path / "r", options=RepoOptions(runtime="tensorrt"), exports=[(a, names[0]), (b, names[1])]
        )
    assert not (tmp_path / "r").exists()  # refused before anything was written


def test_repeated_flags_mean_several_models_or_are_refused(capsys):
    from clip_triton.cli import build_parser
    from clip_triton.cli.build import exports_of

    parser = build_parser()
    args = parser.parse_args(["repo", "--repo", "r", "--onnx-dir", "a", "--onnx-dir", "b"])
    assert exports_of(args.onnx_dir, args.served_model_name) == [("a", None), ("b", None)]
    args = parser.parse_args(
        [
            "repo",
            "--repo",
            "r",
            "--onnx-dir",
            "a",
            "--served-model-name",
            "x",
            "--onnx-dir",
            "b",
            "--served-model-name",
            "y",
        ]
    )
    assert exports_of(args.onnx_dir, args.served_model_name) == [("a", "x"), ("b", "y")]
    with pytest.raises(ClipTritonError, match="1 --served-model-name for 2 --onnx-dir"):
        exports_of(["a", "b"], ["x"])
    # every other flag takes one value: a second one is refused, under any of its spellings
    for argv in (
        ["repo", "--repo", "r", "--out", "s"],
        ["repo", "--repo", "r", "--runtime", "python", "--runtime", "tensorrt"],
        ["embed", "--texts", "t", "--out", "o", "--url", "a:1", "--url", "b:1"],
        ["classify", "--images", "i", "--prompts", "p", "--served-model", "a", "--served-model", "b"],
        ["embed", "--texts", "t", "--out", "o", "--progress", "--no-progress"],
    ):
        with pytest.raises(SystemExit) as exit_info:
            parser.parse_args(argv)
        assert exit_info.value.code == 2
        assert "given twice" in capsys.readouterr().err, argv


# -- the clients ----------------------------------------------------------------------------------------
def _facts(name: str, dim: int, bias: float | None = None) -> ServerFacts:
    return ServerFacts(
        model=name.upper(),
        pretrained="none",
        embed_dim=dim,
        logit_scale=10.0,
        logit_bias=bias,
        max_batch_size=8,
        item_status=True,
        served_model_name=name,
    )


@pytest.fixture()
def two_models(monkeypatch) -> FakeTriton:
    return FakeTriton().serve_models(_facts("small", 4), _facts("large", 16, -5.0)).install(monkeypatch)


def test_a_client_of_a_multi_model_server_must_name_its_model(two_models):
    with ClipClient("fake:8001") as client:
        assert set(client.served_models()) == {"small", "large"}
        with pytest.raises(ClipClientError, match=r"serves 2 models \('large', 'small'\): say which one") as info:
            client.embed_texts(["a"])
        assert "model=NAME" in info.value.hint and "--served-model" in info.value.hint
    with (
        ClipClient("fake:8001", model="medium") as client,
        pytest.raises(ClipClientError, match=r"model 'medium' is not served at fake:8001; it serves 'large', 'small'"),
    ):
        client.wait_until_ready(5)
        client.facts  # noqa: B018


def test_each_client_reaches_only_its_models_ensembles(two_models):
    for name, dim in (("small", 4), ("large", 16)):
        names = ModelNames.for_served(name)
        with ClipClient("fake:8001", model=name) as client:
            client.wait_until_ready(5)
            texts, images = client.embed_texts(["a cat"]), client.embed_images([b"\xff\xd8 not read here"])
            assert texts.shape == images.shape == (1, dim) and client.facts.scoring == (
                "softmax" if name == "small" else "sigmoid"
            )
        assert np.allclose(texts[0], fake_embedding(b"a cat", dim))
        assert set(two_models.called) == {names.text, names.image}
        two_models.called.clear()

        async def run(name=name):
            async with AsyncClipClient("fake:8001", model=name) as client:
                assert await client.is_ready()
                vectors, counts = await client.embed_texts_counted(["a cat"])
                return vectors, counts, (await client.get_facts()).embed_dim

        vectors, counts, got_dim = asyncio.run(run())
        assert got_dim == dim and np.allclose(vectors[0], fake_embedding(b"a cat", dim)) and counts is None
        assert set(two_models.called) == {names.text}
        two_models.called.clear()


def test_the_async_client_refuses_a_missing_model_name_too(two_models):
    async def run():
        async with AsyncClipClient("fake:8001") as client:
            assert set(await client.served_models()) == {"small", "large"}
            await client.embed_texts(["a"])

    with pytest.raises(ClipClientError, match="say which one"):
        asyncio.run(run())


def test_an_index_records_its_served_model_and_refuses_another(two_models, tmp_path):
    from clip_triton.client import EmbeddingIndex

    with ClipClient("fake:8001", model="small") as client:
        index = EmbeddingIndex.from_texts(client, ["a cat", "a dog"])
        index.save(tmp_path / "idx")
    assert json.loads((tmp_path / "idx.json").read_text())["served_model"] == "small"
    with ClipClient("fake:8001", model="large") as other:
        loaded = EmbeddingIndex.load(tmp_path / "idx", client=other)
        with pytest.raises(ClipTritonError, match="embedded by SMALL .*served as 'small'.*uses 'large'") as info:
            loaded.search("a cat")
        assert "--served-model small" in info.value.hint


# -- the tokenizer model counts -------------------------------------------------------------------------
def test_the_tokenizer_model_answers_each_texts_token_count(tmp_path):
    from clip_triton.export.adapter import contract_from_open_clip
    from clip_triton.tokenizer import ClipTokenizer

    from .fakes import front_models
    from .helpers import TINY_CONFIG

    contract = contract_from_open_clip(str(TINY_CONFIG), "none")
    tokenizer_model = front_models(contract, tmp_path)[C.TEXT_ENSEMBLE]
    texts = [b"a photo of a cat", b"", "Ünïcödé 🐱".encode(), b"word " * 200]
    answer = tokenizer_model.answer(texts)
    counts = answer.extras[C.TOKENS_OUTPUT].reshape(-1).tolist()
    bpe = ClipTokenizer(contract.tokenizer)
    expected = [int((bpe.ids(t.decode()) != contract.tokenizer.pad_token_id).sum()) if t else 0 for t in texts]
    assert counts == expected and counts[1] == 0 and counts[3] == contract.context_length  # cut at the context
    assert answer.statuses[1] and answer.extras[C.TOKENS_OUTPUT].dtype == np.int32


# -- the gateway ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def two_fake_worlds(tmp_path_factory):
    """Two fake served models with the tiny repository's front models: CLIP-like and SigLIP-like facts."""
    from .fakes import FakeClipClient, front_models, tiny_facts

    facts = tiny_facts()
    contract = C.ModelContract.from_json(facts.contract)
    models = front_models(contract, tmp_path_factory.mktemp("front"))
    small = facts.with_(served_model_name="small")
    large = facts.with_(served_model_name="large", embed_dim=48, logit_bias=-10.0)
    return lambda settings: FakeClipClient(small, models, others={"large": FakeClipClient(large, models)})


def test_the_gateway_lists_and_routes_every_served_model(two_fake_worlds, photos):
    import base64

    from fastapi.testclient import TestClient

    from clip_triton.gateway import GatewaySettings, create_app

    from .test_gateway import KEY

    app = create_app(GatewaySettings(api_keys=(KEY,)), two_fake_worlds)
    auth = {"Authorization": f"Bearer {KEY}"}
    with TestClient(app) as http:
        listed = http.get("/v1/models", headers=auth).json()["data"]
        assert [(m["id"], m["embed_dim"], m["scoring"]) for m in listed] == [
            ("large", 48, "sigmoid"),
            ("small", 32, "softmax"),
        ]
        for model, dim in (("small", 32), ("large", 48)):
            body = http.post("/v1/embeddings", headers=auth, json={"model": model, "input": ["a cat", "a dog"]}).json()
            assert body["model"] == model and len(body["data"][0]["embedding"]) == dim
            assert body["usage"]["prompt_tokens"] > 0  # counted by the server's tokenizer model, not here
        scored = http.post(
            "/v1/classify",
            headers=auth,
            json={
                "model": "large",
                "images": [f"data:image/jpeg;base64,{base64.b64encode(photos['rocket']).decode()}"],
                "prompts": ["a cat"],
            },
        ).json()
        assert scored["scoring"] == "sigmoid" and scored["model"] == "large"
        missing = http.post("/v1/embeddings", headers=auth, json={"model": "medium", "input": "a cat"})
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
        assert "'large', 'small'" in missing.json()["error"]["message"]
        metrics = http.get("/metrics").text
    assert 'clip_gateway_items_total{kind="text",model="small"} 2.0' in metrics
    assert 'clip_gateway_model_requests_total{endpoint="classify",model="large"} 1.0' in metrics
    assert "medium" not in metrics  # an unknown name never becomes a label


# -- integration: the real tritonserver serving two families ---------------------------------------------
@pytest.fixture(scope="module")
def two_model_server(tiny_export, tmp_path_factory):
    from clip_triton.export.weights import load_model
    from clip_triton.repository import RepoOptions, write_repository
    from clip_triton.server import TritonServer

    from .helpers import TINY_CONFIG

    siglip = export_for_tests(tmp_path_factory, "family-siglip2", config=SIGLIP_CONFIG, openvino_ir=True)
    repo = write_repository(
        tmp_path_factory.mktemp("multi") / "model_repository",
        options=RepoOptions(runtime="python", cpu_runtime="onnxruntime", preprocess_instances=1),
        exports=[(tiny_export, TINY), (siglip, SIGLIP)],
    )
    server = TritonServer(repo, log_file=tmp_path_factory.mktemp("multi-log") / "triton.log").start(timeout=240)
    try:
        references = {
            TINY: open_clip_reference_for(TINY_CONFIG, load_model(str(TINY_CONFIG), "none", seed=SEED).model),
            SIGLIP: open_clip_reference_for(SIGLIP_CONFIG, load_model(str(SIGLIP_CONFIG), "none", seed=SEED).model),
        }
        yield server, references
    finally:
        server.stop()


TEXTS = ["a photo of a cat", "a diagram", "Ünïcödé 🐱 日本語", "a long caption " * 40]
EXACT = {"min_cosine": C.TOLERANCES["fp32"]["min_cosine"], "max_abs_diff": C.TOLERANCES["fp32"]["max_abs_diff"]}


def _exact(got: np.ndarray, expected: np.ndarray, what: str) -> None:
    assert got.shape == expected.shape, what
    assert cos(got, expected).min() >= EXACT["min_cosine"], what
    assert np.abs(got - expected).max() <= EXACT["max_abs_diff"], what


@pytest.mark.integration
def test_two_families_from_one_server_are_each_exact_through_every_client(two_model_server, photos):
    import tritonclient.grpc as grpcclient

    server, references = two_model_server
    blobs = list(photos.values())[:3]
    with ClipClient(server.grpc_url) as client, pytest.raises(ClipClientError, match="say which one"):
        client.wait_until_ready(120)
        client.facts  # noqa: B018
    dims = {}
    for name, reference in references.items():
        names = ModelNames.for_served(name)
        expected_images, expected_texts = reference.images(blobs), reference.texts(TEXTS)
        with ClipClient(server.grpc_url, model=name) as client:
            client.wait_until_ready(120)
            _exact(client.embed_images(blobs), expected_images, f"{name} ClipClient images")
            _exact(client.embed_texts(TEXTS), expected_texts, f"{name} ClipClient texts")
            dims[name], scoring = client.facts.embed_dim, client.facts.scoring

        async def run(name=name):
            async with AsyncClipClient(server.grpc_url, model=name) as client:
                return await client.embed_images(blobs), await client.embed_texts_counted(TEXTS)

        images, (texts, counts) = asyncio.run(run())
        _exact(images, expected_images, f"{name} AsyncClipClient images")
        _exact(texts, expected_texts, f"{name} AsyncClipClient texts")
        assert counts is not None and (counts > 0).all()
        # a raw tritonclient asking for EMBEDDING alone, by the documented names
        raw = grpcclient.InferenceServerClient(server.grpc_url)
        try:
            tensor = grpcclient.InferInput(C.TEXT_INPUT, [len(TEXTS), 1], "BYTES")
            tensor.set_data_from_numpy(np.array([t.encode() for t in TEXTS], dtype=object).reshape(-1, 1))
            result = raw.infer(names.text, [tensor], outputs=[grpcclient.InferRequestedOutput(C.EMBEDDING_OUTPUT)])
            _exact(result.as_numpy(C.EMBEDDING_OUTPUT), expected_texts, f"{name} raw tritonclient")
        finally:
            raw.close()
        assert scoring == ("sigmoid" if name == SIGLIP else "softmax")
    assert dims[TINY] != dims[SIGLIP]
    # the liveness canary (clip-triton health, the compose healthcheck) goes through every served model
    from clip_triton.health import canary, served_names

    raw = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        assert sorted(n.slug for n in served_names(raw)) == sorted(ModelNames.for_served(n).slug for n in references)
    finally:
        raw.close()
    assert canary(server.grpc_url) == (True, "ok")


@pytest.mark.integration
def test_the_gateway_serves_both_with_the_openai_package_and_no_tokenizer_files(two_model_server, photos):
    """/v1/models lists both; /v1/embeddings routes by `model` (each exact, each its own size); usage
    counts with each model's own tokenizer on the server (SigLIP's answered 500 without files here);
    /v1/classify scores each its own way; an unknown model is 404 naming both."""
    import base64

    import httpx
    import openai

    from clip_triton.gateway import FetchPolicy, GatewaySettings
    from clip_triton.tokenizer import text_tokenizer

    from .test_gateway import KEY, LiveGateway

    server, references = two_model_server
    live = LiveGateway(GatewaySettings(triton_url=server.grpc_url, api_keys=(KEY,), fetch=FetchPolicy()))
    try:
        api = openai.OpenAI(base_url=f"{live.url}/v1", api_key=KEY)
        assert sorted(m.id for m in api.models.list().data) == sorted(references)
        url = "data:image/jpeg;base64," + base64.b64encode(photos["rocket"]).decode()
        prompts = ["a photo of a rocket", "a photo of a cat"]
        for name, reference in references.items():
            answer = api.embeddings.create(model=name, input=TEXTS, encoding_format="float")
            got = np.array([row.embedding for row in answer.data], dtype=np.float32)
            _exact(got, reference.texts(TEXTS), f"{name} gateway")
            repo_tokenizer = server.repo / ModelNames.for_served(name).front(C.TEXT) / "1"
            manifest = json.loads((server.repo / f"manifest__{ModelNames.for_served(name).slug}.json").read_text())
            tokenizer = text_tokenizer(C.ModelContract.from_dict(manifest["contract"]).tokenizer, repo_tokenizer)
            expected = sum(int((tokenizer.ids(t) != tokenizer.spec.pad_token_id).sum()) for t in TEXTS)
            assert answer.usage.prompt_tokens == expected, name
            body = httpx.post(
                f"{live.url}/v1/classify",
                headers={"Authorization": f"Bearer {KEY}"},
                json={"model": name, "images": [url], "prompts": prompts},
                timeout=120,
            ).json()
            logits = body["logit_scale"] * (reference.images([photos["rocket"]]) @ reference.texts(prompts).T)[0]
            scores = {s["prompt"]: s["probability"] for s in body["data"][0]["scores"]}
            if name == SIGLIP:
                assert body["scoring"] == "sigmoid"
                assert np.allclose(
                    [scores[p] for p in prompts], 1 / (1 + np.exp(-(logits + body["logit_bias"]))), atol=1e-4
                )
            else:
                assert body["scoring"] == "softmax" and sum(scores.values()) == pytest.approx(1.0, abs=1e-5)
        with pytest.raises(openai.NotFoundError, match="tiny-clip.*tiny-siglip2"):
            api.embeddings.create(model="medium", input="a cat")
    finally:
        live.stop()


@pytest.mark.integration  # exports two tiny models and serves them
def test_the_demo_shows_two_models_side_by_side(tmp_path):
    """`clip-triton demo --compare MODEL`: a tiny CLIP and a tiny SigLIP 2 from one repository and one
    tritonserver, every photo's prompts scored by each (softmax rows sum to 1; sigmoid ones need not)."""
    import sys

    from clip_triton import children

    from .helpers import TINY_CONFIG

    result = children.run(
        [sys.executable, "-m", "clip_triton.cli", "demo", "--model", str(TINY_CONFIG), "--compare", str(SIGLIP_CONFIG)],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "clip-triton-tiny: 32-d, softmax over the prompts" in out
    assert "clip-triton-tiny-siglip2: 768-d, a sigmoid per prompt" in out
    rows = [line.split() for line in out.splitlines() if line.strip().startswith("a photo of")]
    assert len(rows) == 4 * 5 and all(0 <= float(row[-2]) <= 1 and 0 <= float(row[-1]) <= 1 for row in rows)
    first = [float(row[-2]) for row in rows[:5]]
    assert abs(sum(first) - 1) < 1e-3  # the CLIP model's softmax over one photo's prompts
    assert "--served-model clip-triton-tiny-siglip2" in out
    repo = tmp_path / ".clip-triton" / "demo" / "compare" / "model_repository"
    assert (repo / "clip_image__clip-triton-tiny").is_dir() and (repo / "clip_text__clip-triton-tiny-siglip2").is_dir()


@pytest.mark.integration
def test_each_served_model_costs_its_own_memory_as_estimated(two_model_server):
    """What N models cost (docs/serving.md): every served model its own python stubs and its own copy
    of its weights, nothing shared, so the server's memory is the sum of each model's. The estimate
    `clip-triton repo` prints is read from the repository; the measured figure is each model's stubs'
    proportional set size, read from /proc (bench/multi_model.py prints both for one and two models)."""
    from clip_triton.footprint import estimate, measured

    server, _ = two_model_server
    costs = {cost.name: cost for cost in estimate(server.repo)}
    assert set(costs) == {ModelNames.for_served(TINY).slug, ModelNames.for_served(SIGLIP).slug}
    assert all(cost.stubs == 4 for cost in costs.values())  # preprocess, tokenizer, two python encoders
    memory = measured(server.process.pid)
    assert set(costs) <= set(memory), memory
    for name, cost in costs.items():
        assert 0.5 * cost.host_bytes <= memory[name] <= 1.6 * cost.host_bytes, (name, memory[name], cost.host_bytes)
    # the SigLIP tower's larger vocabulary and width cost more, on its own stubs alone
    assert memory[ModelNames.for_served(SIGLIP).slug] > 2 * memory[ModelNames.for_served(TINY).slug]


@pytest.mark.integration  # runs the compose services' shell scripts
@pytest.mark.parametrize(
    "models, exports, engines",
    [
        (
            None,
            [["--model=ViT-bigG-14", "--pretrained=laion2b_s39b_b160k", "--onnx-dir=/exports/current"]],
            ["--onnx-dir", "/exports/current", "--root", "/models"],
        ),
        (
            "bigG=ViT-bigG-14@laion2b_s39b_b160k b16=ViT-B-16@none",
            [
                ["--model=ViT-bigG-14", "--pretrained=laion2b_s39b_b160k", "--onnx-dir=/exports/bigG"],
                ["--model=ViT-B-16", "--pretrained=none", "--onnx-dir=/exports/b16"],
            ],
            [
                "--onnx-dir",
                "/exports/bigG",
                "--served-model-name",
                "bigG",
                "--onnx-dir",
                "/exports/b16",
                "--served-model-name",
                "b16",
                "--root",
                "/models",
            ],
        ),
    ],
)
def test_compose_stages_loop_over_the_list_of_models(tmp_path, models, exports, engines):
    """The export and engines services' own scripts (as compose hands them to the container: `$$` is
    `$`), with `clip-triton` stood in for by a recorder: CLIP_MODELS unset exports and builds the one
    model as before; set, each NAME=ARCH@PRETRAINED into /exports/NAME and one repository of them all."""
    import os
    import shlex
    import subprocess

    import yaml

    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    recorder = tmp_path / "bin" / "clip-triton"
    recorder.parent.mkdir()
    recorder.write_text(f'#!/bin/sh\nprintf "%s\\n" "$*" >> {tmp_path}/calls\n')
    recorder.chmod(0o755)
    env = {"PATH": f"{recorder.parent}:{os.environ['PATH']}"}
    service_env = {k: str(v) for k, v in compose["services"]["export"]["environment"].items()}
    env["CLIP_MODEL"], env["CLIP_PRETRAINED"] = "ViT-bigG-14", "laion2b_s39b_b160k"  # compose's defaults
    assert "${CLIP_MODEL:-ViT-bigG-14}" in service_env["CLIP_MODEL"] and "CLIP_MODELS" in service_env
    if models:
        env["CLIP_MODELS"] = models
    for service in ("export", "engines"):
        script = compose["services"][service]["command"][2].replace("$$", "$")
        subprocess.run(["sh", "-c", script], env=env, check=True, timeout=60)
    calls = [shlex.split(line) for line in (tmp_path / "calls").read_text().splitlines()]
    assert [call[0] for call in calls] == ["export"] * len(exports) + ["build-engines"]
    from clip_triton.cli import build_parser, check_combinations

    for call in calls:  # each call as the shell expanded it, through the real CLI's parser and rules
        parser = build_parser()
        check_combinations(parser, parser.parse_args(call))
    for call, expected in zip(calls, exports):
        assert [arg for arg in call if arg.split("=")[0] in ("--model", "--pretrained", "--onnx-dir")] == expected
        assert "--precision=fp16" in call and "--reuse" in call
    assert calls[-1][1 : len(engines) + 1] == engines


@pytest.mark.integration  # runs the export Job's shell script
@pytest.mark.parametrize("models", [None, "bigG=ViT-bigG-14@laion2b_s39b_b160k b16=ViT-B-16@none"])
def test_the_kubernetes_export_job_loops_over_the_list_of_models(tmp_path, models):
    """The export Job's script as the kubelet expands it ($(VAR) from the ConfigMap), clip-triton
    recorded: one model into /exports/TAG, or each of CLIP_MODELS into /exports/TAG/NAME, where the
    build Job looks for them (tests/test_kubernetes.py runs that one)."""
    import os
    import shlex
    import subprocess

    from clip_triton.cli import build_parser, check_combinations

    from .test_kubernetes import _container, by_kind_and_name

    docs = by_kind_and_name("base")
    data = docs[("ConfigMap", "clip-triton-engine")]["data"]
    script = _container(docs, "Job", "clip-triton-export")["args"][2]
    for key in ("ENGINE_TAG", "CLIP_MODEL", "CLIP_PRETRAINED"):
        script = script.replace(f"$({key})", data[key])
    recorder = tmp_path / "bin" / "clip-triton"
    recorder.parent.mkdir()
    recorder.write_text(f'#!/bin/sh\nprintf "%s\\n" "$*" >> {tmp_path}/calls\n')
    recorder.chmod(0o755)
    env = {"PATH": f"{recorder.parent}:{os.environ['PATH']}", "CLIP_MODELS": models or ""}
    subprocess.run(["sh", "-c", script], env=env, check=True, timeout=60)
    calls = [shlex.split(line) for line in (tmp_path / "calls").read_text().splitlines()]
    tag = data["ENGINE_TAG"]
    wanted = (
        [f"--onnx-dir=/exports/{tag}"]
        if not models
        else [f"--onnx-dir=/exports/{tag}/bigG", f"--onnx-dir=/exports/{tag}/b16"]
    )
    assert [next(a for a in call if a.startswith("--onnx-dir=")) for call in calls] == wanted
    for call in calls:
        parser = build_parser()
        check_combinations(parser, parser.parse_args(call))


def test_the_gateway_reads_the_served_models_again_for_a_name_it_does_not_know(two_fake_worlds, monkeypatch):
    """A model that finished loading after the gateway's first read is found when a request names it
    (read again at most every CATALOG_REFRESH_S); a name still unknown stays a 404."""
    from fastapi.testclient import TestClient

    from clip_triton.gateway import GatewaySettings, create_app
    from clip_triton.gateway import routes as routes_module

    from .test_gateway import KEY

    reads = []

    def factory(settings):
        client = two_fake_worlds(settings)
        full = client.others
        client.others = {}  # at first only "small" is ready

        async def served_models():
            reads.append(len(client.others))
            if len(reads) > 1:
                client.others = full  # "large" has loaded since
            return {client.facts.public_id: client.facts, **{n: o.facts for n, o in client.others.items()}}

        client.served_models = served_models
        return client

    auth = {"Authorization": f"Bearer {KEY}"}
    for refresh_s, expected in ((3600.0, 404), (0.0, 200)):
        reads.clear()
        monkeypatch.setattr(routes_module, "CATALOG_REFRESH_S", refresh_s)
        with TestClient(create_app(GatewaySettings(api_keys=(KEY,)), factory)) as http:
            assert [m["id"] for m in http.get("/v1/models", headers=auth).json()["data"]] == ["small"]
            answer = http.post("/v1/embeddings", headers=auth, json={"model": "large", "input": "a cat"})
            assert answer.status_code == expected, answer.text
        assert len(reads) == (1 if refresh_s else 2)


def test_perf_measures_the_named_served_models_ensembles(two_models, monkeypatch, capsys):
    """`clip-triton perf --served-model NAME` runs perf_analyzer on that model's own ensembles."""
    from clip_triton import cli, perf

    measured = []
    monkeypatch.setattr(perf, "perf_table", lambda url, models, **kwargs: measured.append(models) or "table")
    assert cli.main(["perf", "--url", "fake:8001", "--served-model", "large"]) == 0
    assert measured == [["clip_image__large", "clip_text__large"]] and "table" in capsys.readouterr().out
    assert cli.main(["perf", "--url", "fake:8001", "--served-model", "medium"]) == 2
    assert "it serves 'large', 'small'" in capsys.readouterr().err


def test_each_served_model_has_its_own_instance_groups(tmp_path):
    """instance_group is per Triton model, so per served model: each one's front models and encoders
    carry the counts the repository was written with (docs/multi-model.md)."""
    from clip_triton.repository import RepoOptions, parse, write_repository

    bigg, small = _contracts()
    options = RepoOptions(runtime="tensorrt", encoder_instances=2, preprocess_instances=3, tokenizer_instances=1)
    repo = write_repository(
        tmp_path / "r",
        options=options,
        exports=[(_fake_export(tmp_path / "a", bigg), "a"), (_fake_export(tmp_path / "b", small), "b")],
    )
    for served in ("a", "b"):
        names = ModelNames.for_served(served)
        counts = {
            model: sum(g.count for g in parse((repo / model / "config.pbtxt").read_text()).instance_group)
            for model in (names.encoder(C.VISION), names.encoder(C.TEXT), names.front(C.VISION), names.front(C.TEXT))
        }
        assert list(counts.values()) == [2, 2, 3, 1], counts


def test_arch_tag_aliases_follow_one_rule_for_clients_and_gateway():
    """``ARCH/TAG`` names a model served without a name of its own, when exactly one answers to it: the
    clients (choose_model) and the gateway resolve it with the same function (facts.resolve_alias)."""
    from clip_triton.client import core as K
    from clip_triton.facts import resolve_alias

    def facts(model, pretrained="laion2b", name=""):
        return ServerFacts(model=model, pretrained=pretrained, embed_dim=8, logit_scale=100.0, served_model_name=name)

    unnamed, named = facts("ViT-B-32"), facts("ViT-L-14", name="search")
    served = {"ViT-B-32": unnamed, "search": named}
    assert resolve_alias("ViT-B-32/laion2b", served) == "ViT-B-32"
    assert resolve_alias("ViT-L-14/laion2b", served) is None  # served under its own name only
    assert resolve_alias("ViT-B-32/other", served) is None
    private = facts("ViT-B-32", pretrained="/models/ckpt.pt")
    assert resolve_alias("ViT-B-32/local checkpoint", {"ViT-B-32": private}) == "ViT-B-32"  # never the path
    twins = {"a": unnamed, "b": facts("ViT-B-32")}
    assert resolve_alias("ViT-B-32/laion2b", twins) is None  # ambiguous: refused, never a silent pick
    models = {name: K.ServedModel(C.ModelNames.for_served(name), f) for name, f in served.items()}
    assert K.choose_model(models, "ViT-B-32/laion2b", "t").facts is unnamed
    with pytest.raises(ClipTritonError, match="is not served"):
        K.choose_model(models, "ViT-L-14/laion2b", "t")
