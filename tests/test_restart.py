"""A ClipClient job survives a tritonserver restart: retries on UNAVAILABLE, nothing lost."""

import threading
import time

import numpy as np
import pytest

from clip_triton.client import ClipClient
from clip_triton.server import TritonServer

from .helpers import cos

pytestmark = pytest.mark.integration


def test_a_job_with_the_client_defaults_rides_out_a_slow_restart(tiny_repo, tmp_path, open_clip_reference):
    """The server stops mid-job and stays down 30 s before it starts again (a restart takes ~60 s on this
    machine; the old defaults gave up after ~15 s of retries): a job with ClipClient's defaults finishes
    with every item answered once, in order, with requests answered before the stop and after the
    return. (Retry classification, budgets and what a job that fails for good keeps: test_client_core.)"""
    texts = [f"caption number {i}" for i in range(45)]
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
        time.sleep(30)  # a slow restart: requests meet UNAVAILABLE and keep backing off
        servers.append(TritonServer(tiny_repo, log_file=tmp_path / "triton2.log", **ports).start(timeout=300))
        marks["up"] = time.monotonic()

    client = ClipClient(first.grpc_url)  # the defaults: a 150 s retry budget
    thread = threading.Thread(target=restart)
    thread.start()
    rows, finished = [], []
    try:
        for start in range(0, len(texts), 3):  # a job of 15 requests spread over the restart
            rows.append(client.embed_texts(texts[start : start + 3]))
            finished.append(time.monotonic())
            if len(finished) == 3:
                answered.set()
                assert down.wait(300), "the server was not stopped"
    finally:
        answered.set()
        thread.join()
        client.close()
        for server in servers:
            server.stop()
    assert any(t < marks["down"] for t in finished) and any(t > marks["up"] for t in finished)
    served = np.concatenate(rows)
    assert served.shape == (45, 32) and not np.isnan(served).any()
    assert cos(served, expected).min() >= 0.9999  # every item answered once, in order
