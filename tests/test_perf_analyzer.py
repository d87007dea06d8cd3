"""perf_analyzer (from tritonclient 2.51.0) against the real server with real JPEG input data."""

import ctypes.util
import json

import pytest

from clip_triton.contract import IMAGE_ENSEMBLE, TEXT_ENSEMBLE
from clip_triton.errors import ClipTritonError
from clip_triton.perf import run_perf_analyzer

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        not ctypes.util.find_library("b64"), reason="perf_analyzer needs Debian's libb64-0d (apt-get install libb64-0d)"
    ),
]


@pytest.mark.parametrize("model", [IMAGE_ENSEMBLE, TEXT_ENSEMBLE])
def test_perf_analyzer_measures_the_ensembles(triton, model):
    result = run_perf_analyzer(triton.grpc_url, model, concurrency=2, measurement_ms=1500)
    assert result.items_per_sec > 1
    assert 0 < result.p50_ms <= result.p99_ms


def test_perf_analyzer_failures_raise(triton):
    """A failed request stops perf_analyzer with a non-zero exit: a returned result had no errors."""
    with pytest.raises(ClipTritonError, match="perf_analyzer failed"):
        run_perf_analyzer(triton.grpc_url, IMAGE_ENSEMBLE, images=[b"not a jpeg"], measurement_ms=500)


def test_perf_analyzer_times_the_encoders_not_the_response_cache(triton):
    """clip_text caches responses (the default): perf_analyzer's cycled prompts would all be hits
    after the first few; each request gets a prompt of its own instead, so it misses."""
    import tritonclient.grpc as grpcclient

    from clip_triton.contract import TEXT_ENSEMBLE
    from clip_triton.perf import UNIQUE_TEXTS, input_data, response_cached

    assert response_cached(triton.grpc_url, TEXT_ENSEMBLE)
    data = input_data(TEXT_ENSEMBLE, unique=1000)["data"]
    assert len({json.dumps(entry) for entry in data}) == 1000 and UNIQUE_TEXTS >= 100_000

    def counts() -> tuple[int, int]:
        with grpcclient.InferenceServerClient(triton.grpc_url) as client:
            stats = client.get_inference_statistics(TEXT_ENSEMBLE, headers=triton.grpc_admin_headers, as_json=True)
        inference = stats["model_stats"][0]["inference_stats"]
        return int(inference["success"]["count"]), int(inference.get("cache_hit", {}).get("count", 0))

    before = counts()
    run_perf_analyzer(triton.grpc_url, TEXT_ENSEMBLE, concurrency=2, measurement_ms=1500)
    after = counts()
    assert after[0] - before[0] > 20 and after[1] == before[1]  # many requests, no hit


def test_an_unstable_measurement_is_retried_with_longer_windows_then_more_trials(monkeypatch):
    """A noisy machine: perf_analyzer's "Failed to obtain stable measurement" gets two more tries, the
    windows 2x then 4x as long and the last with 12 trials; the stability criterion is never loosened."""
    import subprocess

    from clip_triton import perf

    calls = []

    def fake_run(command, **kwargs):
        calls.append(command)
        if len(calls) < 3:
            return subprocess.CompletedProcess(command, 2, "Failed to obtain stable measurement.", "")
        csv = command[command.index("-f") + 1]
        with open(csv, "w") as out:
            out.write("Concurrency,Inferences/Second,p50 latency,p99 latency\n1,100.0,2000,4000\n")
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(perf.subprocess, "run", fake_run)
    result = run_perf_analyzer("127.0.0.1:1", TEXT_ENSEMBLE, measurement_ms=500, data={"data": []})
    assert result.items_per_sec == 100.0 and result.p50_ms == 2.0
    flags = [[a for a in c if a.startswith(("--measurement-interval=", "--max-trials=", "--stability"))] for c in calls]
    assert flags == [
        ["--measurement-interval=500", "--stability-percentage=50", "--max-trials=6"],
        ["--measurement-interval=1000", "--stability-percentage=50", "--max-trials=6"],
        ["--measurement-interval=2000", "--stability-percentage=50", "--max-trials=12"],
    ]
