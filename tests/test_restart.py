"""A ClipClient job survives a tritonserver restart: retries on UNAVAILABLE, nothing lost."""

import threading
import time

import numpy as np

from clip_triton.client import ClipClient
from clip_triton.server import TritonServer

from .helpers import cos


def test_job_finishes_across_a_server_restart(tiny_repo, tmp_path, open_clip_reference):
    texts = [f"caption number {i}" for i in range(60)]
    expected = open_clip_reference.texts(texts)
    first = TritonServer(tiny_repo, log_file=tmp_path / "triton.log").start(timeout=120)
    ports = dict(http_port=first.http_port, grpc_port=first.grpc_port, metrics_port=first.metrics_port)
    servers, marks = [first], {}
    # Events, not the clock: the restart begins once the job has answers, and the job goes on only
    # once the server is down, so requests land before, during and after the restart on any machine.
    answered, down = threading.Event(), threading.Event()

    def restart():
        if not answered.wait(300):
            return
        first.stop()
        marks["down"] = time.monotonic()
        down.set()
        time.sleep(1.0)  # down for a moment: requests meet UNAVAILABLE and back off
        servers.append(TritonServer(tiny_repo, log_file=tmp_path / "triton2.log", **ports).start(timeout=120))
        marks["up"] = time.monotonic()

    client = ClipClient(first.grpc_url, backoff=0.2)  # the default retry budget (150 s) outlasts a restart
    thread = threading.Thread(target=restart)
    thread.start()
    rows, finished = [], []
    try:
        for start in range(0, len(texts), 3):  # a job of 20 requests spread over the restart
            rows.append(client.embed_texts(texts[start : start + 3]))
            finished.append(time.monotonic())
            if len(finished) == 3:
                answered.set()
                assert down.wait(300), "the server was not stopped"
            time.sleep(0.1)  # paced: the job outlasts the restart's last readiness poll
    finally:
        answered.set()
        thread.join()
        client.close()
        for server in servers:
            server.stop()
    assert any(t < marks["down"] for t in finished) and any(t > marks["up"] for t in finished)
    served = np.concatenate(rows)
    assert served.shape == (60, 32) and not np.isnan(served).any()
    assert cos(served, expected).min() >= 0.9999  # every item answered once, in order


def test_client_defaults_outlast_a_slow_restart(tiny_repo, tmp_path, open_clip_reference):
    """The server is down for 30 s (a restart takes ~60 s on this machine; the old defaults gave up
    after ~15 s of retries): a job with ClipClient's defaults still finishes, nothing lost."""
    texts = [f"a long outage, caption {i}" for i in range(12)]
    first = TritonServer(tiny_repo, log_file=tmp_path / "triton.log").start(timeout=120)
    ports = dict(http_port=first.http_port, grpc_port=first.grpc_port, metrics_port=first.metrics_port)
    servers = [first]
    client = ClipClient(first.grpc_url)
    try:
        client.embed_texts(texts[:1])  # connected and facts read
        first.stop()

        def come_back():
            time.sleep(30)
            servers.append(TritonServer(tiny_repo, log_file=tmp_path / "triton2.log", **ports).start(timeout=300))

        thread = threading.Thread(target=come_back)
        thread.start()
        try:
            served = client.embed_texts(texts)
        finally:
            thread.join()
    finally:
        client.close()
        for server in servers:
            server.stop()
    assert cos(served, open_clip_reference.texts(texts)).min() >= 0.9999


def test_a_job_that_fails_keeps_every_answered_row(tiny_repo, tmp_path, open_clip_reference, monkeypatch):
    """The server goes away for good mid-job: JobFailed carries every row answered before it."""
    from clip_triton.client import JobFailed, ServerUnavailable, grpc_client

    texts = [f"caption {i} of a job that dies" for i in range(30)]
    server = TritonServer(tiny_repo, log_file=tmp_path / "triton.log").start(timeout=120)
    client = ClipClient(server.grpc_url, batch_size=3, concurrency=1, retry_seconds=2)
    call, calls = grpc_client._Job.call, []

    def call_then_lose_the_server(job, *args):  # each inference request the job sends
        calls.append(1)
        if len(calls) == 4:  # three batches answered, then the server is gone for good
            server.stop()
        return call(job, *args)

    monkeypatch.setattr(grpc_client._Job, "call", call_then_lose_the_server)
    try:
        try:
            client.embed_texts(texts)
        except JobFailed as err:
            failure = err
        else:
            raise AssertionError("the job did not fail")
    finally:
        client.close()
        server.stop()
    assert len(failure.answered) == 9 and isinstance(failure.cause, ServerUnavailable)
    assert "is the server up?" in failure.hint
    rows = failure.embeddings[failure.answered]
    assert cos(rows, open_clip_reference.texts([texts[i] for i in failure.answered])).min() >= 0.9999
    unanswered = sorted(set(range(len(texts))) - set(failure.answered))
    assert np.isnan(failure.embeddings[unanswered]).all()
