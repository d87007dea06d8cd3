"""perf_analyzer (from tritonclient 2.51.0) against the real server with real JPEG input data."""

import ctypes.util

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
