"""The clients' logic in-process, against a scripted Triton at tritonclient's InferenceServerClient
(tests/fakes.py FakeTriton): batching, order, retries, splitting, deadlines, what a failed job keeps.
What only a real tritonserver shows (restarts, parity, the STATUS contract on the wire) is in
test_restart.py, test_client.py and test_serving.py."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from clip_triton.client import AsyncClipClient, ClipClient, DeadlineExceeded, ItemErrors, JobFailed, ServerUnavailable
from clip_triton.client import core as K

from .fakes import FakeTriton, fake_embedding, status_error


@pytest.fixture()
def fake_triton(monkeypatch) -> FakeTriton:
    return FakeTriton(embed_dim=8, max_batch_size=4).install(monkeypatch)


def expected(texts) -> np.ndarray:
    return np.stack([fake_embedding(t.encode(), 8) for t in texts])


def test_rows_come_back_in_input_order_across_batches_and_threads(fake_triton):
    texts = [f"caption {i}" for i in range(23)]
    with ClipClient("fake:1", concurrency=4) as client:
        rows = client.embed_texts(texts)
    assert np.array_equal(rows, expected(texts))
    assert sorted(len(r) for r in fake_triton.requests) == [3, 4, 4, 4, 4, 4]  # the server's max_batch_size
    assert sorted(item for r in fake_triton.requests for item in r) == sorted(t.encode() for t in texts)


def test_a_smaller_batch_size_is_honoured_and_a_larger_one_capped(fake_triton):
    with ClipClient("fake:1", batch_size=2) as client:
        client.embed_texts(["a", "b", "c"])
    with ClipClient("fake:1", batch_size=64) as client:
        client.embed_texts([str(i) for i in range(9)])
    assert [len(r) for r in fake_triton.requests[:2]] == [2, 1] and max(len(r) for r in fake_triton.requests[2:]) == 4


@pytest.mark.parametrize(
    "failure",
    [
        status_error("UNAVAILABLE", "failed to connect to all addresses"),
        status_error("RESOURCE_EXHAUSTED", "queue full"),
        status_error("NOT_FOUND", f"Request for unknown model: 'clip_text' {K.LOADING}"),
        status_error("INTERNAL", f"Stub process 'tokenizer_0_0' {K.STUB_DOWN}"),
    ],
    ids=["unavailable", "overloaded", "loading", "stub down"],
)
def test_transient_failures_are_retried_and_nothing_is_lost(fake_triton, failure):
    fake_triton.failures = [failure, failure]
    with ClipClient("fake:1", backoff=0.001) as client:
        rows = client.embed_texts(["a", "b"])
    assert np.array_equal(rows, expected(["a", "b"])) and len(fake_triton.requests) == 3


def test_other_failures_are_not_retried(fake_triton):
    fake_triton.failures = [status_error("INTERNAL", "a bug")]
    with ClipClient("fake:1", backoff=0.001) as client, pytest.raises(JobFailed) as failed:
        client.embed_texts(["a"])
    assert len(fake_triton.requests) == 1 and "a bug" in str(failed.value)


def test_a_job_that_fails_keeps_every_answered_row(fake_triton):
    """The server goes away for good mid-job: JobFailed carries every row answered before it, and the
    hint says what to check."""
    texts = [f"caption {i} of a job that dies" for i in range(12)]
    with ClipClient("fake:1", batch_size=3, concurrency=1, retry_seconds=0.3, backoff=0.01) as client:
        original = fake_triton.infer

        def lose_the_server_after_three(*args):
            if len(fake_triton.requests) == 3:
                fake_triton.failures, fake_triton.forever = [status_error("UNAVAILABLE", "connection refused")], True
            return original(*args)

        fake_triton.infer = lose_the_server_after_three
        with pytest.raises(JobFailed) as failed:
            client.embed_texts(texts)
    failure = failed.value
    assert failure.answered == list(range(9)) and isinstance(failure.cause, ServerUnavailable)
    assert "is the server up?" in failure.hint
    assert np.array_equal(failure.embeddings[:9], expected(texts[:9])) and np.isnan(failure.embeddings[9:]).all()


def test_bad_items_are_flagged_by_status_in_one_round_trip(fake_triton):
    fake_triton.bad = {b"": "empty text"}
    with ClipClient("fake:1") as client, pytest.raises(ItemErrors) as err:
        client.embed_texts(["a", "", "b"])
    assert err.value.errors == {1: "empty text"} and len(fake_triton.requests) == 1
    assert np.isnan(err.value.embeddings[1]).all() and np.array_equal(
        err.value.embeddings[[0, 2]], expected(["a", "b"])
    )


def test_without_status_a_refused_batch_is_split_to_find_the_bad_item(monkeypatch):
    fake_triton = FakeTriton(embed_dim=8, max_batch_size=4, item_status=False).install(monkeypatch)
    fake_triton.bad = {b"": "empty text"}
    with ClipClient("fake:1") as client, pytest.raises(ItemErrors) as err:
        client.embed_texts(["a", "", "b"])
    assert err.value.errors == {1: "empty text"}
    assert [len(r) for r in fake_triton.requests] == [3, 1, 1, 1]  # the batch, then each item alone
    assert np.array_equal(err.value.embeddings[[0, 2]], expected(["a", "b"]))


def test_items_the_client_cannot_read_fail_alone(fake_triton, tmp_path):
    image = tmp_path / "ok.png"
    image.write_bytes(b"\x89PNG fake")
    with ClipClient("fake:1") as client, pytest.raises(ItemErrors) as err:
        client.embed_images([str(image), str(tmp_path / "missing.png"), 42])
    assert set(err.value.errors) == {1, 2} and "No such file" in err.value.errors[1]
    assert "unsupported image item" in err.value.errors[2] and fake_triton.requests == [[b"\x89PNG fake"]]


def test_a_missed_deadline_names_its_figures_and_the_flags(fake_triton):
    fake_triton.failures = [status_error("DEADLINE_EXCEEDED", "Deadline Exceeded")]
    with ClipClient("fake:1", timeout=0.5) as client, pytest.raises(JobFailed) as failed:
        client.embed_texts(["a", "b"])
    assert isinstance(failed.value.cause, DeadlineExceeded)
    assert "missed its 0.5 s deadline (--timeout)" in str(failed.value) and "--timeout" in failed.value.hint


def test_an_answer_without_a_requested_output_is_an_error_not_data(fake_triton):

    original = fake_triton.infer
    fake_triton.infer = lambda model, inputs, outputs=None: original(model, inputs, outputs[:1])  # EMBEDDING only
    with ClipClient("fake:1") as client, pytest.raises(JobFailed, match="without its STATUS output"):
        client.embed_texts(["a"])


def test_retry_budget_is_time_and_count(monkeypatch):
    now = [0.0]
    monkeypatch.setattr(K.time, "monotonic", lambda: now[0])
    unavailable = status_error("UNAVAILABLE")
    assert K.should_retry(unavailable, 0, 3, deadline=10.0)
    assert not K.should_retry(unavailable, 3, 3, deadline=10.0)  # out of attempts
    now[0] = 10.0
    assert not K.should_retry(unavailable, 0, 3, deadline=10.0)  # out of time
    assert not K.should_retry(status_error("INVALID_ARGUMENT"), 0, 3, deadline=99.0)
    delays = [K.retry_delay(attempt, 0.5) for attempt in range(12)]
    assert all(d <= K.MAX_BACKOFF_S * 1.5 for d in delays) and delays[0] < delays[3]


def test_plan_batches_keeps_client_side_failures_out_of_requests():
    out, errors, batches = K.plan_batches([b"a", ValueError("bad"), b"c", b"d"], 4, 2)
    assert out.shape == (4, 4) and np.isnan(out).all()
    assert errors == {1: "bad"} and batches == [[0, 2], [3]]


def test_async_client_matches_the_sync_client(fake_triton):
    texts = [f"caption {i}" for i in range(10)]
    fake_triton.bad = {b"": "empty text"}

    async def run():
        async with AsyncClipClient("fake:1", concurrency=3) as client:
            rows = await client.embed_texts(texts)
            try:
                await client.embed_texts(["a", ""])
            except ItemErrors as err:
                return rows, err
        raise AssertionError("no ItemErrors")

    rows, err = asyncio.run(run())
    assert np.array_equal(rows, expected(texts)) and err.errors == {1: "empty text"}


def test_classify_ranks_with_the_servers_scoring(fake_triton):
    with ClipClient("fake:1") as client:
        ranked = client.classify([b"img"], ["a", "b", "c"])
        facts = client.facts
    assert facts.model == "fake-clip" and facts.scoring == "softmax"
    scores = {row["prompt"]: row for row in ranked[0]}
    image = fake_embedding(b"img", 8)
    assert scores["a"]["cosine"] == pytest.approx(float(image @ fake_embedding(b"a", 8)), abs=1e-6)
    assert sum(row["probability"] for row in ranked[0]) == pytest.approx(1.0)


# -- length-aware batching (issue 33) ----------------------------------------------------------------
SHORT = [f"a photo of a {w}" for w in ("cat", "dog", "car", "boat", "tree", "bird")]  # <= 8 tokens with SOT/EOT
LONG = [
    "a long caption about " + " ".join(f"word{i}" for i in range(n)) for n in (12, 30)
]  # past 16 and past 32 tokens


@pytest.fixture()
def bucketed_triton(monkeypatch) -> FakeTriton:
    """A scripted Triton whose served contract has text buckets 8/16/32 of 77 (the tiny model's)."""
    from .fakes import tiny_facts

    triton = FakeTriton(embed_dim=8, max_batch_size=16)
    triton.facts = triton.facts.with_(contract=tiny_facts().contract)
    return triton.install(monkeypatch)


def buckets_of(texts) -> set[int]:
    from clip_triton.contract import ModelContract
    from clip_triton.tokenizer import ClipTokenizer

    from .fakes import tiny_facts

    spec = ModelContract.from_json(tiny_facts().contract).tokenizer
    tok = ClipTokenizer(spec)
    return {spec.bucket(min(len(tok.encode(t, limit=76)) + 2, 77)) for t in texts}


def test_texts_go_in_requests_of_one_length_bucket_and_come_back_in_order(bucketed_triton):
    texts = [SHORT[0], LONG[1], SHORT[1], SHORT[2], LONG[0], SHORT[3], SHORT[4], SHORT[5]]
    with ClipClient("fake:1") as client:
        rows = client.embed_texts(texts)
    assert np.array_equal(rows, expected(texts))
    sent = [[item.decode() for item in request] for request in bucketed_triton.requests]
    assert all(len(buckets_of(request)) == 1 for request in sent), sent
    assert sorted(len(r) for r in sent) == [1, 1, 6] and len(buckets_of(texts)) == 3

    async def run():
        async with AsyncClipClient("fake:1") as aclient:
            return await aclient.embed_texts(texts)

    before = len(bucketed_triton.requests)
    assert np.array_equal(asyncio.run(run()), rows)
    assert all(len(buckets_of([i.decode() for i in r])) == 1 for r in bucketed_triton.requests[before:])


def test_a_list_of_one_bucket_goes_out_exactly_as_a_raw_client_sends_it(bucketed_triton):
    """Inside a bucket the input order is kept: a request is then the raw client's own request (the
    same response-cache entry for every client kind), whatever the texts' lengths within the bucket."""
    texts = ["a photo of a small red car on a street", "a photo of a dog at the beach", "a bird in a tree on a hill"]
    assert len(buckets_of(texts)) == 1
    with ClipClient("fake:1") as client:
        client.embed_texts(texts)
    assert [[i.decode() for i in r] for r in bucketed_triton.requests] == [texts]


def test_refused_items_keep_their_input_index_through_the_reordering(bucketed_triton):
    bucketed_triton.bad = {b"a photo of a dog": "refused for the test"}
    texts = [LONG[1], SHORT[1], SHORT[0], 42, LONG[0]]
    with ClipClient("fake:1") as client, pytest.raises(ItemErrors) as err:
        client.embed_texts(texts)
    assert set(err.value.errors) == {1, 3} and "refused for the test" in err.value.errors[1]
    good = [0, 2, 4]
    assert np.array_equal(err.value.embeddings[good], expected([texts[i] for i in good]))


def test_grouping_can_be_turned_off_and_a_static_graph_is_not_grouped(bucketed_triton):
    texts = [LONG[1], SHORT[0], LONG[0], SHORT[1]]
    with ClipClient("fake:1", group_by_length=False) as client:
        client.embed_texts(texts)
    assert [[i.decode() for i in r] for r in bucketed_triton.requests] == [texts]
    bucketed_triton.requests.clear()
    bucketed_triton.facts = bucketed_triton.facts.with_(contract="")  # no buckets: every text takes 77
    with ClipClient("fake:1") as client:
        client.embed_texts(texts)
    assert [[i.decode() for i in r] for r in bucketed_triton.requests] == [texts]


def test_a_server_that_splits_by_length_gets_texts_in_input_order(bucketed_triton):
    """Where the server's tokenizer runs each text at its own bucket (``facts.text_split``), the
    clients send texts in input order by default: one request, no client-side tokenization; asked
    (``group_by_length=True``) they still group."""
    texts = [LONG[1], SHORT[0], LONG[0], SHORT[1]]
    bucketed_triton.facts = bucketed_triton.facts.with_(text_split=True)
    with ClipClient("fake:1") as client:
        assert np.array_equal(client.embed_texts(texts), expected(texts))

    async def run(**options):
        async with AsyncClipClient("fake:1", **options) as aclient:
            return await aclient.embed_texts(texts)

    assert np.array_equal(asyncio.run(run()), expected(texts))
    assert [[i.decode() for i in r] for r in bucketed_triton.requests] == [texts, texts]
    bucketed_triton.requests.clear()
    with ClipClient("fake:1", group_by_length=True) as client:
        client.embed_texts(texts)
    asyncio.run(run(group_by_length=True))
    grouped = [[i.decode() for i in r] for r in bucketed_triton.requests]
    assert len(grouped) == 6 and all(len(buckets_of(r)) == 1 for r in grouped)


def test_a_batch_never_mixes_buckets_even_when_full(bucketed_triton):
    from clip_triton.client.core import length_batches

    keys = [(8, 5), (16, 12), (8, 6), (8, 7), (32, 20), (8, 5)]
    assert length_batches(keys, list(range(6)), 2) == [[0, 5], [2, 3], [1], [4]]
    assert length_batches(keys, [1, 2, 4], 8) == [[2], [1], [4]]


def _nllb_facts(facts):
    """``facts`` of a model whose tokenizer names 3 languages (as an NLLB export's contract does)."""
    from dataclasses import replace

    from clip_triton.contract import ModelContract

    contract = ModelContract.default()
    spec = replace(contract.tokenizer, languages=("eng_Latn", "fra_Latn", "deu_Latn"), default_language="eng_Latn")
    return facts.with_(contract=contract.with_(tokenizer=spec).to_json())


def test_language_marks_every_text_and_is_checked_before_any_request(fake_triton):
    """``language=`` puts the ``>>code<<`` mark on every text the server sees (templates included, the
    mark first), keys the prompt cache apart, and an unknown code or a model without languages is
    refused before a request is sent (the mark would otherwise be read as text)."""
    with ClipClient("fake:1") as client:
        with pytest.raises(ValueError, match="has no language codes"):
            client.embed_texts(["un chat"], language="fra_Latn")
        assert fake_triton.requests == []
    fake_triton.facts = _nllb_facts(fake_triton.facts)
    with ClipClient("fake:1") as client:
        got = client.embed_texts(["un chat", "un chien"], language="fra_Latn")
        assert fake_triton.requests[-1] == [b">>fra_Latn<< un chat", b">>fra_Latn<< un chien"]
        assert np.allclose(got, expected([">>fra_Latn<< un chat", ">>fra_Latn<< un chien"]))
        with pytest.raises(ValueError, match=r"unknown language 'fr'.*knows 3: deu_Latn, eng_Latn, fra_Latn"):
            client.embed_texts(["un chat"], language="fr")
        sent = len(fake_triton.requests)
        french = client.prompt_embeddings(["chat"], ["une photo d'un {}."], language="fra_Latn")
        assert fake_triton.requests[-1] == [b">>fra_Latn<< une photo d'un chat."]
        english = client.prompt_embeddings(["chat"], ["une photo d'un {}."])
        assert len(fake_triton.requests) == sent + 2 and not np.allclose(french, english)

    async def asynchronous():
        async with AsyncClipClient("fake:1") as client:
            with pytest.raises(ValueError, match="unknown language"):
                await client.embed_texts(["x"], language="xx_Yyyy")
            return await client.embed_texts(["un chat"], language="deu_Latn")

    assert np.allclose(asyncio.run(asynchronous()), expected([">>deu_Latn<< un chat"]))
