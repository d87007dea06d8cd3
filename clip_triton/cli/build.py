"""Build commands: ``export`` (open_clip -> verified ONNX), ``verify``, ``repo`` (the Triton ensemble
repository), ``build-engines`` and ``check-engines`` (TensorRT). Each declares its flags and their rules."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..contract import (
    DEFAULT_MODEL,
    DEFAULT_PRECISION,
    DEFAULT_PRETRAINED,
    PRECISIONS,
    RESPONSE_CACHE_CHOICES,
    RUNTIMES,
    TEXT_BUCKETS,
)
from ..errors import ClipTritonError
from .common import BF16_NEEDS_OPENVINO, Rule, add_command, cpu_args, finish, int_list, progress_arg, text_buckets

EXPORT_RULES: list[Rule] = [
    ("seed", lambda a: str(a.pretrained).lower() == "none", "--seed seeds random weights: it needs --pretrained none"),
    ("verify_batches", lambda a: not a.no_verify, "--verify-batches has no effect with --no-verify"),
    (
        "openvino_ir",
        lambda a: a.precision == "fp32" or not a.openvino_ir,
        "--openvino-ir converts fp32 exports (OpenVINO picks fp32 or bf16 compute itself): drop --precision fp16",
    ),
    (
        "cache_dir",
        lambda a: str(a.pretrained).lower() != "none" and not Path(str(a.pretrained)).exists(),
        "--cache-dir is the hub download cache: it needs --pretrained TAG",
    ),
]
REPO_RULES: list[Rule] = [
    (
        "cpu_runtime",
        lambda a: a.runtime == "python",
        "--cpu-runtime chooses the python backend's CPU library: it needs --runtime python",
    ),
    (
        "cpu_precision",
        lambda a: a.runtime in ("python", "openvino"),
        "--cpu-precision applies to CPU encoders: --runtime python or openvino",
    ),
    (
        "encoder_threads",
        lambda a: a.runtime in ("python", "openvino"),
        "--encoder-threads applies to CPU encoders: --runtime python or openvino",
    ),
]


def _check_verify(args) -> None:
    if args.onnx_dir and args.onnx_dir_positional and args.onnx_dir != args.onnx_dir_positional:
        raise ClipTritonError("two export folders given (ONNX_DIR and --onnx-dir)", "pass one")
    args.onnx_dir = args.onnx_dir or args.onnx_dir_positional
    if not args.onnx_dir:
        raise ClipTritonError("verify needs the export folder", "clip-triton verify --onnx-dir DIR")


def _check_build_engines(args) -> None:
    if (args.repo is None) == (args.root is None):
        raise ClipTritonError("give exactly one of --repo and --root", "compose and Kubernetes use --root")


def _export(args) -> int:
    from clip_triton.export import export_model  # noqa: PLC0415

    export_model(
        args.model,
        args.pretrained,
        args.onnx_dir,
        precision=args.precision,
        opset=args.opset,
        seed=args.seed,
        verify=not args.no_verify,
        verify_batches=int_list(args.verify_batches, "--verify-batches"),
        external_threshold=int(args.external_data_threshold_mib * 1024**2),
        cache_dir=args.cache_dir,
        force=args.force,
        reuse=args.reuse,
        progress=args.progress,
        text_buckets=text_buckets(args.text_buckets),
        openvino_ir=args.openvino_ir,
    )
    return 0


def _verify(args) -> int:
    from clip_triton.export import verify_export  # noqa: PLC0415

    verify_export(
        args.onnx_dir,
        seed=args.seed,
        checkpoint=args.checkpoint,
        runtime=args.cpu_runtime,  # auto: resolved from the export's manifest
        cpu_precision=args.cpu_precision,
    )
    return 0


def _build_engines(args) -> int:
    from clip_triton.export.engines import BuildOptions, build_engines, deploy_engines  # noqa: PLC0415

    options = BuildOptions(
        optimization_level=args.optimization_level,
        workspace_gib=args.workspace_gib,
        timing_cache=args.timing_cache,
        strongly_typed=None if args.typing == "auto" else args.typing == "strong",
    )
    from ..repository import served_exports  # noqa: PLC0415

    exports = exports_of(args.onnx_dir, args.served_model_name)
    if args.root is not None:
        deploy_engines(None, args.root, options, exports=exports)
    else:
        for model in served_exports(exports):
            build_engines(model.onnx_dir, args.repo, options, names=model.names)
    return 0


def _check_engines(args) -> int:
    from clip_triton.export.engines import check_repository_engines  # noqa: PLC0415

    if not args.onnx_dir:
        for model in check_repository_engines(args.repo):
            print(f"{model}: engine passed validation and matches this TensorRT and GPU")
        return 0
    from ..repository import served_exports  # noqa: PLC0415

    for served in served_exports(exports_of(args.onnx_dir, args.served_model_name)):  # the names `repo` gave them
        for model in check_repository_engines(args.repo, onnx_dir=served.onnx_dir, names=served.names):
            print(f"{model}: engine passed validation and matches this TensorRT and GPU, built from {served.onnx_dir}")
    return 0


def exports_of(onnx_dirs: list[str] | None, names: list[str] | None) -> list[tuple[str | None, str | None]]:
    """(export folder, served name) pairs of repeated --onnx-dir / --served-model-name, in order."""
    dirs: list[str | None] = list(onnx_dirs or [None])
    if names and len(names) != len(dirs):
        raise ClipTritonError(
            f"{len(names)} --served-model-name for {len(dirs)} --onnx-dir",
            "give one --served-model-name per --onnx-dir, in the same order, or none (each export's architecture name)",
        )
    return list(zip(dirs, names or [None] * len(dirs)))


def _repo(args) -> int:
    from ..repository import RepoOptions, served_exports, write_repository  # noqa: PLC0415

    exports = exports_of(args.onnx_dir, args.served_model_name)
    options = RepoOptions(
        runtime=args.runtime,
        max_batch_size=args.max_batch_size,
        queue_delay_us=args.queue_delay_us,
        encoder_instances=args.encoder_instances,
        preprocess_instances=args.preprocess_instances,
        tokenizer_instances=args.tokenizer_instances,
        cpu_runtime=args.cpu_runtime,
        cpu_precision=args.cpu_precision,
        encoder_threads=args.encoder_threads,
        max_image_pixels=args.max_image_pixels,
        response_cache=args.response_cache,
        openvino_ir=not args.no_openvino_ir,
    )
    path = write_repository(args.repo, options=options, force=args.force, exports=exports)
    models = served_exports(exports, options.runtime)
    # what --cpu-runtime auto became, as the repository wrote it (never "auto")
    print(f"wrote Triton model repository {path} ({options.resolved(models[0].facts).encoder_runtime})")
    for model in models:
        note = options.runtime_note(model.facts)
        if note:
            print(f"note ({model.onnx_dir}): {note}", file=sys.stderr)
    if len(exports) > 1:
        from ..footprint import estimate, table  # noqa: PLC0415

        for model in models:
            runtime = options.resolved(model.facts).encoder_runtime
            print(f"  {model.served_model_name}: {model.names.image}, {model.names.text} ({runtime})")
        print("estimated memory, each served model on its own (docs/serving.md, 'Several models'):")
        print(table(estimate(path)))
    _warn_precision(options)
    return 0


def _warn_precision(options) -> None:
    """bf16 asked for on a CPU that computes fp32: say so where the user is looking."""
    if options.runtime == "python" and options.cpu_precision == "bf16":
        from ..cpuruntime import cpu_supports_bf16  # noqa: PLC0415

        if not cpu_supports_bf16():
            print(
                "WARNING: this CPU has no native bf16 (AVX512-BF16 or AMX): OpenVINO computes in fp32 here, "
                "and the served encoder_runtime says so",
                file=sys.stderr,
            )


def add_parsers(sub) -> None:
    p = add_command(sub, "export", "export open_clip's vision and text towers to verified ONNX graphs")
    p.add_argument("--model", default=DEFAULT_MODEL, help="open_clip architecture name or model-config JSON path")
    p.add_argument(
        "--pretrained",
        default=DEFAULT_PRETRAINED,
        help="pretrained tag (hub download), checkpoint file path, or 'none' for random weights",
    )
    p.add_argument(
        "--onnx-dir",
        "--out",
        dest="onnx_dir",
        required=True,
        help="export folder to write (graphs, manifest.json, references.npz; --out: old spelling)",
    )
    p.add_argument("--force", action="store_true", help="replace an existing export in --onnx-dir")
    p.add_argument(
        "--reuse",
        action="store_true",
        help="keep a verified export of the same model, weights and precision already in --onnx-dir "
        "(exit 0 at once); replace anything else (for jobs that run on every start)",
    )
    p.add_argument(
        "--precision", choices=PRECISIONS, default=DEFAULT_PRECISION, help="precision of the exported graphs"
    )
    p.add_argument("--opset", type=int, default=18, help="ONNX opset, 17-20")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights (--pretrained none only)")
    p.add_argument("--no-verify", action="store_true", help="skip ONNX Runtime vs PyTorch verification")
    p.add_argument("--verify-batches", default="1,3,8", help="comma-separated batch sizes to verify")
    p.add_argument(
        "--openvino-ir",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also convert each tower to OpenVINO IR straight from the PyTorch module (verified like the "
        "graphs); --cpu-runtime auto then serves it with OpenVINO, the faster exact CPU path "
        "(docs/benchmarks.md). Default: yes for fp32 exports where OpenVINO is installed (the serve or cpu extra), "
        "skipped with a warning if OpenVINO cannot convert or verify it; --openvino-ir makes that an error",
    )
    p.add_argument(
        "--text-buckets",
        default=None,
        metavar="LENGTHS",
        help="sequence lengths below the context length the text graph is served at, comma-separated, or "
        f"'none' for one static length (default: {','.join(map(str, TEXT_BUCKETS))} where the text tower is "
        "causal and pools at its EOT; see docs/benchmarks.md)",
    )
    p.add_argument(
        "--external-data-threshold-mib",
        type=float,
        default=1843.2,
        help="write weights to a .data file beside a graph above this size",
    )
    p.add_argument(
        "--cache-dir", default=None, help="download cache for hub weights (default: huggingface_hub's; tags only)"
    )
    progress_arg(p)
    finish(p, _export, rules=EXPORT_RULES)
    p = add_command(sub, "verify", "re-check an export folder against open_clip PyTorch")
    p.add_argument("onnx_dir_positional", nargs="?", metavar="ONNX_DIR", help="export folder (same as --onnx-dir)")
    p.add_argument("--onnx-dir", default=None, help="export folder written by `clip-triton export`")
    p.add_argument("--seed", type=int, default=None, help="override the recorded seed (random-weight exports)")
    p.add_argument("--checkpoint", default=None, help="override the recorded checkpoint path")
    cpu_args(p, "")
    finish(p, _verify, rules=[BF16_NEEDS_OPENVINO], check=_check_verify)
    p = add_command(sub, "repo", "write a Triton model repository (ensemble) for an export")
    p.add_argument("--runtime", choices=RUNTIMES, default="tensorrt", help="what runs the encoders")
    p.add_argument(
        "--onnx-dir",
        action="append",
        default=None,
        help="export folder; repeat it to serve several models from one repository, each model's Triton "
        "models then named <name>__<served name> (default: none; ViT-bigG-14 defaults, no graphs)",
    )
    p.add_argument(
        "--repo", "--out", dest="repo", required=True, help="repository folder to write (--out: old spelling)"
    )
    p.add_argument("--force", action="store_true", help="replace an existing repository folder")
    p.add_argument(
        "--no-openvino-ir",
        action="store_true",
        help="OpenVINO encoders run the ONNX graphs even where the export has OpenVINO IR (export --openvino-ir)",
    )
    p.add_argument(
        "--response-cache",
        choices=RESPONSE_CACHE_CHOICES,
        default="text",
        help="ensembles answered from Triton's response cache on a repeated request: text (prompts), all "
        "(images too, keyed on their bytes) or none; the server sizes the cache (serve --response-cache-mib, "
        "tritonserver --cache-config)",
    )
    p.add_argument(
        "--served-model-name",
        action="append",
        default=None,
        help="public model id that clients and the gateway see (default: the architecture name; never "
        "a checkpoint path); with several --onnx-dir, once per export in the same order, or not at all",
    )
    p.add_argument(
        "--max-batch-size",
        type=int,
        default=None,
        help="largest batch per request and per model (default: the contract's, 64)",
    )
    p.add_argument(
        "--queue-delay-us",
        type=int,
        default=None,
        help="dynamic batching max queue delay (default: 500 on GPU runtimes, 2000 on CPU)",
    )
    p.add_argument("--encoder-instances", type=int, default=1, help="instances of each encoder")
    p.add_argument(
        "--preprocess-instances",
        type=int,
        default=None,
        help="image decoding instances (default: 8 on GPU runtimes, one per core for --runtime python)",
    )
    p.add_argument("--tokenizer-instances", type=int, default=1, help="tokenizer instances")
    cpu_args(p, " (--runtime python)")
    p.add_argument(
        "--encoder-threads",
        dest="encoder_threads",
        type=int,
        default=0,
        help="CPU encoders: threads per instance, 0 = one per physical core, never pinned to a core (--runtime python or openvino)",
    )
    p.add_argument(
        "--max-image-pixels",
        type=int,
        default=None,
        help="refuse images over this many pixels, read from the header (default: 50,000,000)",
    )
    finish(p, _repo, rules=REPO_RULES)
    p = add_command(sub, "build-engines", "build and validate TensorRT engines (GPU host, TensorRT container)")
    p.add_argument(
        "--onnx-dir",
        action="append",
        required=True,
        help="export folder (graphs, manifest.json, references.npz); repeat it for a repository of several "
        "served models (as `repo` takes them)",
    )
    p.add_argument(
        "--served-model-name",
        action="append",
        default=None,
        help="with several --onnx-dir: each one's served name, in the same order (as given to `repo`)",
    )
    p.add_argument(
        "--repo", default=None, help="build into this repository, written by `clip-triton repo --runtime tensorrt`"
    )
    p.add_argument(
        "--root",
        default=None,
        help="serve ROOT/current instead: kept when its engines match the export, TensorRT and GPU; else "
        "written and built in a new folder and switched to in one rename once validated (a failed build "
        "leaves the old one serving)",
    )
    p.add_argument("--optimization-level", type=int, default=3, help="TensorRT builder optimisation level 0-5")
    p.add_argument("--workspace-gib", type=float, default=8.0, help="TensorRT builder workspace")
    p.add_argument("--timing-cache", default=None, help="timing cache file (default: REPO/timing.cache, reused)")
    p.add_argument(
        "--typing",
        choices=["auto", "strong", "weak"],
        default="auto",
        help="auto: strongly typed on TensorRT >= 10.12, else the weakly typed FP16 fallback",
    )
    finish(p, _build_engines, check=_check_build_engines)
    p = add_command(
        sub,
        "check-engines",
        "refuse engines that failed validation or were built for another TensorRT version or GPU (exit 2)",
    )
    p.add_argument("--repo", required=True, help="TensorRT repository (each encoder's plan with its engine.json)")
    p.add_argument(
        "--onnx-dir",
        action="append",
        default=None,
        help="also require the engines to be built from exactly these graphs (sha256): "
        "exit 0 means they are current and need no rebuild; repeat it (with --served-model-name) for a "
        "repository of several served models",
    )
    p.add_argument(
        "--served-model-name",
        action="append",
        default=None,
        help="with several --onnx-dir: each one's served name, in the same order (as given to `repo`)",
    )
    finish(p, _check_engines)
