"""``clip-triton build-engines``: TensorRT engines for both towers, validated against PyTorch.

Runs on a GPU host inside the TensorRT container of the same NGC release as the Triton image that
will serve the engines (engines are tied to the TensorRT version and the GPU). The ONNX graphs are
parsed by file path, so their external data loads. One declaration, the contract's batch profile,
drives the ONNX export's dynamic axis, the TensorRT optimisation profile and Triton's
``max_batch_size``; the text tower gets one profile per sequence-length bucket of the contract
(Triton's TensorRT backend picks, per batch, a profile whose range holds its shape, among those the
instance group lists: clip_triton/profiles.py).

Strongly typed networks (TensorRT >= 10.12) take their precision from the fp16 ONNX graph, which
keeps LayerNorm and Softmax in float32; on older TensorRT the weakly typed fallback sets the FP16
builder flag instead (deprecated in 10.12, removed in 11).
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from clip_triton.contract import MANIFEST, PLAN_FILE, SINGLE, TOLERANCES, TOWERS, ModelContract, ModelNames
from clip_triton.contract import tower as tower_spec
from clip_triton.errors import ClipTritonError, VerificationError
from clip_triton.profiles import Profile, profile_index, profiles_for
from clip_triton.progress import Progress

ENGINE_MANIFEST = "engine.json"
TIMING_CACHE = "timing.cache"
TIMING_CACHE_PLATFORM = ".platform.json"  # beside the cache: the TensorRT and GPU that built it
ENGINE_TOLERANCE = "tensorrt"  # the key of contract.TOLERANCES that engines must meet
MIN_ENGINE_COSINE = TOLERANCES[ENGINE_TOLERANCE]["min_cosine"]
STRONGLY_TYPED_SINCE = (10, 12)
# The TensorRT inside the pinned NGC release (deploy/Dockerfile ARG TRITON_RELEASE=25.10). Pinned once
# here; the [gpu] extra, the Dockerfile's build-time check and README repeat it, and a test keeps
# them equal. TensorRT 11 removed BuilderFlag.FP16, which `--typing weak` needs.
TENSORRT_PIN = "10.13.3.9"


def parse_version(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split("."):
        digits = "".join(ch for ch in piece if ch.isdigit())
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def strongly_typed_supported(version: str) -> bool:
    return parse_version(version)[:2] >= STRONGLY_TYPED_SINCE


@dataclass(frozen=True)
class Platform:
    """What an engine is tied to."""

    tensorrt: str
    gpu: str
    compute_capability: str


def gpu_identity() -> tuple[str, str]:
    """(name, compute capability) of GPU 0, from nvidia-smi."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,compute_cap", "--format=csv,noheader", "--id=0"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        raise ClipTritonError(
            "no NVIDIA GPU found (nvidia-smi failed)",
            "build engines on the GPU host that will serve them, in the TensorRT container",
        ) from None
    name, capability = (field.strip() for field in out.splitlines()[0].split(","))
    return name, capability


def tensorrt_version() -> str:
    """The TensorRT in this environment: the Python package, else libnvinfer itself (the Triton
    container has the library, not the bindings), else the NGC containers' TRT_VERSION variable."""
    try:
        import tensorrt  # noqa: PLC0415

        return tensorrt.__version__
    except ImportError:
        pass
    for soname in ("libnvinfer.so.11", "libnvinfer.so.10"):
        try:
            code = ctypes.CDLL(soname).getInferLibVersion()  # major * 10000 + minor * 100 + patch
        except (OSError, AttributeError):
            continue
        return f"{code // 10000}.{code // 100 % 100}.{code % 100}"
    if os.environ.get("TRT_VERSION"):
        return os.environ["TRT_VERSION"]
    raise ClipTritonError(
        "TensorRT is not installed",
        "run inside nvcr.io/nvidia/tensorrt:<release>-py3 (docker compose run engines) "
        "or pip install 'clip-triton[gpu]'",
    )


def require_tensorrt(expected: str) -> str:
    """The TensorRT of this environment, or exit non-zero naming both versions when it is not
    ``expected`` (major.minor.patch: the Triton image's libnvinfer reports no build number). The
    Dockerfile runs it in the engines and the triton images at build time: an image of another
    TensorRT than the pin fails to build instead of failing to load engines on the GPU host."""
    found = tensorrt_version()
    if parse_version(found)[:3] != parse_version(expected)[:3]:
        raise SystemExit(
            f"TensorRT {found} in this image, clip-triton pins {expected}: update the Dockerfile's "
            "TENSORRT_VERSION and clip_triton.export.engines.TENSORRT_PIN together"
        )
    print(f"TensorRT {found} (pinned: {expected})")
    return found


def current_platform() -> Platform:
    version = tensorrt_version()
    name, capability = gpu_identity()
    return Platform(version, name, capability)


def check_engine_manifest(manifest: dict, platform: Platform, where: str = "engine") -> None:
    """Refuse an engine that failed its validation, or was built for another TensorRT version or GPU."""
    validation = manifest.get("validation") or {}
    checks = validation.get("checks") or []
    if validation.get("passed") is not True or not checks or not all(c.get("passed") for c in checks):
        worst = min((c.get("min_cosine", float("nan")) for c in checks), default=float("nan"))
        raise ClipTritonError(
            f"{where} did not pass its validation against open_clip PyTorch (min cosine {worst:.6f}, "
            f"needs >= {validation.get('min_cosine', MIN_ENGINE_COSINE)})",
            "do not serve it: rebuild with `clip-triton build-engines` (try --optimization-level 5 or an fp32 export)",
        )
    built = Platform(**manifest["platform"])
    if parse_version(built.tensorrt)[:3] != parse_version(platform.tensorrt)[:3]:
        raise ClipTritonError(
            f"engine built with TensorRT {built.tensorrt}, but this environment has TensorRT {platform.tensorrt}",
            "rebuild with `clip-triton build-engines` in the TensorRT container of the serving Triton release",
        )
    if built.compute_capability != platform.compute_capability or built.gpu != platform.gpu:
        raise ClipTritonError(
            f"engine built for {built.gpu} (sm {built.compute_capability}), this GPU is "
            f"{platform.gpu} (sm {platform.compute_capability})",
            "rebuild the engines on the GPU type that will serve them",
        )


def check_repository_engines(
    repo: str | Path,
    platform: Platform | None = None,
    onnx_dir: str | Path | None = None,
    names: ModelNames | None = None,
) -> list[str]:
    """Check every engine in a repository against this host before Triton loads them.

    Each encoder's plan needs its ``engine.json`` saying it passed validation on this TensorRT and GPU.
    With ``onnx_dir``, the engines must also have been built from exactly those graphs (sha256 of
    each graph and its external data): then they are current and need no rebuild. ``names``: one
    served model's (None: every served model in the repository, found by its manifest copies).
    """
    platform = platform or current_platform()
    if names is None:
        if onnx_dir is not None:
            names = SINGLE
        else:
            return [
                m for n in repository_model_names(Path(repo)) for m in check_repository_engines(repo, platform, None, n)
            ]
    checked = []
    for spec in TOWERS:
        tower, model = spec.name, names.encoder(spec)
        folder = Path(repo) / model / "1"
        plan, manifest_path = folder / PLAN_FILE, folder / ENGINE_MANIFEST
        if not plan.is_file():
            raise ClipTritonError(f"{plan} is missing", "run `clip-triton build-engines` first")
        if not manifest_path.is_file():
            raise ClipTritonError(
                f"{plan} has no {ENGINE_MANIFEST}: nothing says it was validated",
                "rebuild it with `clip-triton build-engines`, which validates and records it",
            )
        manifest = json.loads(manifest_path.read_text())
        check_engine_manifest(manifest, platform, where=str(plan))
        check_engine_profiles(
            manifest, Path(repo) / model / "config.pbtxt", Path(repo) / names.front(spec) / "config.pbtxt", str(plan)
        )
        if onnx_dir is not None:
            built_from, now = manifest.get("onnx", {}), graph_identity(Path(onnx_dir), tower)
            if {k: built_from.get(k) for k in ("sha256", "data_sha256")} != {
                k: now[k] for k in ("sha256", "data_sha256")
            }:
                raise ClipTritonError(
                    f"{plan} was built from other graphs than {now['file']}", "rebuild with `clip-triton build-engines`"
                )
        checked.append(model)
    return checked


def repository_model_names(repo: Path) -> list[ModelNames]:
    """The served models of a repository (the single-model names where it holds none: the checks then
    say what is missing)."""
    from clip_triton.footprint import served_names  # noqa: PLC0415

    return (served_names(repo) if repo.is_dir() else []) or [SINGLE]


def recorded_profiles(contract: ModelContract, tower: str) -> list[dict]:
    """The profiles as ``engine.json`` records them (JSON lists), from the one declaration."""
    return [json.loads(json.dumps(asdict(profile))) for profile in profiles_for(contract, tower)]


def _ranges(profiles: list[dict]) -> str:
    return "; ".join(f"{i}: {list(p['min'])}..{list(p['max'])}" for i, p in enumerate(profiles))


def check_engine_profiles(manifest: dict, config_path: Path, front_config_path: Path, where: str) -> None:
    """Refuse an engine whose optimisation profiles (recorded in ``engine.json`` by build-engines) are
    not the ones its config makes available, or not the ones the repository's contract declares.

    Triton's TensorRT backend creates a context only for the profiles an instance group lists, and for
    profile 0 alone when it lists none (clip_triton/profiles.py cites the source): an engine with a
    profile per text bucket behind a config without the list serves the first bucket only, and its
    warm-ups at the others fail the load."""
    from clip_triton.repository import parse  # noqa: PLC0415 (the repository layer reads configs)

    recorded = manifest.get("profiles")
    if not recorded:
        raise ClipTritonError(
            f"{where}: its engine.json records no optimisation profiles, so nothing says which shapes it serves",
            "rebuild it with `clip-triton build-engines`, which records them",
        )
    config = parse(config_path.read_text())
    for group in config.instance_group:
        listed = list(group.profile) or ["0"]  # what the backend does with no list
        if sorted(set(listed), key=int) != [str(i) for i in range(len(recorded))]:
            raise ClipTritonError(
                f"{config_path} makes profiles {listed if group.profile else '[] (so profile 0 alone)'} of {where} "
                f"available, but the engine has {len(recorded)}: {_ranges(recorded)}. Triton's TensorRT backend "
                "serves only the listed profiles, and requests of other shapes fail",
                "rewrite the repository with `clip-triton repo --runtime tensorrt` (it lists every profile)",
            )
    front = parse(front_config_path.read_text()) if front_config_path.is_file() else None
    if front is not None and "contract" in front.parameters:
        contract = ModelContract.from_json(front.parameters["contract"].string_value)
        expected = recorded_profiles(contract, config.parameters["tower"].string_value)
        if recorded != expected:
            raise ClipTritonError(
                f"{where} was built with profiles {_ranges(recorded)}, but the repository's contract declares "
                f"{_ranges(expected)}",
                "rebuild the engines with `clip-triton build-engines` from this repository's export",
            )


def graph_identity(onnx_dir: Path, tower: str) -> dict:
    """What an engine is built from: the graph file and its external data, by sha256."""
    path = onnx_dir / tower_spec(tower).onnx_file
    if not path.is_file():
        raise ClipTritonError(f"{path} not found", "run `clip-triton export` into that folder first")
    data = path.with_name(path.name + ".data")
    return {"file": str(path), "sha256": sha256(path), "data_sha256": sha256(data) if data.is_file() else None}


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(16 * 1024 * 1024):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class BuildOptions:
    optimization_level: int = 3  # TensorRT builder optimisation level, 0-5
    workspace_gib: float = 8.0
    timing_cache: str | None = None  # default: <repo>/timing.cache, reused across builds
    strongly_typed: bool | None = None  # default: when TensorRT >= 10.12

    def __post_init__(self):
        if not 0 <= self.optimization_level <= 5:
            raise ClipTritonError(f"optimization level {self.optimization_level} is outside 0-5")
        if self.workspace_gib <= 0:
            raise ClipTritonError("workspace must be positive")


def read_timing_cache(path: Path, platform: Platform, log: Progress) -> bytes:
    """The timing cache's bytes, or none when it was built by another TensorRT or GPU (timings do not
    transfer; TensorRT may also refuse the cache). The platform is recorded beside the cache."""
    if not path.is_file():
        return b""
    meta = path.with_name(path.name + TIMING_CACHE_PLATFORM)
    try:
        built = json.loads(meta.read_text())
    except (OSError, ValueError):
        built = None
    if built != asdict(platform):
        log(
            f"dropping timing cache {path}: built by {built or 'an unrecorded TensorRT/GPU'}, "
            f"this is TensorRT {platform.tensorrt} on {platform.gpu}"
        )
        return b""
    return path.read_bytes()


def write_timing_cache(path: Path, data: bytes, platform: Platform) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    path.with_name(path.name + TIMING_CACHE_PLATFORM).write_text(json.dumps(asdict(platform)) + "\n")


def apply_timing_cache(config, data: bytes, log: Progress) -> None:
    """Attach a timing cache to a TensorRT builder config, checking TensorRT's answer: a cache it
    refuses is replaced by an empty one rather than silently ignored."""
    if config.set_timing_cache(config.create_timing_cache(data), ignore_mismatch=False):
        return
    log("TensorRT refused the timing cache (another TensorRT version or GPU); starting an empty one")
    if not config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False):
        raise ClipTritonError("TensorRT refused an empty timing cache", "pass --timing-cache to a new file path")


def build_engine(
    onnx_path: Path,
    plan_path: Path,
    profiles: tuple[Profile, ...],
    precision: str,
    options: BuildOptions,
    cache_path: Path,
    platform: Platform,
    log: Progress,
) -> dict:  # pragma: no cover - needs a GPU
    import tensorrt as trt  # noqa: PLC0415

    strongly = (
        options.strongly_typed if options.strongly_typed is not None else strongly_typed_supported(trt.__version__)
    )
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if strongly else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    log(f"parsing {onnx_path} ({'strongly' if strongly else 'weakly'} typed)")
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ClipTritonError(f"TensorRT could not parse {onnx_path}: {errors}", "re-export with a supported opset")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(options.workspace_gib * 1024**3))
    config.builder_optimization_level = options.optimization_level
    if not strongly and precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)  # weakly typed fallback for TensorRT < 10.12
    apply_timing_cache(config, read_timing_cache(cache_path, platform, log), log)
    for profile in profiles:
        trt_profile = builder.create_optimization_profile()
        trt_profile.set_shape(profile.input_name, profile.min, profile.opt, profile.max)
        config.add_optimization_profile(trt_profile)
    if hasattr(trt, "IProgressMonitor"):
        config.progress_monitor = _progress_monitor(trt, log)
    started = time.monotonic()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ClipTritonError(f"TensorRT failed to build {plan_path}", "see the TensorRT log above")
    plan_path.write_bytes(bytes(serialized))
    write_timing_cache(cache_path, bytes(config.get_timing_cache().serialize()), platform)
    # The activation memory one execution context needs (TensorRT >= 10.1 names it _v2), beside the
    # plan's own bytes: what each instance of this engine costs on the GPU (clip_triton/footprint.py).
    engine = trt.Runtime(logger).deserialize_cuda_engine(bytes(serialized))
    device = getattr(engine, "device_memory_size_v2", None) or getattr(engine, "device_memory_size", 0)
    return {
        "strongly_typed": strongly,
        "build_seconds": round(time.monotonic() - started, 1),
        "device_memory_bytes": int(device),
        "plan_bytes": plan_path.stat().st_size,
    }


def _progress_monitor(trt, log: Progress, enabled: bool | None = None):
    """TensorRT's builder progress as bars on stderr (one per top-level phase, with rate and ETA), and
    the phase names as log lines. Returning True from ``step_complete`` lets the build go on."""
    from clip_triton.progress import bar  # noqa: PLC0415

    class Monitor(trt.IProgressMonitor):
        def __init__(self):
            trt.IProgressMonitor.__init__(self)
            self.bars = {}

        def phase_start(self, phase_name, parent_phase, num_steps):
            if parent_phase is None:
                log(f"TensorRT: {phase_name} ({num_steps} steps)")
                self.bars[phase_name] = bar(num_steps, f"TensorRT {phase_name}", unit="step", enabled=enabled)

        def step_complete(self, phase_name, step):
            if phase_name in self.bars:
                self.bars[phase_name].update(1)
            return True

        def phase_finish(self, phase_name):
            progress = self.bars.pop(phase_name, None)
            if progress is not None:
                progress.close()

    return Monitor()


def polygraphy_runner(plan_path: Path):  # pragma: no cover - needs a GPU and TensorRT
    """Polygraphy's TensorRT runner for a serialized engine (it handles device buffers and streams)."""
    from polygraphy.backend.common import BytesFromPath  # noqa: PLC0415
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner  # noqa: PLC0415

    return TrtRunner(EngineFromBytes(BytesFromPath(str(plan_path))))


def run_engine(
    plan_path: Path, profiles: tuple[Profile, ...], batches: list[np.ndarray], runner=None
) -> list[np.ndarray]:
    """Execute an engine on host arrays, one output array per batch, each in the profile that holds
    its shape (as Triton picks it; ``TrtRunner.set_profile``).

    Polygraphy's ``TrtRunner.infer`` returns views of host buffers that it reuses for the next call,
    so each output is copied before the next batch runs (a view would end up holding the last batch).
    """
    outputs = []
    with runner if runner is not None else polygraphy_runner(plan_path) as active:
        for x in batches:
            if len(profiles) > 1:
                active.set_profile(profile_index(profiles, x.shape))
            result = active.infer({profiles[0].input_name: x})
            outputs.append(np.array(next(iter(result.values())), dtype=np.float32, copy=True))
    return outputs


def validate_engine(tower: str, cases, reference, outputs) -> list[dict]:
    """Engine outputs vs open_clip PyTorch fp32, with verify's comparison at the engine tolerance
    (cosine >= MIN_ENGINE_COSINE for every embedding); rows as ``engine.json`` records them."""
    from . import verify as V  # noqa: PLC0415

    return V.as_dicts(V.compare(tower, cases, reference, outputs, ENGINE_TOLERANCE))


def validate_plan(
    tower: str,
    plan_path: Path,
    profiles: tuple[Profile, ...],
    contract: ModelContract,
    references: list,
    runner=None,
) -> list[dict]:
    """Run an engine on the export's reference inputs (text at every bucket) and compare with the
    PyTorch references; plus a copy of one batch with a refused row, which must come back NaN with
    every other row unchanged (verify ``check_refusal``: the engine keeps the graph's ``Where``)."""
    from . import verify as V  # noqa: PLC0415

    cases = [(label, x.astype(profile_dtype(contract, tower))) for label, x, _ in references]
    cases, index = V.with_refusal(contract, tower, cases)
    outputs = run_engine(plan_path, profiles, [x for _, x in cases], runner=runner)
    checks = validate_engine(tower, cases[:-1], [ref for _, _, ref in references], outputs[:-1])
    return [*checks, *V.as_dicts([V.check_refusal(tower, outputs[index], outputs[-1])])]


def build_engines(
    onnx_dir: str | Path,
    repo: str | Path,
    options: BuildOptions = BuildOptions(),
    log: Progress | None = None,
    names: ModelNames = SINGLE,
) -> dict:  # pragma: no cover - needs a GPU and TensorRT
    """Build, place and validate each encoder's TensorRT plan (``<encoder>/1/``, name from the contract;
    ``names``: the served model's, in a repository of several)."""
    from .pipeline import REFERENCES, load_references, read_manifest  # noqa: PLC0415

    log = log or Progress("engines")
    onnx_dir, repo = Path(onnx_dir), Path(repo)
    manifest = read_manifest(onnx_dir)
    contract = ModelContract.from_dict(manifest["contract"])
    platform = current_platform()
    log(f"TensorRT {platform.tensorrt} on {platform.gpu} (sm {platform.compute_capability})")
    if parse_version(platform.tensorrt)[:3] != parse_version(TENSORRT_PIN)[:3]:
        log(f"note: TensorRT {platform.tensorrt} is not the tested {TENSORRT_PIN} (NGC release of deploy/Dockerfile)")
    references = load_references(onnx_dir / REFERENCES) if (onnx_dir / REFERENCES).exists() else None
    if references is None:
        raise ClipTritonError(f"{onnx_dir / REFERENCES} missing", "re-run `clip-triton export` with verification on")
    cache_path = Path(options.timing_cache) if options.timing_cache else repo / TIMING_CACHE
    report = {}
    for spec in TOWERS:
        tower, model = spec.name, names.encoder(spec)
        folder = repo / model / "1"
        if not (repo / model / "config.pbtxt").is_file():
            raise ClipTritonError(
                f"{repo / model} is not a model folder",
                "write the repository first: clip-triton repo --runtime tensorrt --onnx-dir DIR --out REPO",
            )
        folder.mkdir(parents=True, exist_ok=True)
        profiles = profiles_for(contract, tower)
        onnx_path = onnx_dir / spec.onnx_file
        for profile in profiles:
            log(f"building {model}: profile min {profile.min} opt {profile.opt} max {profile.max}")
        built = build_engine(
            onnx_path, folder / PLAN_FILE, profiles, contract.precision, options, cache_path, platform, log
        )
        checks = validate_plan(tower, folder / PLAN_FILE, profiles, contract, references[tower])
        engine_manifest = {
            "platform": asdict(platform),
            "onnx": graph_identity(onnx_dir, tower),
            "profiles": recorded_profiles(contract, tower),
            "precision": contract.precision,
            "builder": {**asdict(options), **built},
            "validation": {
                "reference": "open_clip PyTorch fp32",
                "min_cosine": MIN_ENGINE_COSINE,
                "checks": checks,
                "passed": all(row["passed"] for row in checks),
            },
            "model": manifest["model"],
            "pretrained": manifest["pretrained"],
            "device_memory_bytes": built.get("device_memory_bytes"),  # activations, per instance
        }
        (folder / ENGINE_MANIFEST).write_text(json.dumps(engine_manifest, indent=2) + "\n")
        for row in checks:
            log(
                f"{tower} {row['inputs']} batch {row['batch']}: cosine {row['min_cosine']:.6f} "
                f"{'ok' if row['passed'] else 'FAIL'}"
            )
        if not engine_manifest["validation"]["passed"]:
            raise VerificationError(
                f"{model} engine disagrees with open_clip PyTorch (cosine < {MIN_ENGINE_COSINE})",
                "do not serve it; try --optimization-level 5 or an fp32 export",
            )
        report[model] = engine_manifest
    (repo / (names.of(Path(MANIFEST).stem) + Path(MANIFEST).suffix)).write_text(json.dumps(manifest, indent=2) + "\n")
    return report


def profile_dtype(contract: ModelContract, tower: str) -> str:
    spec, _ = contract.encoder_io(tower)
    return spec.dtype


CURRENT = "current"  # ROOT/current: the served repository, a relative link to ROOT/builds/<id>
BUILDS = "builds"


Exports = list[tuple[str | Path | None, str | None]]  # (export folder, served name): see repository.served_exports


def repository_is_current(repo: Path, onnx_dir: Path | None = None, exports: Exports | None = None) -> str | None:
    """Why ``repo`` is not what ``clip-triton repo --runtime tensorrt`` would write now for ``onnx_dir``
    (or each of ``exports``) with engines built from it on this TensorRT and GPU, or None when it is
    (nothing to do)."""
    from clip_triton.repository import RepoOptions, repository_files, served_exports  # noqa: PLC0415

    models = served_exports(exports if exports is not None else [(onnx_dir, None)])
    expected = {entry.name for entry in repo.iterdir()} if repo.is_dir() else set()
    written = set()
    for model in models:
        try:
            check_repository_engines(repo, onnx_dir=model.onnx_dir, names=model.names)
        except ClipTritonError as exc:
            return exc.message
        options = RepoOptions(runtime="tensorrt", served_model_name=model.served_model_name)
        for path, text in repository_files(model.facts, options, model.names).items():
            if not (repo / path).is_file() or (repo / path).read_text() != text:
                return f"{path} differs from what this version writes"
            written.add(path.split("/")[0])
    others = {name for name in expected - written if (repo / name / "config.pbtxt").is_file()}
    if others:
        return f"{repo} also serves {', '.join(sorted(others))}, which the exports given do not"
    return None


def deploy_engines(
    onnx_dir: str | Path | None,
    root: str | Path,
    options: BuildOptions = BuildOptions(),
    log: Progress | None = None,
    build=None,
    exports: Exports | None = None,
) -> Path:
    """The engines service of docker-compose.yml: serve ``ROOT/current``, replaced only by a validated one.

    * Current already (:func:`repository_is_current`): nothing is written; seconds.
    * Only the configs changed (a new clip-triton) and the engines still match the graphs, TensorRT and
      GPU: a new build folder gets the new configs and hard links to the engines; no TensorRT build.
    * Otherwise the engines are built into a new folder under ``ROOT/builds`` and validated there.

    Then ``ROOT/current`` is switched to the new folder in one atomic rename; until then (and when the
    build fails, whose folder is removed) the previous repository stays in place, whole. The previous
    build is kept for a manual rollback; older ones are removed. ``build`` (tests) stands for
    :func:`build_engines`. ``exports``: several served models, ``(export folder, served name)`` each,
    in one repository (their engines built, kept or relinked each on its own)."""
    import shutil  # noqa: PLC0415

    from clip_triton.repository import RepoOptions, served_exports, write_repository  # noqa: PLC0415

    log = log or Progress("engines")
    root = Path(root)
    exports = exports if exports is not None else [(Path(onnx_dir) if onnx_dir is not None else None, None)]
    models = served_exports(exports)
    current = root / CURRENT
    reason = repository_is_current(current, exports=exports) if current.exists() else f"{current} does not exist yet"
    if reason is None:
        log(f"reusing {current} -> {os.readlink(current)}: engines match the export, TensorRT and GPU")
        return current
    log(f"building a new repository: {reason}")
    staging = root / BUILDS / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.urandom(3).hex()}"
    try:
        write_repository(staging, options=RepoOptions(runtime="tensorrt"), exports=exports)
        for model in models:
            assert model.onnx_dir is not None, "engines are built from an export"
            if not (current.exists() and _relinked(current, staging, model.onnx_dir, model.names)):
                extra = {"names": model.names} if model.names != SINGLE else {}
                (build or build_engines)(model.onnx_dir, staging, options, log, **extra)
            else:
                log(f"{model.served_model_name}: the engines still match: kept (linked), configs rewritten")
            check_repository_engines(staging, onnx_dir=model.onnx_dir, names=model.names)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        log(f"nothing replaced: {current} is left as it was")
        raise
    link = root / f".{CURRENT}.{os.getpid()}"
    link.unlink(missing_ok=True)
    link.symlink_to(staging.relative_to(root))  # relative: valid wherever the volume is mounted
    previous = os.readlink(current) if current.is_symlink() else None
    os.replace(link, current)
    log(f"{current} -> {staging.relative_to(root)}")
    for old in (root / BUILDS).iterdir():
        if old != staging and (previous is None or old != root / previous):
            shutil.rmtree(old, ignore_errors=True)
    return current


def _relinked(current: Path, staging: Path, onnx_dir: Path, names: ModelNames = SINGLE) -> bool:
    """Hard-link ``current``'s plans and engine.json into ``staging`` (new configs) and keep them when
    :func:`check_repository_engines` passes them there (validated on this TensorRT and GPU, built from
    these graphs, profiles as the new configs and the contract list them). Otherwise the links are
    removed, so a build never writes through them into the served files, and False is returned."""
    linked = []
    try:
        for spec in TOWERS:
            model = names.encoder(spec)
            for name in (PLAN_FILE, ENGINE_MANIFEST):
                os.link(current / model / "1" / name, staging / model / "1" / name)
                linked.append(staging / model / "1" / name)
        check_repository_engines(staging, onnx_dir=onnx_dir, names=names)
        return True
    except (OSError, ValueError, ClipTritonError):
        for path in linked:
            path.unlink(missing_ok=True)
        return False
