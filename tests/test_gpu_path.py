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

import numpy as np
import pytest
import yaml

from clip_triton import contract as C
from clip_triton.errors import ClipTritonError, VerificationError
from clip_triton.export import engines as E
from clip_triton.repository import parse

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
DOCKERFILE = (ROOT / "deploy" / "Dockerfile").read_text()


@pytest.fixture()
def fake_gpu(tmp_path) -> dict[str, str]:
    from .gpu_twin import fake_gpu_env

    return fake_gpu_env(tmp_path / "fake-gpu-bin")


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
    assert "--model-control-mode=none" in text and "--model-repository=/models/current" in text
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
    from clip_triton.server import ADMIN_APIS, ADMIN_HEADER

    rule = f"{','.join(ADMIN_APIS)}:{ADMIN_HEADER}=$$ADMIN_KEY"  # $$: compose's escape for the shell's $
    assert f"--http-restricted-api={rule}" in text and f"--grpc-restricted-protocol={rule}" in text


def test_compose_services_are_hardened():
    for name, service in COMPOSE["services"].items():
        if name == "sdk":
            continue  # a tool container run by hand
        assert service["security_opt"] == ["no-new-privileges:true"] and service["cap_drop"] == ["ALL"], name
    assert COMPOSE["services"]["gateway"]["read_only"] is True


def test_export_and_engines_jobs():
    # The scripts loop over CLIP_MODELS (default: the one model in /exports/current); what they run once
    # the shell expands them is checked by tests/test_multi_model.py (test_compose_stages_loop_...).
    export = command_text("export")
    assert "--precision=fp16" in export and '--onnx-dir="/exports/$$name" --reuse' in export
    assert "current=$$CLIP_MODEL@$$CLIP_PRETRAINED" in export
    environment = COMPOSE["services"]["export"]["environment"]
    assert "ViT-bigG-14" in environment["CLIP_MODEL"] and "laion2b_s39b_b160k" in environment["CLIP_PRETRAINED"]
    assert "hf-cache:/cache" in COMPOSE["services"]["export"]["volumes"]
    engines = command_text("engines")
    # one command: keeps matching engines, else builds a new repository and switches /models/current to it
    assert "exec clip-triton build-engines $$models --root /models" in engines
    assert '--onnx-dir /exports/$$name"' in engines and "$${CLIP_MODELS:-current}" in engines
    assert "clip-triton repo" not in engines and "--force" not in engines  # nothing deletes working engines
    assert (
        "--timing-cache /trt-cache/timing.cache" in engines
        and "trt-cache:/trt-cache" in COMPOSE["services"]["engines"]["volumes"]
    )
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
    # No default key, and no mandatory variable either: compose interpolates the whole file before it
    # picks services, so `${VAR:?}` here broke `build`, `up -d triton` and `run sdk` too. The gateway
    # refuses to start without keys (tests/test_gpu_twin.py runs it that way), and it is opt-in.
    assert gateway["environment"]["CLIP_TRITON_API_KEYS"] == "${CLIP_TRITON_API_KEYS:-}"
    assert gateway["profiles"] == ["gateway"]
    assert ":?" not in (ROOT / "docker-compose.yml").read_text()
    assert "deploy" not in gateway  # no GPU


def test_serving_image_installs_no_torch_but_the_client_its_healthcheck_needs():
    triton_stage = DOCKERFILE.split("AS triton", 1)[1].split("\nFROM ", 1)[0]
    assert '"/opt/clip-triton[client]"' in triton_stage  # `clip-triton health` imports tritonclient
    pins = (ROOT / "requirements" / "docker" / "triton.txt").read_text()
    assert "tritonclient==" in pins and "torch" not in pins


def test_profile_comes_from_the_contract_and_matches_triton():
    contract = C.ModelContract.default()
    committed = parse((ROOT / "model_repository" / "vision_encoder" / "config.pbtxt").read_text())
    (vision,) = E.profiles_for(contract, "vision")
    assert vision == E.Profile("pixel_values", (1, 3, 224, 224), (16, 3, 224, 224), (64, 3, 224, 224))
    assert vision.max[0] == committed.max_batch_size
    # One text profile per sequence-length bucket, each tuned at its bucket, together covering 2..77.
    assert contract.tokenizer.lengths == (8, 16, 32, 77)
    assert E.profiles_for(contract, "text") == (
        E.Profile("input_ids", (1, 2), (16, 8), (64, 8)),
        E.Profile("input_ids", (1, 9), (16, 16), (64, 16)),
        E.Profile("input_ids", (1, 17), (16, 32), (64, 32)),
        E.Profile("input_ids", (1, 33), (16, 77), (64, 77)),
    )
    text_config = parse((ROOT / "model_repository" / "text_encoder" / "config.pbtxt").read_text())
    assert list(text_config.input[0].dims) == [-1]  # the dynamic sequence axis the profiles cover
    assert E.profile_dtype(contract, "vision") == "float16" and E.profile_dtype(contract, "text") == "int32"
    # A static (pre-bucket) contract keeps one profile at the context length.
    static = contract.with_(tokenizer=C.TokenizerSpec())
    assert E.profiles_for(static, "text") == (E.Profile("input_ids", (1, 77), (16, 77), (64, 77)),)


def test_each_length_runs_in_the_profile_that_holds_it():
    import numpy as np

    from .gpu_twin import PolygraphyHostTwin

    profiles = E.profiles_for(C.ModelContract.default(), "text")
    twin = PolygraphyHostTwin(lambda feed: np.zeros((len(feed["input_ids"]), 4), np.float32))
    batches = [np.zeros((b, n), np.int32) for b, n in ((1, 8), (3, 16), (2, 5), (64, 77), (4, 33), (2, 32))]
    E.run_engine(Path("unused.plan"), profiles, batches, runner=twin)
    assert [index for index, _ in twin.profiles_used] == [0, 1, 0, 3, 3, 2]
    for index, shape in twin.profiles_used:
        assert profiles[index].holds(shape)
    with pytest.raises(ClipTritonError, match="no optimisation profile holds shape"):
        E.profile_index(profiles, (65, 8))


@pytest.mark.parametrize(
    "version, strong",
    [("10.12.0.36", True), ("10.13.3", True), ("11.0.0", True), ("10.11.0.33", False), ("8.6.1", False)],
)
def test_strongly_typed_from_tensorrt_10_12(version, strong):
    assert E.strongly_typed_supported(version) is strong


def _manifest(passed=True, **platform):
    base = {"tensorrt": "10.13.0", "gpu": "NVIDIA H200", "compute_capability": "9.0"}
    checks = [{"inputs": "photos", "batch": 4, "min_cosine": 0.9999 if passed else 0.41, "passed": passed}]
    return {
        "platform": {**base, **platform},
        "validation": {"min_cosine": E.MIN_ENGINE_COSINE, "checks": checks, "passed": passed},
    }


def _recorded(manifest: dict, model: str) -> dict:
    """``manifest`` with the profiles build-engines records for ``model`` (default contract)."""
    tower = next(t.name for t in C.TOWERS if t.model == model)
    return {**manifest, "profiles": E.recorded_profiles(C.ModelContract.default(), tower)}


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
        (repo / model / "1" / "engine.json").write_text(json.dumps(_recorded(_manifest(), model)))
    assert E.check_repository_engines(repo, here) == ["vision_encoder", "text_encoder"]
    with pytest.raises(ClipTritonError, match="rebuild"):
        E.check_repository_engines(repo, E.Platform("10.14.1", "NVIDIA H200", "9.0"))


def _engine_repo(tmp_path, manifest: dict | None):
    from clip_triton.repository import RepoOptions, write_repository

    repo = write_repository(tmp_path / "repo", options=RepoOptions(runtime="tensorrt"))
    for model in ("vision_encoder", "text_encoder"):
        (repo / model / "1" / "model.plan").write_bytes(b"engine bytes")  # stands in for a GPU-built engine
        if manifest is not None:
            (repo / model / "1" / "engine.json").write_text(json.dumps(_recorded(manifest, model)))
    return repo


def test_check_engines_refuses_an_engine_that_failed_validation(tmp_path):
    """build-engines writes engine.json before deciding pass/fail: a failed engine stays on disk."""
    repo = _engine_repo(tmp_path, _manifest(passed=False))
    with pytest.raises(ClipTritonError, match="did not pass its validation.*0.410000") as err:
        E.check_repository_engines(repo, E.Platform("10.13.0", "NVIDIA H200", "9.0"))
    assert "do not serve it" in err.value.hint
    legacy = _manifest()  # written before the top-level verdict existed: no "passed", so not trusted
    del legacy["validation"]["passed"]
    with pytest.raises(ClipTritonError, match="did not pass its validation"):
        E.check_repository_engines(_engine_repo(tmp_path / "b", legacy), E.Platform("10.13.0", "NVIDIA H200", "9.0"))


def test_check_engines_refuses_a_plan_without_its_manifest(tmp_path):
    repo = _engine_repo(tmp_path, None)
    with pytest.raises(ClipTritonError, match="has no engine.json: nothing says it was validated"):
        E.check_repository_engines(repo, E.Platform("10.13.0", "NVIDIA H200", "9.0"))


@pytest.mark.integration  # the CLI against a fake nvidia-smi on PATH
def test_check_engines_cli_exits_2_on_a_failed_engine(tmp_path, fake_gpu):
    repo = _engine_repo(tmp_path, _manifest(passed=False, tensorrt="10.13.3.9"))
    result = subprocess.run(
        [sys.executable, "-m", "clip_triton.cli", "check-engines", "--repo", str(repo)],
        capture_output=True,
        text=True,
        env=fake_gpu,
    )
    assert result.returncode == 2 and "did not pass its validation" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_engines_are_current_only_for_the_same_graphs(tiny_export, tmp_path):
    """The build Job's idempotence: engines for the same graph sha256, TensorRT and GPU are kept."""
    here = E.Platform("10.13.3.9", "NVIDIA H200", "9.0")
    manifest = _manifest(**{"tensorrt": here.tensorrt})
    repo = _engine_repo(tmp_path, None)
    for tower, model in ((t.name, t.model) for t in C.TOWERS):
        (repo / model / "1" / "engine.json").write_text(
            json.dumps({**_recorded(manifest, model), "onnx": E.graph_identity(tiny_export, tower)})
        )
    assert E.check_repository_engines(repo, here, onnx_dir=tiny_export) == ["vision_encoder", "text_encoder"]
    other = tmp_path / "other-export"
    shutil.copytree(tiny_export, other)
    with open(other / "text.onnx", "ab") as handle:
        handle.write(b"\0")  # any change to a graph (or its external data) makes the engines stale
    with pytest.raises(ClipTritonError, match="built from other graphs"):
        E.check_repository_engines(repo, here, onnx_dir=other)


def test_run_engine_copies_each_output_from_polygraphys_reused_buffer():
    """Polygraphy's TrtRunner.infer returns views of one host buffer it reuses: without a copy every
    batch but the last would be overwritten. Polygraphy's own host-copy code runs here."""
    import numpy as np

    from .gpu_twin import PolygraphyHostTwin

    profile = E.Profile("pixel_values", (1, 4), (2, 4), (4, 4))
    batches = [np.full((2, 4), value, np.float32) for value in (1.0, 2.0, 3.0)]
    outputs = E.run_engine(
        Path("unused.plan"), (profile,), batches, runner=PolygraphyHostTwin(lambda feed: feed["pixel_values"] * 10)
    )
    assert [float(out[0, 0]) for out in outputs] == [10.0, 20.0, 30.0]


def test_engine_validation_passes_through_the_polygraphy_twin(tiny_export):
    """build-engines' own validation step (validate_plan) on the export's references, with the
    "engine" computed by ONNX Runtime from the same graphs: every batch must pass."""
    from clip_triton.export.pipeline import read_manifest

    from .gpu_twin import validate_export_through_twin

    contract = C.ModelContract.from_dict(read_manifest(tiny_export)["contract"])
    for tower, (checks, profiles, twin) in validate_export_through_twin(tiny_export).items():
        assert len(checks) >= 2 and len({c["batch"] for c in checks}) >= 1
        assert all(c["passed"] for c in checks), checks
        if tower == "text":  # every bucket validated, each in its own profile
            assert {shape[1] for _, shape in twin.profiles_used} == set(contract.tokenizer.lengths)
            assert {index for index, _ in twin.profiles_used} == set(range(len(profiles)))
        (refusal,) = [c for c in checks if c["inputs"] == "refused"]  # a refused row: NaN, the others kept
        assert refusal["passed"] and refusal["max_abs_diff"] == 0.0


def test_engine_validation_fails_an_engine_that_answers_a_refused_row(tiny_export):
    """An engine that lost the graph's Where (a refused row comes back as numbers) fails validation:
    issue 25's NaN rows are checked on the GPU at build time, where the engine's own kernels run."""
    from .gpu_twin import validate_export_through_twin

    for tower, (checks, *_) in validate_export_through_twin(tiny_export, transform=np.nan_to_num).items():
        failed = [c["inputs"] for c in checks if not c["passed"]]
        assert failed == ["refused"], (tower, failed)


class _BuilderConfig:
    """TensorRT's IBuilderConfig timing-cache calls (boundary stand-in: TensorRT needs a GPU)."""

    def __init__(self, accepts):
        self.accepts, self.attached = accepts, []

    def create_timing_cache(self, data):
        return bytes(data)

    def set_timing_cache(self, cache, ignore_mismatch):
        self.attached.append(cache)
        return self.accepts(cache)


def test_timing_cache_from_another_platform_is_dropped(tmp_path):
    here = E.Platform("10.13.3.9", "NVIDIA H200", "9.0")
    path, lines = tmp_path / "timing.cache", []
    assert E.read_timing_cache(path, here, lines.append) == b""  # none yet
    E.write_timing_cache(path, b"timings", here)
    assert E.read_timing_cache(path, here, lines.append) == b"timings"
    assert E.read_timing_cache(path, E.Platform("10.13.3.9", "NVIDIA A100-SXM4-80GB", "8.0"), lines.append) == b""
    assert E.read_timing_cache(path, E.Platform("10.14.1.48", "NVIDIA H200", "9.0"), lines.append) == b""
    assert len(lines) == 2 and all("dropping timing cache" in line for line in lines)
    path.with_name(path.name + E.TIMING_CACHE_PLATFORM).unlink()  # a cache of unknown origin
    assert E.read_timing_cache(path, here, lines.append) == b""


def test_timing_cache_refused_by_tensorrt_is_replaced_not_ignored():
    lines = []
    config = _BuilderConfig(accepts=lambda cache: cache == b"")
    E.apply_timing_cache(config, b"stale", lines.append)
    assert config.attached == [b"stale", b""] and "refused the timing cache" in lines[0]
    with pytest.raises(ClipTritonError, match="refused an empty timing cache"):
        E.apply_timing_cache(_BuilderConfig(accepts=lambda cache: False), b"", lines.append)


def test_tensorrt_is_pinned_once_to_the_ngc_release():
    """The [gpu] extra, the Dockerfile's build-time check and README name the same TensorRT."""
    import tomllib

    gpu = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["gpu"]
    assert f"tensorrt=={E.TENSORRT_PIN}" in gpu
    assert re.findall(r"^ARG TENSORRT_VERSION=(\S+)$", DOCKERFILE, flags=re.M) == [E.TENSORRT_PIN]
    assert re.findall(r"^ARG TRITON_RELEASE=(\S+)$", DOCKERFILE, flags=re.M) == ["25.10"]
    readme = (ROOT / "README.md").read_text()
    assert f"TensorRT {E.TENSORRT_PIN}" in readme
    assert not re.search(r"tensorrt\s*>=", (ROOT / "pyproject.toml").read_text())


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
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "clip_triton.cli",
            "build-engines",
            "--onnx-dir",
            str(tiny_export),
            "--repo",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
    )
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


def test_response_cache_size_is_one_figure_everywhere():
    from clip_triton.server import DEFAULT_RESPONSE_CACHE_MIB, TritonServer

    flag = f"--cache-config=local,size={DEFAULT_RESPONSE_CACHE_MIB * 1024**2}"
    assert flag in command_text("triton")
    deployment = (ROOT / "deploy" / "k8s" / "base" / "triton-deployment.yaml").read_text()
    assert flag in deployment
    assert flag in TritonServer("unused").command()
    assert not any(arg.startswith("--cache-config") for arg in TritonServer("unused", response_cache_mib=0).command())


def test_gpu_servers_hand_the_cached_ensemble_host_memory():
    """Triton caches a response only when every output lies in CPU memory (core cache_entry.cc); on a
    GPU runtime the encoder's output reaches the inner cached ensemble in GPU memory unless the CUDA
    pool is off (ensemble ResponseAlloc falls back to pinned host memory). Both GPU deployments turn it
    off with the cache on; a stand-in on the CPU cannot show this (tests/twin_standin.py)."""
    deployment = (ROOT / "deploy" / "k8s" / "base" / "triton-deployment.yaml").read_text()
    for text in (command_text("triton"), deployment):
        assert "--cache-config=" in text and "--cuda-memory-pool-byte-size=0:0" in text


def test_containers_remove_a_killed_predecessors_shared_memory_before_starting():
    """Kubernetes keeps the memory-backed /dev/shm across container restarts, so every SIGKILLed
    Triton (OOM, liveness restart past the grace period) left its python-backend regions (32 MiB per
    model instance) in the pod's memory. Both container commands name the regions with one prefix and
    remove that prefix's files before `exec tritonserver` (run for real in tests/test_gpu_twin.py)."""
    from clip_triton.server import CONTAINER_SHM_PREFIX

    deployment = (ROOT / "deploy" / "k8s" / "base" / "triton-deployment.yaml").read_text()
    for command in (command_text("triton"), deployment):
        flag = f"--backend-config=python,shm-region-prefix-name={CONTAINER_SHM_PREFIX}"
        removal = f"rm -f /dev/shm/{CONTAINER_SHM_PREFIX}* &&"
        assert flag in command and removal in command
        assert command.index(removal) < command.index("exec tritonserver") < command.index(flag)


def test_tensorrt_encoders_list_every_profile_of_their_engine():
    """Triton's TensorRT backend serves only the profiles an instance group lists (profile 0 when none):
    the text encoder lists one per bucket, the vision encoder its one (clip_triton/profiles.py)."""
    from clip_triton.profiles import profiles_for
    from clip_triton.repository import ExportFacts, RepoOptions, build_configs

    contract = C.ModelContract.default()
    configs = build_configs(ExportFacts.default(), RepoOptions(runtime="tensorrt"))
    for tower in C.TOWERS:
        (group,) = configs[tower.model].instance_group
        assert list(group.profile) == [str(i) for i in range(len(profiles_for(contract, tower.name)))]
    assert len(configs[C.TEXT_MODEL].instance_group[0].profile) == len(contract.tokenizer.lengths) > 1
    committed = parse((ROOT / "model_repository" / C.TEXT_MODEL / "config.pbtxt").read_text())
    assert list(committed.instance_group[0].profile) == ["0", "1", "2", "3"]


def test_check_engines_refuses_profiles_the_config_does_not_list(tmp_path):
    """The config before issue 26 (no profile list: profile 0 alone) behind a four-profile text engine."""
    from clip_triton.repository import render

    here = E.Platform("10.13.0", "NVIDIA H200", "9.0")
    repo = _engine_repo(tmp_path, _manifest())
    assert E.check_repository_engines(repo, here) == ["vision_encoder", "text_encoder"]
    path = repo / C.TEXT_MODEL / "config.pbtxt"
    config = parse(path.read_text())
    del config.instance_group[0].profile[:]
    path.write_text(render(config))
    with pytest.raises(ClipTritonError, match=r"makes profiles \[\] \(so profile 0 alone\).*has 4: 0: \[1, 2\]") as err:
        E.check_repository_engines(repo, here)
    assert "clip-triton repo --runtime tensorrt" in err.value.hint


def test_check_engines_refuses_an_engine_built_for_other_buckets(tmp_path):
    here = E.Platform("10.13.0", "NVIDIA H200", "9.0")
    repo = _engine_repo(tmp_path, _manifest())
    record = repo / C.TEXT_MODEL / "1" / "engine.json"
    manifest = json.loads(record.read_text())
    manifest["profiles"][1]["max"] = [64, 20]  # built with another bucket than the contract's 16
    record.write_text(json.dumps(manifest))
    with pytest.raises(ClipTritonError, match=r"was built with profiles .*\[64, 20\].*contract declares"):
        E.check_repository_engines(repo, here)
    del manifest["profiles"]
    record.write_text(json.dumps(manifest))
    with pytest.raises(ClipTritonError, match="records no optimisation profiles"):
        E.check_repository_engines(repo, here)


def _orchestrator_budgets() -> list[tuple[str, float, float]]:
    """(where, what the health command needs in the worst case, what the orchestrator allows), seconds."""
    import shlex

    from clip_triton.health import STARTUP_MARGIN_S, probe_budget

    def needed(command: str) -> float:
        words = shlex.split(command.replace("=", " "))
        total = 0.0
        for i, word in enumerate(words):
            if word == "curl":
                assert "--max-time" in words[i:], f"unbounded curl in {command!r}"
                total += float(words[words.index("--max-time", i) + 1])
            if word == "health":
                timeout = float(words[words.index("--timeout", i) + 1]) if "--timeout" in words[i:] else 10.0
                total += probe_budget(timeout) + STARTUP_MARGIN_S
        return total

    compose = COMPOSE["services"]["triton"]["healthcheck"]
    k8s = yaml.safe_load_all((ROOT / "deploy" / "k8s" / "base" / "triton-deployment.yaml").read_text())
    deployment = next(d for d in k8s if d and d.get("kind") == "Deployment")
    container = next(c for c in deployment["spec"]["template"]["spec"]["containers"] if "livenessProbe" in c)
    liveness = container["livenessProbe"]
    return [
        ("compose", needed(compose["test"][1]), float(compose["timeout"].rstrip("s"))),
        ("kubernetes", needed(" ".join(liveness["exec"]["command"])), float(liveness["timeoutSeconds"])),
    ]


def test_the_health_probe_fits_inside_every_orchestrators_timeout():
    """A probe cut short by its orchestrator reads as dead: compose marks the container unhealthy and
    Kubernetes restarts a pod that was only busy (issue 26: compose allowed 10 s for ~35 s of work)."""
    for where, needed, allowed in _orchestrator_budgets():
        assert needed <= allowed, f"{where}: the health command may take {needed:.1f} s, its timeout is {allowed:.0f} s"


@pytest.mark.parametrize("timeout", [0.05, 6.0])
def test_a_probe_never_outlasts_its_budget(monkeypatch, timeout):
    """A canary that hangs and metrics that answer slowly: the probe still ends within its budget
    (before: a metrics read of up to 5 s, a canary of 2 x timeout, the window, another read)."""
    import time

    from clip_triton import health

    def slow_metrics(url, timeout=5.0, models=None):
        time.sleep(timeout)  # answers at the last moment it is allowed
        return 100.0  # and no request ever completes: the dead path, which waits the longest

    def hung_canary(url, timeout=10.0):
        time.sleep(timeout)
        return False, "InferenceServerException: Deadline Exceeded"

    monkeypatch.setattr(health, "completed_requests", slow_metrics)
    monkeypatch.setattr(health, "canary", hung_canary)
    started = time.monotonic()
    alive, reason = health.probe("127.0.0.1:1", "http://127.0.0.1:1/metrics", timeout=timeout)
    took = time.monotonic() - started
    assert not alive and "no request completed" in reason
    assert took <= health.probe_budget(timeout) + 1.0, f"{took:.1f} s for a {health.probe_budget(timeout):.1f} s budget"


def _fake_build(calls: list):
    """build_engines' result without TensorRT: a plan and a passed engine.json per encoder (the GPU boundary)."""

    def build(onnx_dir, repo, options, log):
        calls.append(Path(repo).name)
        platform = E.current_platform()
        contract = C.ModelContract.from_dict(json.loads((Path(onnx_dir) / C.MANIFEST).read_text())["contract"])
        for spec in C.TOWERS:
            folder = Path(repo) / spec.model / "1"
            (folder / C.PLAN_FILE).write_bytes(b"serialized engine")
            manifest = {
                "platform": {
                    "tensorrt": platform.tensorrt,
                    "gpu": platform.gpu,
                    "compute_capability": platform.compute_capability,
                },
                "onnx": E.graph_identity(Path(onnx_dir), spec.name),
                "profiles": E.recorded_profiles(contract, spec.name),
                "validation": {
                    "min_cosine": E.MIN_ENGINE_COSINE,
                    "passed": True,
                    "checks": [{"inputs": "references", "batch": 4, "min_cosine": 0.9999, "passed": True}],
                },
            }
            (folder / E.ENGINE_MANIFEST).write_text(json.dumps(manifest))

    return build


def test_build_engines_root_keeps_valid_engines_and_switches_only_to_validated_ones(tiny_export, tmp_path, monkeypatch):
    """Issue 26: compose's engines service ran `repo --force` on every `up`, deleting working engines
    before a rebuild, and a failed rebuild left nothing to serve. Now: ROOT/current is kept when it
    matches; a config change relinks the engines; a rebuild happens in a new folder and is switched to
    in one rename once validated; a failed one leaves the old repository serving."""
    from .gpu_twin import fake_gpu_env

    env = fake_gpu_env(tmp_path / "gpu")
    monkeypatch.setenv("PATH", env["PATH"])
    monkeypatch.setenv("TRT_VERSION", env["TRT_VERSION"])
    root, calls, lines = tmp_path / "models", [], []
    first = E.deploy_engines(tiny_export, root, log=lines.append, build=_fake_build(calls))
    target = (root / "current").resolve()
    assert first == root / "current" and (root / "current").is_symlink() and len(calls) == 1
    assert E.check_repository_engines(root / "current", onnx_dir=tiny_export)
    plan = target / C.VISION_MODEL / "1" / C.PLAN_FILE

    def refuse(*args):
        raise AssertionError("rebuilt engines that were current")

    # `up` again: nothing written, nothing built.
    E.deploy_engines(tiny_export, root, log=lines.append, build=refuse)
    assert (root / "current").resolve() == target and any("reusing" in line for line in lines)
    # A new clip-triton writes other configs: new folder, the same engines (hard links), no build.
    config = target / C.TEXT_ENSEMBLE / "config.pbtxt"
    config.write_text(config.read_text().replace("max_batch_size: 64", "max_batch_size: 63"))
    E.deploy_engines(tiny_export, root, log=lines.append, build=refuse)
    relinked = (root / "current").resolve()
    assert relinked != target and (relinked / C.VISION_MODEL / "1" / C.PLAN_FILE).stat().st_ino == plan.stat().st_ino
    assert E.repository_is_current(root / "current", tiny_export) is None
    # Another TensorRT: a rebuild, which fails: the live repository is untouched, the attempt removed.
    monkeypatch.setenv("TRT_VERSION", "10.14.1.0")

    def failing(onnx_dir, repo, options, log):
        raise VerificationError("engine disagrees with open_clip PyTorch", "do not serve it")

    with pytest.raises(VerificationError):
        E.deploy_engines(tiny_export, root, log=lines.append, build=failing)
    assert (root / "current").resolve() == relinked and sorted(p.name for p in (root / "builds").iterdir()) == sorted(
        {target.name, relinked.name}
    )
    # ... and one that succeeds is switched to; only the previous build is kept besides it.
    E.deploy_engines(tiny_export, root, log=lines.append, build=_fake_build(calls))
    assert (root / "current").resolve() not in (target, relinked) and len(calls) == 2
    assert sorted(p.name for p in (root / "builds").iterdir()) == sorted(
        {relinked.name, (root / "current").resolve().name}
    )
