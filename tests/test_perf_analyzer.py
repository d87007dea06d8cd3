"""perf_analyzer (from tritonclient 2.51.0) against the real server with real JPEG input data."""

import ctypes.util
import json

import pytest

from clip_triton.contract import IMAGE_ENSEMBLE, TEXT_ENSEMBLE
from clip_triton.errors import ClipTritonError
from clip_triton.perf import run_perf_analyzer

pytestmark = pytest.mark.skipif(
    not ctypes.util.find_library("b64"), reason="perf_analyzer needs Debian's libb64-0d (apt-get install libb64-0d)"
)


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

    from clip_triton.contract import TEXT_ENSEMBLE, TEXT_MODEL, TOKENIZER_MODEL
    from clip_triton.perf import UNIQUE_TEXTS, input_data, response_cached

    assert response_cached(triton.grpc_url, TEXT_ENSEMBLE)
    data = input_data(TEXT_ENSEMBLE, unique=1000)["data"]
    assert len({json.dumps(entry) for entry in data}) == 1000 and UNIQUE_TEXTS >= 100_000

    def counts() -> tuple[int, int]:
        def inference(model: str) -> dict:
            with grpcclient.InferenceServerClient(triton.grpc_url) as client:
                stats = client.get_inference_statistics(model, headers=triton.grpc_admin_headers, as_json=True)
            return stats["model_stats"][0]["inference_stats"]

        # cached at the composing models (issue 25): a hit shows at the tokenizer and the encoder
        hits = sum(int(inference(m).get("cache_hit", {}).get("count", 0)) for m in (TOKENIZER_MODEL, TEXT_MODEL))
        return int(inference(TEXT_ENSEMBLE)["success"]["count"]), hits

    before = counts()
    run_perf_analyzer(triton.grpc_url, TEXT_ENSEMBLE, concurrency=2, measurement_ms=1500)
    after = counts()
    assert after[0] - before[0] > 20 and after[1] == before[1]  # many requests, no hit
