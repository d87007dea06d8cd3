"""A ClipClient job survives a tritonserver restart: retries on UNAVAILABLE, nothing lost."""

import threading
import time

import numpy as np

from clip_triton.client import ClipClient
from clip_triton.server import TritonServer

from .conftest import cos


def test_job_finishes_across_a_server_restart(tiny_repo, tmp_path, open_clip_reference):
    texts = [f"caption number {i}" for i in range(60)]
    expected = open_clip_reference.texts(texts)
    first = TritonServer(tiny_repo, log_file=tmp_path / "triton.log").start(timeout=120)
    ports = dict(http_port=first.http_port, grpc_port=first.grpc_port, metrics_port=first.metrics_port)
    servers, marks = [first], {}

    def restart():
        time.sleep(0.6)
        first.stop()
        marks["down"] = time.monotonic()
        time.sleep(1.0)  # down for a moment: requests meet UNAVAILABLE and back off
        servers.append(TritonServer(tiny_repo, log_file=tmp_path / "triton2.log", **ports).start(timeout=120))
        marks["up"] = time.monotonic()

    client = ClipClient(first.grpc_url, retries=12, backoff=0.2)
    thread = threading.Thread(target=restart)
    thread.start()
    rows, finished = [], []
    try:
        for start in range(0, len(texts), 3):  # a job of 20 requests spread over the restart
            rows.append(client.embed_texts(texts[start : start + 3]))
            finished.append(time.monotonic())
            time.sleep(0.1)
    finally:
        thread.join()
        client.close()
        for server in servers:
            server.stop()
    assert any(t < marks["down"] for t in finished) and any(t > marks["up"] for t in finished)
    served = np.concatenate(rows)
    assert served.shape == (60, 32) and not np.isnan(served).any()
    assert cos(served, expected).min() >= 0.9999  # every item answered once, in order
