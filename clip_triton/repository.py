"""Triton model repository for clip-triton, rendered from the contract through Triton's ModelConfig.

The folder tree is the serving graph::

    image ensemble: image bytes --> preprocess --> pixels    --> vision encoder --> embedding
    text ensemble:  strings     --> tokenizer  --> token ids --> text encoder   --> embedding
    (names, tensors and files: clip_triton/contract.py, one Tower each)

``preprocess`` and ``tokenizer`` are python-backend models (PIL/numpy, no torch). The encoders come in
four interchangeable runtimes with one signature: ``tensorrt`` (``tensorrt_plan``, GPU),
``onnxruntime`` (Triton's ONNX Runtime backend, NGC container), ``openvino`` (Triton's OpenVINO
backend, CPU, bf16) and ``python`` (python-backend models running the exported ONNX with ONNX Runtime
or OpenVINO: the pip-installed Triton has neither backend).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

from google.protobuf import text_format

from .contract import (
    ENCODER_IR_FILE,
    ENCODER_ONNX_FILE,
    EXPORT_FORMAT,
    HF_TOKENIZER_DIR,
    HF_TOKENIZER_FILE,
    IMAGE_ENSEMBLE,
    MANIFEST,
    OUTPUT_DESCRIPTIONS,
    PLAN_FILE,
    PREPROCESS_MODEL,
    RESPONSE_CACHE_CHOICES,
    RUNTIMES,
    SINGLE,
    TEXT,
    TEXT_ENSEMBLE,
    TEXT_MODEL,
    TOKENIZER_MODEL,
    TOKENS_OUTPUT,
    TOWERS,
    VISION,
    VISION_MODEL,
    ModelContract,
    ModelNames,
    TensorSpec,
    Tower,
    check_served_model_name,
)
from .cpuruntime import check_cpu_runtime, resolve_cpu_runtime
from .errors import ClipTritonError
from .facts import ServerFacts
from .preprocess import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS
from .profiles import profile_names
from .tokenizer import DEFAULT_MAX_TEXT_CHARS

MODELS = (PREPROCESS_MODEL, TOKENIZER_MODEL, VISION_MODEL, TEXT_MODEL, IMAGE_ENSEMBLE, TEXT_ENSEMBLE)
PYTHON_MODELS = {
    PREPROCESS_MODEL: "clip_triton.serving.preprocess_model",
    TOKENIZER_MODEL: "clip_triton.serving.tokenizer_model",
    "encoder": "clip_triton.serving.encoder_model",
}
# The committed repository is the production default. Its logit_scale cannot be read from weights
# here; open_clip clamps logit_scale at ln(100) during training and LAION's runs end at the clamp.
# `clip-triton repo --onnx-dir` (which docker compose runs) replaces it with the checkpoint's value.
ASSUMED_LOGIT_SCALE = 100.0
# What OpenVINO fp32 gains over ONNX Runtime where auto falls back (docs/benchmarks.md), for runtime_note.
OPENVINO_FP32_GAIN = "1.16-1.25x on 16-image requests"


def _pb2():
    try:
        from tritonclient.grpc import model_config_pb2  # noqa: PLC0415
    except ImportError as exc:  # pragma: no cover
        raise ClipTritonError("tritonclient is not installed", "pip install 'clip-triton[client]'") from exc
    return model_config_pb2


def cached_towers(setting: str) -> tuple[Tower, ...]:
    """The towers whose answers Triton's response cache keeps for a ``response_cache`` setting.

    Each is served as two ensembles (contract ``TEXT_CACHED``): the public one, never cached, whose
    single step is the inner one, cached. Triton keys an entry on the model and its input tensors, not
    on the outputs a request names (core ``cache_manager.cc`` ``Hash``), and an ensemble's response holds
    only the outputs its request named (``ensemble_scheduler.cc`` ``CheckAndSetEnsembleOutput``); a
    step's request names every output of its step (``AddOriginalRequestedOutput`` over the step's
    output map), so every entry of the inner ensemble holds EMBEDDING and STATUS, whatever a client
    asked of the public one. Ensembles cache only successful responses (``FinishEnsemble``), unlike a
    dynamic-batched model, which caches its error responses as entries without outputs
    (``DelegateResponse``): caching the composing models was tried and rejected for that. An entry is
    cached only when all its outputs lie in CPU memory (``cache_entry.cc``): on GPU runtimes the
    encoder's output reaches the inner ensemble's response in GPU memory unless Triton has no CUDA
    pool to put it in, so the GPU deployments run Triton with ``--cuda-memory-pool-byte-size=0:0``
    (docker-compose.yml and the Kubernetes Deployment; tests/test_gpu_path.py checks both;
    docs/benchmarks.md has the layouts measured)."""
    return {"none": (), "text": (TEXT,), "all": TOWERS}[setting]


def served_models(options: RepoOptions, names: ModelNames = SINGLE) -> tuple[str, ...]:
    """Every Triton model a repository written with ``options`` holds for one served model."""
    return (
        *(names.of(model) for model in MODELS),
        *(names.cached(tower) for tower in cached_towers(options.response_cache)),
    )


@dataclass(frozen=True)
class RepoOptions:
    runtime: str = "tensorrt"
    max_batch_size: int | None = None  # default: the contract's batch.max (= TensorRT profile max)
    queue_delay_us: int | None = None  # default: 500 (GPU) / 2000 (CPU python encoders)
    encoder_instances: int = 1
    preprocess_instances: int | None = None  # default: 8 on GPU runtimes, one per core for --runtime python
    tokenizer_instances: int = 1
    # --runtime python: what runs the graphs (onnxruntime | openvino | auto: OpenVINO where the export
    # holds its IR and OpenVINO is installed, else ONNX Runtime; resolved per export by `resolved`)
    cpu_runtime: str = "auto"
    cpu_precision: str = "fp32"  # CPU encoders: fp32, or bf16 (OpenVINO; AMX/AVX512-BF16 CPUs)
    encoder_threads: int = 0  # CPU encoders: threads per instance, 0 = all cores
    ort_spinning: bool = True  # ONNX Runtime encoders: let idle threads busy-wait (ORT's default)
    max_image_pixels: int | None = None
    max_image_bytes: int | None = None
    max_text_chars: int = DEFAULT_MAX_TEXT_CHARS
    warmup: bool = True
    served_model_name: str | None = None  # public model id (gateway, clients); default: the architecture name
    # Which towers answer repeated inputs from Triton's response cache (the server needs
    # --cache-config; `clip-triton serve` sets it): text (prompts repeat), all (images too, keyed on
    # their bytes) or none. Exact: the key hashes the whole request (model, inputs and their bytes).
    # Cached at an inner ensemble that every request reaches naming both outputs (cached_towers).
    response_cache: str = "text"
    # OpenVINO runtimes serve the IR converted from the module when the export has one (`export
    # --openvino-ir`: faster than OpenVINO on the ONNX, docs/benchmarks.md); False: the ONNX graphs.
    openvino_ir: bool = True

    def __post_init__(self):
        if self.runtime not in RUNTIMES:
            raise ClipTritonError(f"unknown runtime {self.runtime!r}", f"choose one of {RUNTIMES}")
        runtime = resolve_cpu_runtime(self.cpu_runtime, self.cpu_precision)  # auto: checked as ONNX Runtime
        check_cpu_runtime(runtime)
        # Triton's own OpenVINO backend is the engine for --runtime openvino, whatever --cpu-engine says.
        check_cpu_runtime("openvino" if self.runtime == "openvino" else runtime, self.cpu_precision)
        if self.served_model_name is not None:
            check_served_model_name(self.served_model_name)
        if self.response_cache not in RESPONSE_CACHE_CHOICES:
            raise ClipTritonError(
                f"unknown response cache setting {self.response_cache!r}", f"choose one of {RESPONSE_CACHE_CHOICES}"
            )
        if self.runtime == "openvino" and self.cpu_precision != "bf16":
            raise ClipTritonError(
                "Triton's OpenVINO backend cannot force fp32: on bf16-capable CPUs OpenVINO computes in bf16",
                "pass --cpu-precision bf16 to state it, or serve exact fp32 with --runtime python",
            )

    def resolved(self, facts: ExportFacts) -> RepoOptions:
        """These options with ``cpu_runtime`` ``auto`` made concrete for ``facts``' export."""
        runtime = resolve_cpu_runtime(self.cpu_runtime, self.cpu_precision, facts.has_openvino_ir and self.openvino_ir)
        return self if runtime == self.cpu_runtime else replace(self, cpu_runtime=runtime)

    def runtime_note(self, facts: ExportFacts) -> str | None:
        """Why ``--cpu-runtime auto`` serves ONNX Runtime for ``facts``' export and how to get OpenVINO fp32
        (exact, and the faster fp32 forward here: docs/benchmarks.md), or None where nothing is missed.
        """
        from . import cpuruntime  # noqa: PLC0415 (the module's own openvino_installed: tests patch it)

        chosen = self.resolved(facts)
        if self.runtime != "python" or self.cpu_runtime != "auto" or chosen.cpu_runtime != "onnxruntime":
            return None
        if not self.openvino_ir:
            return None  # --no-openvino-ir: the user kept the ONNX graphs on purpose
        if not cpuruntime.openvino_installed():
            return (
                "ONNX Runtime serves the encoders: OpenVINO is not installed here. For OpenVINO fp32 (exact, "
                f"{OPENVINO_FP32_GAIN}) pip install 'clip-triton[serve]', then re-run `repo`"
            )
        if not facts.has_openvino_ir:
            return (
                "ONNX Runtime serves the encoders: the export holds no OpenVINO IR (it was made where "
                "OpenVINO was not installed, fp16, or with --no-openvino-ir). For OpenVINO fp32 (exact, "
                f"{OPENVINO_FP32_GAIN}) re-export fp32 here (`export --openvino-ir`), then re-run `repo`"
            )
        return None

    @property
    def encoder_runtime(self) -> str:
        """What computes the embeddings, in words clients can read (an ensemble parameter)."""
        if self.runtime == "python":
            if self.cpu_precision == "bf16":
                from .cpuruntime import cpu_supports_bf16  # noqa: PLC0415

                if not cpu_supports_bf16():  # OpenVINO falls back to fp32: say what runs
                    return f"{self.cpu_runtime} (python backend), fp32 (bf16 requested; this CPU has no native bf16)"
            return f"{self.cpu_runtime} (python backend), {self.cpu_precision}"
        if self.runtime == "openvino":
            # Written here, served on some CPU node: OpenVINO computes bf16 only where the CPU has it
            # (AMX/AVX512-BF16), fp32 elsewhere, and the backend reports neither.
            return "openvino backend, bf16 on CPUs with native bf16 (else fp32)"
        return self.runtime


@dataclass
class ExportFacts:
    """What an export says the repository publishes to clients (the ensembles' ``parameters``), read from
    its manifest. Clients read it back as :class:`~clip_triton.facts.ServerFacts`."""

    contract: ModelContract
    logit_scale: float
    logit_bias: float | None = None
    random_weights: bool = False
    logit_scale_source: str = "checkpoint"
    has_openvino_ir: bool = False  # the export holds OpenVINO IR of both towers (`export --openvino-ir`)

    def serves_ir(self, options: RepoOptions) -> bool:
        """Whether the encoders run the export's OpenVINO IR rather than its ONNX graphs."""
        options = options.resolved(self)
        openvino = options.runtime == "openvino" or (options.runtime == "python" and options.cpu_runtime == "openvino")
        return self.has_openvino_ir and options.openvino_ir and openvino

    @classmethod
    def from_manifest(cls, manifest: dict) -> ExportFacts:
        if manifest.get("format", 1) < EXPORT_FORMAT:
            raise ClipTritonError(
                f"the export is format {manifest.get('format', 1)}, from before refused items' rows were NaN "
                f"(this version serves format {EXPORT_FORMAT})",
                "re-export it: clip-triton export --onnx-dir DIR (same model and weights)",
            )
        verification = manifest.get("verification", {})
        if verification.get("performed") and not verification.get("passed"):
            raise ClipTritonError(
                "the export's verification failed (manifest.json)", "fix the export before serving it"
            )
        return cls(
            contract=ModelContract.from_dict(manifest["contract"]),
            logit_scale=float(manifest["logit_scale"]),
            logit_bias=manifest.get("logit_bias"),
            random_weights=bool(manifest.get("random_weights")),
            logit_scale_source="random initialisation" if manifest.get("random_weights") else "checkpoint",
            has_openvino_ir=bool(manifest.get("openvino_ir")),
        )

    @classmethod
    def default(cls) -> ExportFacts:
        return cls(
            contract=ModelContract.default(),
            logit_scale=ASSUMED_LOGIT_SCALE,
            logit_scale_source="assumed (open_clip clamps at 100); `clip-triton repo --onnx-dir` writes the checkpoint's",
        )

    def server_facts(self, options: RepoOptions) -> ServerFacts:
        """The facts the ensembles carry for clients (written as config parameters by facts.py)."""
        options = options.resolved(self)
        c = self.contract
        return ServerFacts(
            model=c.model,
            pretrained=c.pretrained,
            embed_dim=c.embed_dim,
            logit_scale=self.logit_scale,
            logit_bias=self.logit_bias,
            random_weights=self.random_weights,
            contract=c.to_json(),
            served_model_name=options.served_model_name or c.model,
            encoder_runtime=options.encoder_runtime,
            precision=c.precision,
            logit_scale_source=self.logit_scale_source,
            token_counts=True,
            text_split=True,  # the tokenizer model calls the text encoder per bucket (text_split below)
        )


# ---------------------------------------------------------------------------------------------
# ModelConfig builders
# ---------------------------------------------------------------------------------------------
def _io(message, spec: TensorSpec):
    pb = _pb2()
    item = message.add()
    item.name = spec.name
    item.data_type = pb.DataType.Value(spec.config_type)
    item.dims.extend(spec.shape)
    return item


def _base(name: str, max_batch: int, inputs, outputs, parameters: dict[str, str] | None = None):
    pb = _pb2()
    config = pb.ModelConfig(name=name, max_batch_size=max_batch)
    for spec in inputs:
        _io(config.input, spec)
    for spec in outputs:
        _io(config.output, spec)
    for key, value in (parameters or {}).items():
        config.parameters[key].string_value = str(value)
    return config


def _batching(config, preferred, delay_us: int):
    config.dynamic_batching.preferred_batch_size.extend(preferred)
    config.dynamic_batching.max_queue_delay_microseconds = delay_us


def _instances(config, count: int, kind: str):
    pb = _pb2()
    group = config.instance_group.add()
    group.count = count
    group.kind = pb.ModelInstanceGroup.Kind.Value(kind)


def _warmup(config, spec: TensorSpec, batch_sizes, lengths: tuple[int, ...] = (), batch_in_dims: bool = False):
    """Zero inputs at each batch size; a dynamic (-1) axis at each of ``lengths`` (the text buckets:
    each is its own TensorRT profile and ONNX Runtime shape, each warmed before the first request).
    ``batch_in_dims``: a model that does not batch (max_batch_size 0) takes the batch as its first dim,
    and Triton sends its warm-up requests with batch_size 1."""
    pb = _pb2()
    shapes = [tuple(length if d == -1 else d for d in spec.shape) for length in lengths] if -1 in spec.shape else []
    for size in batch_sizes:
        for shape in shapes or [spec.shape]:
            warm = config.model_warmup.add()
            warm.name = f"zeros_batch_{size}" + (f"_length_{shape[-1]}" if shapes else "")
            warm.batch_size = 1 if batch_in_dims else size
            data = warm.inputs[spec.name]
            data.data_type = pb.DataType.Value(spec.config_type)
            data.dims.extend((size, *shape) if batch_in_dims else shape)
            data.zero_data = True


def build_configs(facts: ExportFacts, options: RepoOptions, names: ModelNames = SINGLE) -> dict:
    """Every ModelConfig message of one served model, keyed by model name (``names``: the contract's
    own, or each ``<name>__<slug>`` in a repository of several models)."""
    options = options.resolved(facts)
    c = facts.contract
    max_batch = options.max_batch_size or c.batch.max
    if max_batch > c.batch.max and options.runtime == "tensorrt":
        raise ClipTritonError(
            f"max_batch_size {max_batch} exceeds the TensorRT profile maximum {c.batch.max}",
            "lower --max-batch-size or rebuild the engines with a larger profile",
        )
    preferred = tuple(size for size in c.batch.preferred if size <= max_batch) or (max_batch,)
    gpu = options.runtime in ("tensorrt", "onnxruntime")
    delay = options.queue_delay_us if options.queue_delay_us is not None else (500 if gpu else 2000)
    threads = str(options.encoder_threads)
    cores = os.cpu_count() or 1
    graph_file = ENCODER_IR_FILE if facts.serves_ir(options) else ENCODER_ONNX_FILE
    contract_json = c.to_json()
    configs = {}

    # The python models in front of the encoders: image decoding and tokenization, per tower.
    limits = {
        VISION.name: {
            "max_image_pixels": str(options.max_image_pixels or DEFAULT_MAX_PIXELS),
            "max_image_bytes": str(options.max_image_bytes or DEFAULT_MAX_BYTES),
        },
        TEXT.name: {"max_text_chars": str(options.max_text_chars)},
    }
    # CPU-bound decoding: a GPU host gets 8 instances (~300 images/s each); a CPU-only server one per core.
    instances = {
        VISION.name: options.preprocess_instances or (8 if gpu else cores),
        TEXT.name: options.tokenizer_instances,
    }
    for tower in TOWERS:
        encoder = c.encoder(tower.name)
        # The tokenizer calls the text encoder itself, one call per length bucket (BLS, text_split): it
        # answers the embeddings; its ids stay an output (what the encoder was given, for diagnosis).
        splits = tower is TEXT
        front = _base(
            names.front(tower),
            max_batch,
            [encoder.client_input],
            [encoder.input, *([c.embedding] if splits else []), c.status, *_counts(tower)],
            {
                "contract": contract_json,
                **limits[tower.name],
                **({"encoder": names.encoder(tower)} if splits else {}),
            },
        )
        front.backend = "python"
        _batching(front, preferred, delay)
        _instances(front, instances[tower.name], "KIND_CPU")
        configs[names.front(tower)] = front

    for tower in TOWERS:
        name, encoder = names.encoder(tower), c.encoder(tower.name)
        spec_in, spec_out = encoder.input, encoder.output
        # The tower is written down, never guessed from the name; the contract goes only where it is
        # read (the python-backend encoder checks token ids against the vocabulary).
        params = {"tower": tower.name, **({"contract": contract_json} if options.runtime == "python" else {})}
        enc = _base(name, max_batch, [spec_in], [spec_out], params)
        if options.runtime == "tensorrt":
            enc.platform = "tensorrt_plan"
            enc.default_model_filename = PLAN_FILE
            _instances(enc, options.encoder_instances, "KIND_GPU")
            # Every profile of the engine, by index: without the list Triton's TensorRT backend uses
            # profile 0 alone, and the text buckets above it fail (clip_triton/profiles.py).
            enc.instance_group[0].profile.extend(profile_names(c, tower.name))
        elif options.runtime == "onnxruntime":
            enc.platform = "onnxruntime_onnx"
            enc.default_model_filename = ENCODER_ONNX_FILE
            _instances(enc, options.encoder_instances, "KIND_GPU")
        elif options.runtime == "openvino":
            # Triton's OpenVINO backend reads ONNX or IR; the keys are the backend's own. A batching
            # model's batch is fixed at max_batch_size (openvino_backend src/openvino.cc:
            # ov::set_batch(model, MaxBatchSize())), and any other batch is refused ("expected requests
            # with batch size '64', got 'N'") unless ENABLE_BATCH_PADDING pads every batch to 64 rows.
            # So the encoder does not batch: max_batch_size 0 and the batch a -1 dim of its own (the
            # backend's tests/configs/dynamic.pbtxt); the ensemble above it still takes batches (core
            # lets a batchable ensemble hold non-batchable models: ensemble_utils.cc), each client
            # request's rows go through in one call.
            enc.max_batch_size = 0
            for field, spec in ((enc.input, spec_in), (enc.output, spec_out)):
                del field[:]
                _io(field, TensorSpec(spec.name, spec.dtype, (-1, *spec.shape)))
            enc.backend = "openvino"
            enc.default_model_filename = graph_file
            enc.parameters["PERFORMANCE_HINT"].string_value = "LATENCY"
            # The instances share one compiled model (the backend's ModelState holds it per device),
            # each with its own infer request: with one stream they would take turns. One stream per
            # instance lets them run at once.
            enc.parameters["NUM_STREAMS"].string_value = str(options.encoder_instances)
            enc.parameters["HINT_BF16"].string_value = "YES"
            if options.encoder_threads:
                enc.parameters["INFERENCE_NUM_THREADS"].string_value = threads
            _instances(enc, options.encoder_instances, "KIND_CPU")
        else:
            enc.backend = "python"
            enc.parameters["graph_file"].string_value = graph_file
            enc.parameters["cpu_runtime"].string_value = options.cpu_runtime
            enc.parameters["compute_precision"].string_value = options.cpu_precision
            enc.parameters["threads"].string_value = threads
            enc.parameters["ort_spinning"].string_value = "true" if options.ort_spinning else "false"
            _instances(enc, options.encoder_instances, "KIND_CPU")
        if enc.max_batch_size:
            _batching(enc, preferred, delay)
        if options.warmup:
            _warmup(
                enc,
                spec_in,
                sorted({1, preferred[0]}),
                c.tokenizer.lengths if tower is TEXT else (),
                batch_in_dims=not enc.max_batch_size,
            )
        configs[name] = enc

    facts_params = facts.server_facts(options).parameters()
    described = {**facts_params, **{f"output_{name}": text for name, text in OUTPUT_DESCRIPTIONS.items()}}
    cached = cached_towers(options.response_cache)
    for tower in TOWERS:
        encoder = c.encoder(tower.name)
        spec_in, spec_mid = encoder.client_input, encoder.input
        outputs = [c.embedding, c.status, *_counts(tower)]
        params = {key: value for key, value in described.items() if key != f"output_{TOKENS_OUTPUT}" or tower is TEXT}
        # The pipeline: front (per-item status, token counts) -> encoder. A cached tower runs it in the
        # inner ensemble the cache keys on, reached through the public one's single step (contract
        # TEXT_CACHED: why).
        pipeline = names.cached(tower) if tower in cached else names.ensemble(tower)
        ens = _base(pipeline, max_batch, [spec_in], outputs, params)
        ens.platform = "ensemble"
        step = ens.ensemble_scheduling.step.add()
        step.model_name, step.model_version = names.front(tower), -1
        step.input_map[spec_in.name] = spec_in.name
        if tower is TEXT:  # the tokenizer answers the embeddings itself (it calls the encoder per bucket)
            for output in outputs:
                step.output_map[output.name] = output.name
            configs[pipeline] = ens
        else:
            step.output_map[spec_mid.name] = spec_mid.name
            for output in outputs[1:]:  # per-item status, straight to the ensemble's output
                step.output_map[output.name] = output.name
            step = ens.ensemble_scheduling.step.add()
            step.model_name, step.model_version = names.encoder(tower), -1
            step.input_map[spec_mid.name] = spec_mid.name
            step.output_map[encoder.output.name] = c.embedding.name
            configs[pipeline] = ens
        if tower in cached:
            ens.response_cache.enable = True  # keyed on its inputs; its steps run on a miss
            public = _base(names.ensemble(tower), max_batch, [spec_in], outputs, params)
            public.platform = "ensemble"
            step = public.ensemble_scheduling.step.add()
            step.model_name, step.model_version = names.cached(tower), -1
            step.input_map[spec_in.name] = spec_in.name
            for output in outputs:  # a step request names all of these
                step.output_map[output.name] = output.name
            configs[names.ensemble(tower)] = public
    return configs


def _counts(tower: Tower) -> list[TensorSpec]:
    """The per-item token count a text pipeline answers besides STATUS (contract TOKENS_OUTPUT)."""
    return [TensorSpec(TOKENS_OUTPUT, "int32", (1,))] if tower is TEXT else []


def render(config) -> str:
    """``config.pbtxt`` text. proto3 omits ``max_batch_size: 0``; it is written explicitly."""
    text = text_format.MessageToString(config)
    if config.max_batch_size == 0:
        text = text.replace(f'name: "{config.name}"\n', f'name: "{config.name}"\nmax_batch_size: 0\n', 1)
    return text


def parse(text: str):
    return text_format.Parse(text, _pb2().ModelConfig())


def python_entry_point(module: str) -> str:
    return (
        f'"""Triton python-backend entry point, written by `clip-triton repo`. The logic lives in {module}."""\n\n'
        "import os\n"
        "import site\n"
        "import sys\n\n"
        "# Triton's python stub starts without PYTHONPATH on sys.path; `clip-triton serve` points it at this\n"
        "# package's environment. addsitedir also runs .pth files (editable installs). Added paths go first.\n"
        "_known = set(sys.path)\n"
        'for _path in filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep)):\n'
        "    site.addsitedir(_path)\n"
        "sys.path.sort(key=lambda path: path in _known)\n\n"
        f"from {module} import TritonPythonModel  # noqa: E402,F401\n"
    )


def repository_files(facts: ExportFacts, options: RepoOptions, names: ModelNames = SINGLE) -> dict[str, str]:
    """Every text file of one served model's models, keyed by relative path (graphs and engines excluded)."""
    files = {}
    configs = build_configs(facts, options, names)
    modules = {names.front(VISION): PYTHON_MODELS[PREPROCESS_MODEL], names.front(TEXT): PYTHON_MODELS[TOKENIZER_MODEL]}
    for name, config in configs.items():
        files[f"{name}/config.pbtxt"] = render(config)
        if config.backend == "python":
            files[f"{name}/1/model.py"] = python_entry_point(modules.get(name, PYTHON_MODELS["encoder"]))
        elif config.platform == "ensemble":
            files[f"{name}/1/.gitkeep"] = ""  # ensembles need a version folder
    if options.runtime == "tensorrt":
        for tower in TOWERS:
            files[f"{names.encoder(tower)}/1/.gitkeep"] = ""  # the plan is written by `clip-triton build-engines`
    return files


def _place_graph(onnx_dir: Path, graph: str, version_dir: Path) -> None:
    """Copy (hard-link when possible) a graph into a version folder: an ONNX graph keeps its external
    data's name (the graph refers to it); an OpenVINO IR (``.xml``) goes with its ``.bin``."""
    src = onnx_dir / graph
    if not src.is_file():
        raise ClipTritonError(f"{src} not found", "run `clip-triton export` into that folder first")
    if src.suffix == ".xml":
        weights = src.with_suffix(".bin")
        if not weights.is_file():
            raise ClipTritonError(f"{weights} not found beside {src.name}", "re-run `clip-triton export --openvino-ir`")
        pairs = [
            (src, version_dir / ENCODER_IR_FILE),
            (weights, version_dir / Path(ENCODER_IR_FILE).with_suffix(".bin")),
        ]
    else:
        pairs = [(src, version_dir / ENCODER_ONNX_FILE)]
        data = onnx_dir / f"{graph}.data"
        if data.exists():
            pairs.append((data, version_dir / data.name))  # the graph refers to its data file by this name
    for source, target in pairs:
        target.unlink(missing_ok=True)
        try:
            os.link(source, target)
        except OSError:
            shutil.copy2(source, target)


@dataclass(frozen=True)
class ServedExport:
    """One served model of a repository: its export, its public name and its Triton model names."""

    onnx_dir: Path | None  # None: the committed default (ViT-bigG-14 facts, no graphs)
    facts: ExportFacts
    served_model_name: str
    names: ModelNames

    @property
    def manifest_file(self) -> str:
        """Its export manifest's copy in the repository (``manifest.json``; ``manifest__<slug>.json``)."""
        return self.names.of(Path(MANIFEST).stem) + Path(MANIFEST).suffix


def read_export_facts(onnx_dir: Path) -> ExportFacts:
    manifest_path = onnx_dir / MANIFEST
    if not manifest_path.is_file():
        raise ClipTritonError(f"{manifest_path} not found", "run `clip-triton export --onnx-dir DIR` first")
    return ExportFacts.from_manifest(json.loads(manifest_path.read_text()))


def served_exports(
    exports: list[tuple[str | Path | None, str | None]], runtime: str = "tensorrt"
) -> list[ServedExport]:
    """The served models of a repository: ``(export folder, served name or None)`` each. One export keeps
    the contract's own model names; several are each named ``<name>__<slug>`` (contract ``ModelNames``),
    and their served names (given, else each export's architecture) must differ, slugs included."""
    if not exports:
        raise ClipTritonError("no export given", "pass --onnx-dir DIR (once per served model)")
    several = len(exports) > 1
    served: list[ServedExport] = []
    for onnx_dir, name in exports:
        if name:
            check_served_model_name(name)
        if onnx_dir is None:
            if runtime != "tensorrt" or several:
                raise ClipTritonError(f"--runtime {runtime} needs --onnx-dir", "export first, then pass its folder")
            facts = ExportFacts.default()
        else:
            facts = read_export_facts(Path(onnx_dir))
        public = name or facts.contract.model
        names = ModelNames.for_served(public) if several else SINGLE
        for other in served:
            if public == other.served_model_name or names == other.names:
                raise ClipTritonError(
                    f"two served models would be named {public!r} (from {other.onnx_dir} and {onnx_dir})"
                    if public == other.served_model_name
                    else f"served names {other.served_model_name!r} and {public!r} give the same Triton model names "
                    f"(*{names.of('')})",
                    "give each --onnx-dir its own --served-model-name (in the same order)",
                )
        served.append(ServedExport(Path(onnx_dir) if onnx_dir else None, facts, public, names))
    return served


def write_repository(
    out: str | Path,
    *,
    onnx_dir: str | Path | None = None,
    options: RepoOptions = RepoOptions(),
    force: bool = False,
    exports: list[tuple[str | Path | None, str | None]] | None = None,
) -> Path:
    """Write a repository. With ``onnx_dir``, facts come from its manifest and graphs are placed.

    ``exports``: several served models in one repository, ``(export folder, served name or None)``
    each (``options.served_model_name`` then stays None); see :func:`served_exports` for the names."""
    out = Path(out)
    if exports is not None and (onnx_dir is not None or options.served_model_name is not None):
        raise ClipTritonError("give the exports either as onnx_dir or as exports, not both")
    models = served_exports(
        exports if exports is not None else [(onnx_dir, options.served_model_name)], options.runtime
    )
    if out.exists():
        if not force and any(out.iterdir()):
            raise ClipTritonError(f"{out} exists and is not empty", "pass --force to replace it")
        for child in out.iterdir():  # empty it in place: the folder may be a mounted volume
            shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
    for model in models:
        _write_model(out, model, replace(options, served_model_name=model.served_model_name))
    return out


def _write_model(out: Path, model: ServedExport, options: RepoOptions) -> None:
    """One served model's Triton models, graphs, manifest copy and tokenizer file."""
    facts, names, onnx_dir = model.facts, model.names, model.onnx_dir
    for rel, text in repository_files(facts, options, names).items():
        path = out / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    if onnx_dir is not None and options.runtime in ("onnxruntime", "openvino", "python"):
        for tower in TOWERS:
            folder = out / names.encoder(tower) / "1"
            folder.mkdir(parents=True, exist_ok=True)  # native backends have no other file there
            _place_graph(onnx_dir, tower.ir_file if facts.serves_ir(options) else tower.onnx_file, folder)
    if onnx_dir is not None:
        shutil.copy2(onnx_dir / MANIFEST, out / model.manifest_file)  # provenance beside the configs
    if facts.contract.tokenizer.kind == "hf":  # the tokenizer model runs the export's copy of it
        source = (onnx_dir or Path(".")) / HF_TOKENIZER_DIR / HF_TOKENIZER_FILE
        if not source.is_file():
            raise ClipTritonError(
                f"{source} not found: {facts.contract.model} tokenizes with a Hugging Face tokenizer",
                "re-run `clip-triton export` (it saves the tokenizer beside the graphs)",
            )
        shutil.copy2(source, out / names.front(TEXT) / "1" / HF_TOKENIZER_FILE)
