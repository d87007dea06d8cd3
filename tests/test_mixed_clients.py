"""Issue 25: one server, every kind of client, with the response cache on.

Triton's response cache keys a request on the model and its input tensors, not on the outputs it asks
for (core cache_manager.cc), and an ensemble's response holds only the requested outputs. Cached at the
public ensemble (the layout before), one raw request for EMBEDDING alone left an entry without STATUS
that every later request for that input got. Now the cache sits at an inner ensemble that the public
one reaches through a step naming both outputs (clip_triton/repository.py ``cached_towers``), so no
client can store a partial entry. And a refused item's EMBEDDING row is NaN, so a client that reads
EMBEDDING alone cannot take it for an embedding.
"""

from __future__ import annotations

import asyncio
import uuid

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

from clip_triton import contract as C
from clip_triton.client import AsyncClipClient, ClipClient

from .helpers import cos, settled

PARITY = 0.9999  # fp32 served path vs open_clip in-process (as in test_serving.py)


def _texts_input(module, texts: list[str]):
    tensor = module.InferInput(C.TEXT_INPUT, [len(texts), 1], "BYTES")
    tensor.set_data_from_numpy(np.array([t.encode() for t in texts], dtype=object).reshape(-1, 1))
    return tensor


def raw(module, url: str, texts: list[str], outputs: list[str] | None):
    """A raw tritonclient request to clip_text (module: tritonclient.grpc or .http), naming ``outputs``."""
    client = module.InferenceServerClient(url)
    try:
        requested = None if outputs is None else [module.InferRequestedOutput(name) for name in outputs]
        return client.infer(C.TEXT_ENSEMBLE, [_texts_input(module, texts)], outputs=requested)
    finally:
        client.close()


def raw_grpc(url: str, texts: list[str], outputs: list[str] | None):
    return raw(grpcclient, url, texts, outputs)


def raw_http(url: str, texts: list[str], outputs: list[str] | None):
    return raw(httpclient, url, texts, outputs)


def fresh(n: int = 1) -> list[str]:
    return [f"a photo of a cache probe {uuid.uuid4().hex[:12]}" for _ in range(n)]


def test_a_raw_request_for_the_embedding_alone_does_not_poison_clip_client(triton, open_clip_reference):
    texts = fresh(2)
    only = raw_grpc(triton.grpc_url, texts, [C.EMBEDDING_OUTPUT])
    assert only.as_numpy(C.STATUS_OUTPUT) is None  # it asked for one output and got one
    with ClipClient(triton.grpc_url) as client:
        served = client.embed_texts(texts)  # crashed with AttributeError ('NoneType' ... 'reshape')
    assert cos(served, open_clip_reference.texts(texts)).min() >= PARITY
    both = raw_grpc(triton.grpc_url, texts, [C.EMBEDDING_OUTPUT, C.STATUS_OUTPUT])
    assert both.as_numpy(C.STATUS_OUTPUT) is not None
    assert [s for s in both.as_numpy(C.STATUS_OUTPUT).reshape(-1)] == [b"", b""]


def test_a_raw_request_for_status_alone_does_not_poison_the_embedding(triton, open_clip_reference):
    texts = fresh(1)
    status = raw_http(triton.http_url, texts, [C.STATUS_OUTPUT])
    assert status.as_numpy(C.EMBEDDING_OUTPUT) is None
    embedding = raw_grpc(triton.grpc_url, texts, [C.EMBEDDING_OUTPUT]).as_numpy(C.EMBEDDING_OUTPUT)
    assert embedding is not None and cos(embedding, open_clip_reference.texts(texts)).min() >= PARITY
    default = raw_http(triton.http_url, texts, None)  # no outputs named: all of them
    assert default.as_numpy(C.EMBEDDING_OUTPUT) is not None and default.as_numpy(C.STATUS_OUTPUT) is not None


def test_every_client_gets_its_own_answer_interleaved_with_the_cache_on(triton, open_clip_reference, grpc):
    """Raw gRPC and HTTP (each output subset), ClipClient and AsyncClipClient on the same texts, in
    turns: every answer equals the solo one, and repeats are still answered from the cache."""
    texts = fresh(3)
    expected = open_clip_reference.texts(texts)
    headers = triton.grpc_admin_headers

    def hits() -> int:
        stats = grpc.get_inference_statistics(C.TEXT_CACHED, headers=headers, as_json=True)["model_stats"][0]
        return int(stats["inference_stats"].get("cache_hit", {}).get("count", 0))

    before = settled(hits)
    subsets = [[C.EMBEDDING_OUTPUT], [C.STATUS_OUTPUT], None, [C.EMBEDDING_OUTPUT, C.STATUS_OUTPUT]]
    answers = 0
    for turn, outputs in enumerate(subsets * 2):
        result = (raw_grpc if turn % 2 else raw_http)(triton.grpc_url if turn % 2 else triton.http_url, texts, outputs)
        for name in outputs or [C.EMBEDDING_OUTPUT, C.STATUS_OUTPUT]:
            assert result.as_numpy(name) is not None, f"turn {turn}: {name} missing for outputs={outputs}"
        if outputs is None or C.EMBEDDING_OUTPUT in outputs:
            assert cos(result.as_numpy(C.EMBEDDING_OUTPUT), expected).min() >= PARITY
        with ClipClient(triton.grpc_url) as client:
            assert cos(client.embed_texts(texts), expected).min() >= PARITY

        async def run_async():
            async with AsyncClipClient(triton.grpc_url) as aclient:
                return await aclient.embed_texts(texts)

        assert cos(asyncio.run(run_async()), expected).min() >= PARITY
        answers += 3
    assert settled(hits, before + answers - 1) >= before + answers - 1  # all but the first were hits


@pytest.mark.parametrize("setting", ["text", "all"])
def test_the_cache_sits_only_where_every_request_names_every_output(setting):
    """Every cached model, on every runtime, is an ensemble that only a public ensemble's step reaches,
    and that step maps all of its outputs; no public ensemble, no dynamic-batched model caches."""
    from clip_triton.repository import ExportFacts, RepoOptions, build_configs

    public = {tower.ensemble for tower in C.TOWERS}
    for runtime in ("python", "openvino", "onnxruntime", "tensorrt"):
        options = RepoOptions(
            runtime=runtime, response_cache=setting, cpu_precision="bf16" if runtime == "openvino" else "fp32"
        )
        configs = build_configs(ExportFacts.default(), options)
        cached = [name for name, config in configs.items() if config.response_cache.enable]
        assert cached and not public & set(cached), f"{runtime}: {cached}"
        for name in cached:
            config = configs[name]
            assert config.platform == "ensemble", f"{runtime}: {name} is not an ensemble (errors would be cached)"
            callers = [
                (ens.name, step)
                for ens in configs.values()
                for step in ens.ensemble_scheduling.step
                if step.model_name == name
            ]
            assert [caller for caller, _ in callers] == [name.removesuffix("_cached")], f"{runtime}: {name}"
            assert set(callers[0][1].output_map) == {out.name for out in config.output}, f"{runtime}: {name}"


def _images_input(module, items: list[bytes]):
    tensor = module.InferInput(C.IMAGE_INPUT, [len(items), 1], "BYTES")
    tensor.set_data_from_numpy(np.array(items, dtype=object).reshape(-1, 1))
    return tensor


@pytest.mark.parametrize("module", [grpcclient, httpclient], ids=["grpc", "http"])
def test_a_refused_image_is_a_nan_row_for_a_client_that_reads_only_the_embedding(
    triton, photos, module, open_clip_reference
):
    """Issue 25's second scenario: a bad item between two JPEGs, asked for EMBEDDING alone."""
    url = triton.grpc_url if module is grpcclient else triton.http_url
    items = [photos["coffee"], b"not an image at all", photos["cat"]]
    with module.InferenceServerClient(url) as client:
        result = client.infer(
            C.IMAGE_ENSEMBLE, [_images_input(module, items)], outputs=[module.InferRequestedOutput(C.EMBEDDING_OUTPUT)]
        )
    rows = result.as_numpy(C.EMBEDDING_OUTPUT)
    assert rows.shape[0] == 3 and result.as_numpy(C.STATUS_OUTPUT) is None
    assert np.isnan(rows[1]).all() and not np.isnan(rows[[0, 2]]).any()
    assert cos(rows[[0, 2]], open_clip_reference.images([photos["coffee"], photos["cat"]])).min() >= PARITY
    assert np.isnan(rows @ rows[0]).tolist() == [False, True, False]  # no similarity can use it silently


@pytest.mark.parametrize("module", [grpcclient, httpclient], ids=["grpc", "http"])
def test_a_refused_text_is_a_nan_row_for_a_client_that_reads_only_the_embedding(triton, module, open_clip_reference):
    texts = fresh(2)
    url = triton.grpc_url if module is grpcclient else triton.http_url
    tensor = module.InferInput(C.TEXT_INPUT, [3, 1], "BYTES")
    tensor.set_data_from_numpy(
        np.array([texts[0].encode(), b"\xff\xfe", texts[1].encode()], dtype=object).reshape(-1, 1)
    )
    with module.InferenceServerClient(url) as client:
        result = client.infer(C.TEXT_ENSEMBLE, [tensor], outputs=[module.InferRequestedOutput(C.EMBEDDING_OUTPUT)])
    rows = result.as_numpy(C.EMBEDDING_OUTPUT)
    assert np.isnan(rows[1]).all() and not np.isnan(rows[[0, 2]]).any()
    assert cos(rows[[0, 2]], open_clip_reference.texts(texts)).min() >= PARITY
    described = raw_config(url, module)["parameters"][f"output_{C.EMBEDDING_OUTPUT}"]["string_value"]
    assert "NaN" in described and "STATUS" in described  # the config tells raw users what a refused row is


def raw_config(url: str, module) -> dict:
    with module.InferenceServerClient(url) as client:
        config = client.get_model_config(C.TEXT_ENSEMBLE, **({"as_json": True} if module is grpcclient else {}))
    return config.get("config", config)


class _Answer:
    """A Triton result as tritonclient hands it over: ``as_numpy`` is None for an output not in it."""

    def __init__(self, **outputs):
        self.outputs = outputs

    def as_numpy(self, name):
        return self.outputs.get(name)


@pytest.mark.parametrize("missing", [C.STATUS_OUTPUT, C.EMBEDDING_OUTPUT])
def test_an_answer_without_an_output_the_client_asked_for_is_a_clear_error(missing):
    """What a server with the old layout (the ensemble cached) could hand any client: refused with what
    happened and what to do, never an AttributeError or rows read as data."""
    from clip_triton.client import ClipClientError
    from clip_triton.client.core import split_result
    from clip_triton.facts import ServerFacts

    facts = ServerFacts(model="m", pretrained="p", embed_dim=2, logit_scale=1.0, item_status=True)
    outputs = {C.EMBEDDING_OUTPUT: np.ones((2, 2), np.float32), C.STATUS_OUTPUT: np.array([[b""], [b"bad"]])}
    del outputs[missing]
    with pytest.raises(ClipClientError, match=f"without its {missing} output") as caught:
        split_result(_Answer(**outputs), facts)
    assert "clip-triton repo" in caught.value.hint
    # a server without per-item status (item_status False) is answered from EMBEDDING alone
    old = ServerFacts(model="m", pretrained="p", embed_dim=2, logit_scale=1.0)
    if missing == C.STATUS_OUTPUT:
        rows, failed = split_result(_Answer(**outputs), old)
        assert rows.shape == (2, 2) and failed == {}
    complete = {C.EMBEDDING_OUTPUT: np.ones((2, 2), np.float32), C.STATUS_OUTPUT: np.array([[b""], [b"bad"]])}
    rows, failed = split_result(_Answer(**complete), facts)
    assert list(failed) == [1]


LOAD_SECONDS = 60.0  # issue 25's figure; the bound on each request is the clients' own


def test_a_mixed_client_load_with_the_cache_on_has_no_errors_and_no_mismatches(triton, open_clip_reference):
    """32 threads for 60 s: raw gRPC and HTTP asking for random output subsets, ClipClient, and the
    gateway through the official `openai` package, over a few texts (so the cache hits) and fresh ones
    (so it misses), perf_analyzer beside them. Every answer equals the solo answer of its texts."""
    import random
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    import openai

    from clip_triton.gateway import FetchPolicy, GatewaySettings
    from clip_triton.perf import run_perf_analyzer

    from .test_gateway import KEY, LiveGateway, StubResolver

    shared = fresh(6)
    solo = {t: open_clip_reference.texts([t])[0] for t in shared}
    gateway = LiveGateway(
        GatewaySettings(triton_url=triton.grpc_url, api_keys=(KEY,), fetch=FetchPolicy(resolver=StubResolver()))
    )
    errors: list[str] = []
    counts: dict[str, int] = {}
    lock = threading.Lock()
    stop_at = time.monotonic() + LOAD_SECONDS

    def check(kind: str, texts: list[str], rows) -> None:
        expected = np.stack([solo[t] if t in solo else open_clip_reference.texts([t])[0] for t in texts])
        if rows is None or len(rows) != len(texts) or cos(np.asarray(rows), expected).min() < PARITY:
            raise AssertionError(f"{kind}: answer differs from the solo answer for {texts}")

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        oai = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=KEY, max_retries=0)
        kinds = ["grpc", "http", "clip", "gateway"]
        while time.monotonic() < stop_at and not errors:
            kind = kinds[(seed + rng.randrange(4)) % 4]
            texts = rng.sample(shared, rng.randint(1, 3)) + (fresh(1) if rng.random() < 0.2 else [])
            try:
                if kind in ("grpc", "http"):
                    outputs = rng.choice([[C.EMBEDDING_OUTPUT], [C.STATUS_OUTPUT], None])
                    url = triton.grpc_url if kind == "grpc" else triton.http_url
                    result = (raw_grpc if kind == "grpc" else raw_http)(url, texts, outputs)
                    for name in outputs or [C.EMBEDDING_OUTPUT, C.STATUS_OUTPUT]:
                        assert result.as_numpy(name) is not None, f"{kind}: {name} missing (asked {outputs})"
                    if outputs is None or C.EMBEDDING_OUTPUT in outputs:
                        check(kind, texts, result.as_numpy(C.EMBEDDING_OUTPUT))
                elif kind == "clip":
                    with ClipClient(triton.grpc_url, prompt_cache_entries=0) as client:
                        check(kind, texts, client.embed_texts(texts))
                else:
                    answer = oai.embeddings.create(model="clip-triton-tiny", input=texts, encoding_format="float")
                    check(kind, texts, [row.embedding for row in answer.data])
                with lock:
                    counts[kind] = counts.get(kind, 0) + 1
            except Exception as exc:  # noqa: BLE001 (every failure is collected and reported)
                with lock:
                    errors.append(f"{kind}: {type(exc).__name__}: {exc}")
                return  # one error decides the test: the load stops (the others follow at their next turn)

    try:
        with ThreadPoolExecutor(32) as pool:
            futures = [pool.submit(worker, seed) for seed in range(31)]
            while time.monotonic() < stop_at - 5 and not errors:  # the 32nd: perf_analyzer, repeatedly
                run_perf_analyzer(triton.grpc_url, C.TEXT_ENSEMBLE, concurrency=2, measurement_ms=1000)
            for future in futures:
                future.result()
    finally:
        gateway.stop()
    assert not errors, f"{len(errors)} errors, e.g. {errors[:5]}"
    assert all(counts.get(kind, 0) >= 5 for kind in ("grpc", "http", "clip", "gateway")), counts
