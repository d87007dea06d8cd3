"""Issue 25 (open): one server, every kind of client, with the response cache on.

Triton's response cache keys a request on the model and its input tensors, not on the outputs it asks
for (core cache_manager.cc), and an ensemble's response holds only the requested outputs. Cached at the
ensemble (what `clip-triton repo` writes), one raw request for EMBEDDING alone leaves an entry without
STATUS that later requests for that input get. The tests of that defect are strict xfails: they fail
today, as they must, and a fix turns them into passes that the marker then refuses (remove it then).
Caching the composing models instead was tried and rejected (clip_triton/repository.py
``cached_ensembles``: Triton caches their error responses as empty successes). What holds today: a
client that gets an answer without an output it asked for says so clearly (last tests here).
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


OPEN = pytest.mark.xfail(
    strict=True,
    reason="issue 25 open: the response cache sits at the ensemble and ignores which outputs a request names",
)


def fresh(n: int = 1) -> list[str]:
    return [f"a photo of a cache probe {uuid.uuid4().hex[:12]}" for _ in range(n)]


@OPEN
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


@OPEN
def test_a_raw_request_for_status_alone_does_not_poison_the_embedding(triton, open_clip_reference):
    texts = fresh(1)
    status = raw_http(triton.http_url, texts, [C.STATUS_OUTPUT])
    assert status.as_numpy(C.EMBEDDING_OUTPUT) is None
    embedding = raw_grpc(triton.grpc_url, texts, [C.EMBEDDING_OUTPUT]).as_numpy(C.EMBEDDING_OUTPUT)
    assert embedding is not None and cos(embedding, open_clip_reference.texts(texts)).min() >= PARITY
    default = raw_http(triton.http_url, texts, None)  # no outputs named: all of them
    assert default.as_numpy(C.EMBEDDING_OUTPUT) is not None and default.as_numpy(C.STATUS_OUTPUT) is not None


@OPEN
def test_every_client_gets_its_own_answer_interleaved_with_the_cache_on(triton, open_clip_reference, grpc):
    """Raw gRPC and HTTP (each output subset), ClipClient and AsyncClipClient on the same texts, in
    turns: every answer equals the solo one, and repeats are still answered from the cache."""
    texts = fresh(3)
    expected = open_clip_reference.texts(texts)
    headers = triton.grpc_admin_headers

    def hits() -> int:
        stats = grpc.get_inference_statistics(C.TOKENIZER_MODEL, headers=headers, as_json=True)["model_stats"][0]
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


@OPEN
@pytest.mark.parametrize("setting", ["text", "all"])
def test_the_cache_never_sits_where_a_subset_of_outputs_could_be_stored(setting):
    """Every cached model is one whose requests always ask for all its outputs: a composing model
    (the ensemble maps every output it has), never an ensemble that a raw client calls."""
    from clip_triton.repository import RepoOptions, ServingFacts, build_configs

    for runtime in ("python", "openvino", "onnxruntime", "tensorrt"):
        options = RepoOptions(
            runtime=runtime, response_cache=setting, cpu_precision="bf16" if runtime == "openvino" else "fp32"
        )
        configs = build_configs(ServingFacts.default(), options)
        for name, config in configs.items():
            if not config.response_cache.enable:
                continue
            assert config.platform != "ensemble", f"{runtime}: {name} caches top-level requests"
            mapped = {
                key
                for ens in configs.values()
                if ens.platform == "ensemble"
                for step in ens.ensemble_scheduling.step
                if step.model_name == name
                for key in step.output_map
            }
            assert mapped == {out.name for out in config.output}, f"{runtime}: {name} has unmapped outputs"


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
    from clip_triton.client.grpc_client import ClipClientError, split_result
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


@OPEN
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
