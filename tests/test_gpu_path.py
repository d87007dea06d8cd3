"""The GPU production path, checked where it can be here (no GPU, no Docker, no TensorRT).

docker-compose.yml and the Dockerfile are validated as data (no Docker engine runs here). The engine
builder's logic that needs no GPU is exercised for real; the build itself is a `gpu` test, skipped
with its reason where there is no GPU or TensorRT."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from clip_triton import contract as C
from clip_triton.errors import ClipTritonError
from clip_triton.export import engines as E
from clip_triton.repository import parse

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
DOCKERFILE = (ROOT / "deploy" / "Dockerfile").read_text()


def command_text(service: str) -> str:
    command = COMPOSE["services"][service]["command"]
    return " ".join(command) if isinstance(command, list) else command


def test_compose_services_and_order():
    services = COMPOSE["services"]
    assert {"export", "engines", "triton"} <= set(services)
    assert services["engines"]["depends_on"] == {"export": {"condition": "service_completed_successfully"}}
    assert services["triton"]["depends_on"] == {"engines": {"condition": "service_completed_successfully"}}
    assert services["export"]["restart"] == services["engines"]["restart"] == "no"  # one-shot jobs
    assert "tools" in services["sdk"]["profiles"]  # not started by `docker compose up`


def test_gpu_reservations():
    for name in ("engines", "triton"):
        devices = COMPOSE["services"][name]["deploy"]["resources"]["reservations"]["devices"]
        assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert "deploy" not in COMPOSE["services"]["export"]  # export runs on the CPU


def test_triton_service():
    triton = COMPOSE["services"]["triton"]
    text = command_text("triton")
    assert "--model-control-mode=none" in text and "--model-repository=/models" in text
    assert text.index("clip-triton check-engines") < text.index("tritonserver")  # refuse foreign engines first
    assert all(port.startswith("127.0.0.1:") for port in triton["ports"])
    assert sorted(p.split(":")[-1] for p in triton["ports"]) == ["8000", "8001", "8002"]
    assert "--http-port=8000" in text and "--grpc-port=8001" in text and "--metrics-port=8002" in text
    health = triton["healthcheck"]
    assert "http://localhost:8000/v2/health/ready" in health["test"][1] and "clip-triton health" in health["test"][1]
    assert int(health["start_period"].rstrip("s")) >= 300
    size = triton["shm_size"]
    assert size.endswith("gb") and int(size[:-2]) >= 1
    assert "models:/models:ro" in triton["volumes"]


def test_export_and_engines_jobs():
    export = command_text("export")
    assert "--precision=fp16" in export and "--out=/exports/current" in export
    assert "ViT-bigG-14" in export and "laion2b_s39b_b160k" in export
    assert "hf-cache:/cache" in COMPOSE["services"]["export"]["volumes"]
    engines = command_text("engines")
    assert "clip-triton repo --runtime tensorrt --onnx-dir /exports/current --out /models" in engines
    assert "clip-triton build-engines --onnx-dir /exports/current --repo /models" in engines
    assert "--timing-cache /trt-cache/timing.cache" in engines and "trt-cache:/trt-cache" in \
        COMPOSE["services"]["engines"]["volumes"]
    assert set(COMPOSE["volumes"]) == {"hf-cache", "exports", "models", "trt-cache"}


def test_images_are_pinned_in_one_place():
    releases = re.findall(r"^ARG TRITON_RELEASE=(\S+)$", DOCKERFILE, flags=re.M)
    assert len(releases) == 1 and re.fullmatch(r"\d\d\.\d\d", releases[0])
    bases = re.findall(r"^FROM (\S+)", DOCKERFILE, flags=re.M)
    assert len(bases) == 6 and bases[0] == "scratch"
    for base in bases[1:]:
        assert ":" in base and not base.endswith(":latest")
        if base.startswith("nvcr.io/"):
            assert "${TRITON_RELEASE}" in base  # Triton, TensorRT and SDK from the same release
    for name, service in COMPOSE["services"].items():
        assert service["build"]["dockerfile"] == "deploy/Dockerfile" and service["build"]["target"] == name
        assert not service["image"].endswith(":latest")
    code = [line.split("#", 1)[0] for line in (ROOT / "docker-compose.yml").read_text().splitlines()]
    assert not any("TRITON_RELEASE" in line or "nvcr.io" in line for line in code)  # only the Dockerfile pins it


def test_gateway_service():
    gateway = COMPOSE["services"]["gateway"]
    assert gateway["depends_on"] == {"triton": {"condition": "service_healthy"}}
    assert gateway["ports"] == ["127.0.0.1:8080:8080"]
    assert "--url=triton:8001" in gateway["command"] and "/readyz" in " ".join(gateway["healthcheck"]["test"])
    assert gateway["environment"]["CLIP_TRITON_API_KEYS"].startswith("${CLIP_TRITON_API_KEYS:?")  # no default key
    assert "deploy" not in gateway  # no GPU


def test_serving_image_installs_no_torch():
    triton_stage = DOCKERFILE.split("AS triton", 1)[1].split("FROM ", 1)[0]
    assert "pip install --no-cache-dir /opt/clip-triton\n" in triton_stage and "torch" not in triton_stage.replace(
        "never imports torch", "")


def test_profile_comes_from_the_contract_and_matches_triton():
    contract = C.ModelContract.default()
    committed = parse((ROOT / "model_repository" / "vision_encoder" / "config.pbtxt").read_text())
    vision = E.profile_for(contract, "vision")
    assert vision == E.Profile("pixel_values", (1, 3, 224, 224), (16, 3, 224, 224), (64, 3, 224, 224))
    assert vision.max[0] == committed.max_batch_size
    text = E.profile_for(contract, "text")
    assert text == E.Profile("input_ids", (1, 77), (16, 77), (64, 77))
    assert E.profile_dtype(contract, "vision") == "float16" and E.profile_dtype(contract, "text") == "int32"


@pytest.mark.parametrize("version, strong", [("10.12.0.36", True), ("10.13.3", True), ("11.0.0", True),
                                             ("10.11.0.33", False), ("8.6.1", False)])
def test_strongly_typed_from_tensorrt_10_12(version, strong):
    assert E.strongly_typed_supported(version) is strong


def _manifest(**platform):
    base = {"tensorrt": "10.13.0", "gpu": "NVIDIA H200", "compute_capability": "9.0"}
    return {"platform": {**base, **platform}}


def test_engine_manifest_must_match_the_serving_platform():
    here = E.Platform("10.13.0.35", "NVIDIA H200", "9.0")
    E.check_engine_manifest(_manifest(), here)  # same TensorRT (to the patch level) and GPU
    with pytest.raises(ClipTritonError, match="TensorRT 10.12.0, but this environment has TensorRT 10.13.0.35"):
        E.check_engine_manifest(_manifest(tensorrt="10.12.0"), here)
    with pytest.raises(ClipTritonError, match="built for NVIDIA A100"):
        E.check_engine_manifest(_manifest(gpu="NVIDIA A100-SXM4-80GB", compute_capability="8.0"), here)


def test_repository_engine_check(tmp_path):
    from clip_triton.repository import RepoOptions, write_repository

    repo = write_repository(tmp_path / "repo", options=RepoOptions(runtime="tensorrt"))
    here = E.Platform("10.13.0", "NVIDIA H200", "9.0")
    with pytest.raises(ClipTritonError, match="missing"):
        E.check_repository_engines(repo, here)
    for model in ("vision_encoder", "text_encoder"):
        (repo / model / "1" / "model.plan").write_bytes(b"engine bytes")  # stands in for a GPU-built engine
        (repo / model / "1" / "engine.json").write_text(json.dumps(_manifest()))
    assert E.check_repository_engines(repo, here) == ["vision_encoder", "text_encoder"]
    with pytest.raises(ClipTritonError, match="rebuild"):
        E.check_repository_engines(repo, E.Platform("10.14.1", "NVIDIA H200", "9.0"))


def test_validation_passes_and_fails_on_cosine():
    import numpy as np

    ref = np.eye(3, 8, dtype=np.float32)
    cases = [("photos", np.zeros((3, 1)))]
    assert E.validate_engine("vision", cases, [ref], [ref + 1e-4])[0]["passed"]
    assert not E.validate_engine("vision", cases, [ref], [np.roll(ref, 1, axis=1)])[0]["passed"]
    assert not E.validate_engine("vision", cases, [ref], [ref * np.nan])[0]["passed"]


def test_build_options_are_checked():
    with pytest.raises(ClipTritonError, match="optimization level 7"):
        E.BuildOptions(optimization_level=7)
    with pytest.raises(ClipTritonError, match="workspace"):
        E.BuildOptions(workspace_gib=0)


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="a GPU is present")
def test_no_gpu_is_a_clear_error(tiny_export, tmp_path, monkeypatch):
    monkeypatch.setenv("TRT_VERSION", "10.13.0")  # get past the TensorRT lookup to the GPU lookup
    result = subprocess.run([sys.executable, "-m", "clip_triton.cli", "build-engines", "--onnx-dir", str(tiny_export),
                             "--repo", str(tmp_path)], capture_output=True, text=True)
    assert result.returncode == 2 and "no NVIDIA GPU found" in result.stderr


def test_no_tensorrt_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("TRT_VERSION", raising=False)
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    try:
        version = E.tensorrt_version()
    except ClipTritonError as err:
        assert "TensorRT is not installed" in str(err) and "tensorrt" in err.hint
    else:
        pytest.skip(f"libnvinfer {version} is installed here")


def _gpu_and_tensorrt() -> str | None:
    if shutil.which("nvidia-smi") is None:
        return "no NVIDIA GPU (nvidia-smi not found)"
    try:
        import polygraphy  # noqa: F401
        import tensorrt  # noqa: F401
    except ImportError:
        return "TensorRT or Polygraphy not installed"
    return None


@pytest.mark.gpu
@pytest.mark.skipif(_gpu_and_tensorrt() is not None, reason=str(_gpu_and_tensorrt()))
def test_engines_build_and_match_pytorch(tiny_config, tmp_path):
    from clip_triton.export import export_model
    from clip_triton.repository import RepoOptions, write_repository

    export_model(str(tiny_config), "none", tmp_path / "onnx", precision="fp16")
    repo = write_repository(tmp_path / "repo", onnx_dir=tmp_path / "onnx", options=RepoOptions(runtime="tensorrt"))
    report = E.build_engines(tmp_path / "onnx", repo)
    for manifest in report.values():
        assert all(check["passed"] for check in manifest["validation"]["checks"])
    assert E.check_repository_engines(repo) == ["vision_encoder", "text_encoder"]
