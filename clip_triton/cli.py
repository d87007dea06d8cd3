"""The ``clip-triton`` command. Each subcommand imports only what its role needs."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .contract import (
    CPU_PRECISIONS,
    CPU_RUNTIMES,
    DEFAULT_MODEL,
    DEFAULT_PRECISION,
    DEFAULT_PRETRAINED,
    DEFAULT_URL,
    PRECISIONS,
    RESPONSE_CACHE_CHOICES,
    RUNTIMES,
    TEXT,
    TEXT_BUCKETS,
    TOWERS,
    VISION,
)
from .errors import ClipTritonError, VerificationError

EXIT_USER_ERROR = 2
EXIT_VERIFICATION_FAILED = 3
EXIT_INTERRUPTED = 130


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
        verify_batches=_int_list(args.verify_batches, "--verify-batches"),
        external_threshold=int(args.external_data_threshold_mib * 1024**2),
        cache_dir=args.cache_dir,
        force=args.force,
        reuse=args.reuse,
        progress=args.progress,
        text_buckets=_text_buckets(args.text_buckets),
        openvino_ir=args.openvino_ir,
    )
    return 0


def _text_buckets(text: str | None) -> tuple[int, ...] | None:
    """--text-buckets: None (the contract's default), 'none' (a static graph) or lengths."""
    if text is None:
        return None
    if text.strip().lower() == "none":
        return ()
    return _int_list(text, "--text-buckets")


def _verify(args) -> int:
    from clip_triton.export import verify_export  # noqa: PLC0415

    verify_export(
        args.onnx_dir,
        seed=args.seed,
        checkpoint=args.checkpoint,
        runtime=args.cpu_runtime,
        cpu_precision=args.cpu_precision,
    )
    return 0


def _build_engines(args) -> int:
    from clip_triton.export.engines import BuildOptions, build_engines, deploy_engines  # noqa: PLC0415

    if (args.repo is None) == (args.root is None):
        raise ClipTritonError("give exactly one of --repo and --root", "compose and Kubernetes use --root")
    options = BuildOptions(
        optimization_level=args.optimization_level,
        workspace_gib=args.workspace_gib,
        timing_cache=args.timing_cache,
        strongly_typed=None if args.typing == "auto" else args.typing == "strong",
    )
    if args.root is not None:
        deploy_engines(args.onnx_dir, args.root, options)
    else:
        build_engines(args.onnx_dir, args.repo, options)
    return 0


def _check_engines(args) -> int:
    from clip_triton.export.engines import check_repository_engines  # noqa: PLC0415

    for model in check_repository_engines(args.repo, onnx_dir=args.onnx_dir):
        built_from = f", built from {args.onnx_dir}" if args.onnx_dir else ""
        print(f"{model}: engine passed validation and matches this TensorRT and GPU{built_from}")
    return 0


def _repo(args) -> int:
    from .repository import RepoOptions, write_repository  # noqa: PLC0415

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
        served_model_name=args.served_model_name,
        response_cache=args.response_cache,
        openvino_ir=not args.no_openvino_ir,
    )
    path = write_repository(args.repo, onnx_dir=args.onnx_dir, options=options, force=args.force)
    print(f"wrote Triton model repository {path} ({options.encoder_runtime})")
    _warn_precision(options)
    return 0


def _warn_precision(options) -> None:
    """bf16 asked for on a CPU that computes fp32: say so where the user is looking."""
    if options.runtime == "python" and options.cpu_precision == "bf16":
        from .cpuruntime import cpu_supports_bf16  # noqa: PLC0415

        if not cpu_supports_bf16():
            print(
                "WARNING: this CPU has no native bf16 (AVX512-BF16 or AMX): OpenVINO computes in fp32 here, "
                "and the served encoder_runtime says so",
                file=sys.stderr,
            )


def _serve(args) -> int:
    from .server import TritonServer  # noqa: PLC0415

    server = TritonServer(
        args.repo,
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        metrics_port=args.metrics_port,
        host=args.host,
        log_verbose=args.log_verbose,
        response_cache_mib=args.response_cache_mib,
    )
    return server.run_foreground(
        timeout=args.startup_timeout, watchdog_interval=args.watchdog_interval, canary_timeout=args.watchdog_timeout
    )


def _health(args) -> int:
    from .health import metrics_url_for, probe  # noqa: PLC0415

    metrics = None if args.metrics_url == "none" else (args.metrics_url or metrics_url_for(args.url))
    alive, reason = probe(args.url, metrics, timeout=args.timeout)
    print(("healthy" if alive else "UNHEALTHY") + f": {reason}", file=sys.stdout if alive else sys.stderr)
    return 0 if alive else 1


def _demo(args) -> int:
    from .demo import run_demo  # noqa: PLC0415

    return run_demo(
        model=args.model,
        pretrained=args.pretrained,
        workdir=args.workdir,
        images=args.images,
        prompts=args.prompts,
        cpu_runtime=args.cpu_runtime,
        cpu_precision=args.cpu_precision,
    )


def _gateway(args) -> int:
    from .gateway import FetchPolicy, GatewaySettings, serve_gateway  # noqa: PLC0415

    keys = tuple(k.strip() for k in os.environ.get("CLIP_TRITON_API_KEYS", "").split(",") if k.strip())
    if args.api_key_file:
        keys += tuple(
            line.strip() for line in _read_text(args.api_key_file, "--api-key-file").splitlines() if line.strip()
        )
    settings = GatewaySettings(
        triton_url=args.url,
        api_keys=keys,
        auth=not args.no_auth,
        max_body_bytes=int(args.max_body_mib * 1024**2),
        max_items=args.max_items,
        docs=args.docs,
        served_model_name=args.served_model_name,
        tokenizer_dir=args.tokenizer_dir,
        fetch=FetchPolicy(
            timeout_s=args.fetch_timeout,
            max_bytes=int(args.fetch_max_mib * 1024**2),
            allow_private=args.allow_private_urls,
        ),
    )
    serve_gateway(settings, host=args.host, port=args.port)
    return 0


def _perf(args) -> int:
    from .perf import perf_table  # noqa: PLC0415

    print(
        perf_table(
            args.url,
            args.ensembles,
            batch_sizes=_int_list(args.batch_size, "--batch-size"),
            concurrencies=_int_list(args.concurrency, "--concurrency"),
            measurement_ms=args.measurement_ms,
            print_command=args.print_command,
        )
    )
    return 0


def _client(args):
    from clip_triton.client import ClipClient  # noqa: PLC0415

    urls = [u.strip() for u in args.url.split(",") if u.strip()]
    client = ClipClient(
        urls if len(urls) > 1 else urls[0],
        timeout=args.timeout,
        concurrency=args.concurrency,
        batch_size=args.batch_size,
        progress=args.progress,
        retry_seconds=args.retry_seconds,
    )
    if client.readiness() is not None:
        print(
            f"waiting up to {args.ready_timeout:.0f} s for clip_image and clip_text to be ready at {args.url}",
            file=sys.stderr,
        )
    try:
        client.wait_until_ready(args.ready_timeout)
    except BaseException:
        client.close()
        raise
    return client


def _report_item_errors(errors: dict[int, str], names) -> None:
    for index, reason in errors.items():
        print(f"error: item {index} ({names[index]}): {reason}", file=sys.stderr)


def _classify(args) -> int:
    from clip_triton.client import ItemErrors  # noqa: PLC0415
    from clip_triton.client.zeroshot import templates  # noqa: PLC0415

    template_list = templates(args.templates) if args.templates else None
    with _client(args) as client:
        try:
            results = client.classify(args.images, args.prompts, template_list)
        except ItemErrors as err:
            _report_item_errors(err.errors, args.images)
            return 1
        facts = client.facts
    if facts.random_weights:
        print("NOTE: the served model has RANDOM weights; scores carry no meaning", file=sys.stderr)
    if facts.scoring == "sigmoid":
        print(
            f"scoring: sigmoid (logit_scale {facts.logit_scale:.4g}, logit_bias {facts.logit_bias:.4g}): "
            "each prompt's probability on its own, they need not sum to 1"
        )
    for image, ranked in zip(args.images, results):
        print(image)
        print(f"  {'rank':<6}{'prompt':<40}{'cosine':>9}{'probability':>13}")
        for place, row in enumerate(ranked[: args.top], start=1):
            print(f"  {place:<6}{row['prompt'][:39]:<40}{row['cosine']:>9.4f}{row['probability']:>13.4f}")
    return 0


def _read_text(path: str, flag: str) -> str:
    """A UTF-8 text file named by ``flag``, with one-line errors."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ClipTritonError(f"{flag} {path}: no such file") from None
    except IsADirectoryError:
        raise ClipTritonError(f"{flag} {path} is a folder", "pass a text file") from None
    except UnicodeDecodeError as exc:
        line = Path(path).read_bytes()[: exc.start].count(b"\n") + 1
        raise ClipTritonError(
            f"{flag} {path} is not UTF-8 (byte {exc.start}, line {line})",
            "convert it first, e.g. iconv -f latin1 -t utf-8 FILE > FILE.utf8",
        ) from None


def _embed(args) -> int:
    from clip_triton.client import ItemErrors, JobFailed, JobInterrupted  # noqa: PLC0415
    from clip_triton.client.index import EmbeddingIndex, image_files, index_paths  # noqa: PLC0415

    kind = VISION.kind if args.images else TEXT.kind
    skipped: dict[str, str] = {}
    if args.images:
        files, skipped = image_files(args.images, all_files=args.all_files)
        items = [str(p) for p in files]
        if skipped:
            print(
                f"skipped {len(skipped)} files whose suffix is not an image suffix ({_suffix_counts(skipped)}); "
                "listed in the side-car JSON; --all-files tries every file by content",
                file=sys.stderr,
            )
        if not items:
            raise ClipTritonError(
                f"no images under {args.images}",
                "accepted suffixes: .jpg .jpeg .png .webp .bmp .gif .tif .tiff, or --all-files to try every file",
            )
    else:
        items = [line for line in _read_text(args.texts, "--texts").splitlines() if line.strip()]
        if not items:
            raise ClipTritonError(f"--texts {args.texts} has no non-empty line", "one text per line")
    npy, meta = index_paths(args.out)
    done: dict[str, int] = {}
    previous = None
    if (npy.exists() or meta.exists()) and not args.force:
        previous = EmbeddingIndex.load(args.out)
        if previous.kind != kind:
            raise ClipTritonError(
                f"{npy} holds {previous.kind} embeddings, not {kind}", "choose another --out, or --force to replace it"
            )
        done = {item: row for row, item in enumerate(previous.items)}
    todo = [item for item in dict.fromkeys(items) if item not in done]
    answered: dict[str, object] = {}
    failed: dict[str, str] = {}
    unanswered: list[str] = []
    interrupted = False
    with _client(args) as client:
        facts = client.facts
        if previous is not None and (previous.model, previous.pretrained) != (facts.model, facts.pretrained):
            raise ClipTritonError(
                f"{npy} was embedded by {previous.model} ({previous.pretrained}); the server serves "
                f"{facts.model} ({facts.pretrained})",
                "choose another --out, or --force to replace it",
            )
        if done:
            print(
                f"resuming {npy}: {len(items) - len(todo)} of {len(items)} items already embedded; "
                f"embedding {len(todo)}",
                file=sys.stderr,
            )
        rows = None
        if todo:
            embed = client.embed_images if args.images else client.embed_texts
            try:
                rows, refused = embed(todo), {}
            except JobInterrupted as err:
                rows, refused, interrupted = err.embeddings, err.errors, True
                unanswered = [todo[i] for i in sorted(set(range(len(todo))) - set(err.answered) - set(err.errors))]
            except JobFailed as err:  # retries did not outlast the failure: keep every row answered
                print(f"error: {err}", file=sys.stderr)
                rows, refused = err.embeddings, err.errors
                unanswered = [todo[i] for i in sorted(set(range(len(todo))) - set(err.answered) - set(err.errors))]
            except ItemErrors as err:
                _report_item_errors(err.errors, todo)
                rows, refused = err.embeddings, err.errors
            failed = {todo[i]: reason for i, reason in refused.items()}
            missing = set(failed) | set(unanswered)
            answered = {item: rows[i] for i, item in enumerate(todo) if item not in missing}
    import numpy as np  # noqa: PLC0415

    keep = [item for item in dict.fromkeys(items) if item in done or item in answered]
    vectors = [previous.embeddings[done[item]] if item in done else answered[item] for item in keep]
    matrix = np.stack(vectors) if vectors else np.zeros((0, facts.embed_dim), dtype=np.float32)
    index = EmbeddingIndex(
        keep,
        matrix,
        kind=kind,
        model=facts.model,
        pretrained=facts.pretrained,
        failed=failed,
        unanswered=unanswered,
        skipped=skipped,
        interrupted=interrupted,
    )
    index.save(args.out)
    missing = [f"{n} {what}" for n, what in ((len(unanswered), "unanswered"), (len(failed), "refused")) if n]
    print(
        f"wrote {npy} ({len(keep)} x {facts.embed_dim} float32) and {meta}"
        + (f"; items without a row: {', '.join(missing)} (listed there)" if missing else "")
    )
    if interrupted:
        print(
            f"interrupted: {len(keep)} of {len(dict.fromkeys(items))} items written; rerun the same command to "
            "embed the rest",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    if unanswered or (failed and not args.skip_errors):
        return 1
    return 0


def _suffix_counts(skipped: dict[str, str]) -> str:
    from collections import Counter  # noqa: PLC0415

    counts = Counter(Path(path).suffix.lower() or "(none)" for path in skipped)
    return ", ".join(f"{suffix} x{n}" for suffix, n in counts.most_common(6)) + (", ..." if len(counts) > 6 else "")


def _search(args) -> int:
    from clip_triton.client.index import EmbeddingIndex  # noqa: PLC0415

    index = EmbeddingIndex.load(args.index)
    with _client(args) as client:
        index.client = client
        hits = index.search_text(args.text, args.k) if args.text is not None else index.search_image(args.image, args.k)
    print(f"  {'rank':<6}{'cosine':>8}  item")
    for place, hit in enumerate(hits, start=1):
        print(f"  {place:<6}{hit.score:>8.4f}  {hit.item}")
    return 0


def _eval(args) -> int:
    from clip_triton.client.zeroshot import evaluate  # noqa: PLC0415

    return _evaluation(
        args,
        "accuracy",
        lambda client: evaluate(
            client, args.dataset, classnames=args.classnames, template_set=args.templates, limit=args.limit
        ),
    )


def _eval_retrieval(args) -> int:
    from clip_triton.client.retrieval import evaluate_retrieval  # noqa: PLC0415

    return _evaluation(
        args,
        "recall",
        lambda client: evaluate_retrieval(
            client, args.images, args.captions, ks=_int_list(args.k, "-k"), limit=args.limit, split=args.split
        ),
    )


def _evaluation(args, figure: str, run) -> int:
    """Run an evaluation through the deployment; print its table (and write its JSON with --json)."""
    import json  # noqa: PLC0415

    with _client(args) as client:
        result = run(client)
        random_weights = client.facts.random_weights
    print(result.table())
    if args.json:
        Path(args.json).write_text(json.dumps(result.to_dict(), indent=1, ensure_ascii=False) + "\n")
        print(f"wrote {args.json}", file=sys.stderr)
    if random_weights:
        print(f"NOTE: the served model has RANDOM weights; {figure} is chance level", file=sys.stderr)
    return 0


def _int_list(text: str, flag: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        values = ()
    if not values or min(values) < 1:
        raise ClipTritonError(f"{flag} {text!r}: expected positive integers separated by commas, e.g. 1,4,16")
    return values


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every flag's default in its help (flags without a value, and defaults that are None, describe
    themselves in words)."""

    def _get_help_string(self, action):
        if action.default is None or isinstance(action.default, bool) or "%(default)" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def _parser(sub, name: str, help_text: str) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=help_text, description=help_text, formatter_class=_HelpFormatter)


def _progress_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bar with rate and ETA on stderr (default: on when stderr is a terminal)",
    )


def _cpu_args(p: argparse.ArgumentParser, applies: str) -> None:
    p.add_argument(
        "--cpu-runtime",
        "--cpu-engine",
        dest="cpu_runtime",
        choices=CPU_RUNTIMES,
        default="onnxruntime",
        help=f"what runs the graphs on the CPU{applies} (--cpu-engine: old spelling)",
    )
    p.add_argument(
        "--cpu-precision",
        choices=CPU_PRECISIONS,
        default="fp32",
        help="what CPU encoders compute in: fp32 (exact) or bf16 (OpenVINO, on CPUs with AVX512-BF16 or "
        "AMX; elsewhere OpenVINO computes in fp32 and says so)",
    )


def _client_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--url",
        default=os.environ.get("CLIP_TRITON_URL", DEFAULT_URL),
        help="Triton gRPC host:port, dns:///name:port, or several comma-separated ($CLIP_TRITON_URL)",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=None,
        help="deadline of each request in seconds (default: automatic, scaled to the items in flight and "
        "the server's measured speed, at least 60 s)",
    )
    p.add_argument(
        "--ready-timeout",
        type=float,
        default=120.0,
        help="seconds to wait for the server's clip_image and clip_text to be ready",
    )
    p.add_argument("--concurrency", type=int, default=4, help="requests in flight")
    p.add_argument("--batch-size", type=int, default=None, help="items per request (default: the server's max)")
    p.add_argument(
        "--retry-seconds",
        type=float,
        default=150.0,
        help="keep retrying a server that is restarting or unreachable this long before giving up; "
        "rows answered by then are kept",
    )
    _progress_arg(p)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__  # noqa: PLC0415
    from .server import DEFAULT_RESPONSE_CACHE_MIB  # noqa: PLC0415 (stdlib-only module)

    parser = argparse.ArgumentParser(prog="clip-triton", description=__doc__, formatter_class=_HelpFormatter)
    parser.add_argument("--version", action="version", version=f"clip-triton {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = _parser(sub, "export", "export open_clip's vision and text towers to verified ONNX graphs")
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
        action="store_true",
        help="also convert each tower to OpenVINO IR straight from the PyTorch module (verified like the "
        "graphs); OpenVINO runtimes then serve it: faster than OpenVINO on the ONNX (docs/benchmarks.md)",
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
    _progress_arg(p)
    p.set_defaults(func=_export)

    p = _parser(sub, "verify", "re-check an export folder against open_clip PyTorch")
    p.add_argument("onnx_dir_positional", nargs="?", metavar="ONNX_DIR", help="export folder (same as --onnx-dir)")
    p.add_argument("--onnx-dir", default=None, help="export folder written by `clip-triton export`")
    p.add_argument("--seed", type=int, default=None, help="override the recorded seed (random-weight exports)")
    p.add_argument("--checkpoint", default=None, help="override the recorded checkpoint path")
    _cpu_args(p, "")
    p.set_defaults(func=_verify)

    p = _parser(sub, "repo", "write a Triton model repository (ensemble) for an export")
    p.add_argument("--runtime", choices=RUNTIMES, default="tensorrt", help="what runs the encoders")
    p.add_argument("--onnx-dir", default=None, help="export folder (default: none; ViT-bigG-14 defaults, no graphs)")
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
        default=None,
        help="public model id that clients and the gateway see (default: the architecture name; never "
        "a checkpoint path)",
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
    _cpu_args(p, " (--runtime python)")
    p.add_argument(
        "--encoder-threads",
        dest="encoder_threads",
        type=int,
        default=0,
        help="CPU encoders: threads per instance, 0 = all cores (--runtime python or openvino)",
    )
    p.add_argument(
        "--max-image-pixels",
        type=int,
        default=None,
        help="refuse images over this many pixels, read from the header (default: 50,000,000)",
    )
    p.set_defaults(func=_repo)

    p = _parser(sub, "build-engines", "build and validate TensorRT engines (GPU host, TensorRT container)")
    p.add_argument("--onnx-dir", required=True, help="export folder (graphs, manifest.json, references.npz)")
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
    p.set_defaults(func=_build_engines)

    p = _parser(
        sub,
        "check-engines",
        "refuse engines that failed validation or were built for another TensorRT version or GPU (exit 2)",
    )
    p.add_argument("--repo", required=True, help="TensorRT repository (each encoder's plan with its engine.json)")
    p.add_argument(
        "--onnx-dir",
        default=None,
        help="also require the engines to be built from exactly these graphs (sha256): "
        "exit 0 means they are current and need no rebuild",
    )
    p.set_defaults(func=_check_engines)

    p = _parser(sub, "serve", "run the pip-installed tritonserver on a model repository (CPU)")
    p.add_argument("--repo", required=True, help="repository written by `clip-triton repo --runtime python`")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--http-port", type=int, default=8000, help="Triton HTTP port")
    p.add_argument("--grpc-port", type=int, default=8001, help="Triton gRPC port")
    p.add_argument("--metrics-port", type=int, default=8002, help="Prometheus metrics port")
    p.add_argument("--log-verbose", type=int, default=0, help="tritonserver --log-verbose level")
    p.add_argument("--startup-timeout", type=float, default=300, help="seconds to wait for the models to load")
    p.add_argument(
        "--response-cache-mib",
        type=float,
        default=DEFAULT_RESPONSE_CACHE_MIB,
        help="size of Triton's local response cache, for the ensembles whose config enables it "
        "(`repo --response-cache`); 0: off",
    )
    p.add_argument(
        "--watchdog-interval",
        type=float,
        default=15.0,
        help="seconds between liveness probes (0: off). A crashed tritonserver is restarted at once; "
        "a live one only on evidence of death, 2 probes in a row: a dead python stub, no answer, "
        "or a failed canary while no request completes (busy is not dead)",
    )
    p.add_argument("--watchdog-timeout", type=float, default=10.0, help="the probe's canary deadline in seconds")
    p.set_defaults(func=_serve)

    p = _parser(
        sub,
        "health",
        "liveness: a canary request through each ensemble; a server that is busy "
        "(requests keep completing) counts as alive, only evidence of death fails",
    )
    p.add_argument(
        "--url",
        default=os.environ.get("CLIP_TRITON_URL", DEFAULT_URL),
        help="Triton gRPC host:port ($CLIP_TRITON_URL)",
    )
    p.add_argument(
        "--metrics-url",
        default=None,
        help="Triton's Prometheus metrics, read to tell busy from dead (default: http://HOST:8002/metrics; "
        "'none': judge by the canary alone)",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=10.0,
        help="the probe's whole budget in seconds (the canary's two requests and the metrics reads; "
        "at least 5, the window that tells busy from dead): keep the orchestrator's probe timeout above "
        "it by a few seconds",
    )
    p.set_defaults(func=_health)

    p = _parser(sub, "demo", "offline main job: export a small model, serve it, classify sample photos")
    p.add_argument("--model", default="ViT-B-32", help="open_clip architecture name or model-config JSON path")
    p.add_argument(
        "--pretrained", default="none", help="pretrained tag, checkpoint path, or 'none' (random weights: offline)"
    )
    p.add_argument(
        "--workdir",
        default=os.path.join(".clip-triton", "demo"),
        help="folder for the export, the repository and the server log (reused across runs)",
    )
    p.add_argument("--images", nargs="*", default=None, help="image files (default: the bundled photographs)")
    p.add_argument("--prompts", nargs="*", default=None, help="prompts (default: five about the bundled photographs)")
    _cpu_args(p, "")
    p.set_defaults(func=_demo)

    p = _parser(sub, "gateway", "OpenAI-compatible HTTP API in front of Triton (needs the gateway extra)")
    p.add_argument(
        "--url",
        default=os.environ.get("CLIP_TRITON_URL", DEFAULT_URL),
        help="Triton gRPC host:port, dns:///name:port, or several comma-separated ($CLIP_TRITON_URL)",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=8080, help="port to listen on")
    p.add_argument(
        "--served-model-name",
        default=None,
        help="the model id clients send and /v1/models lists (default: the repository's "
        "served_model_name, else the architecture name)",
    )
    p.add_argument(
        "--tokenizer-dir",
        default=os.environ.get("CLIP_TRITON_TOKENIZER_DIR"),
        help="folder with the served model's tokenizer.json, for models with a Hugging Face tokenizer "
        "(SigLIP, MetaCLIP 2): usage tokens are counted with it; the repository's tokenizer/1 "
        "($CLIP_TRITON_TOKENIZER_DIR)",
    )
    p.add_argument("--api-key-file", default=None, help="file with one API key per line (also: $CLIP_TRITON_API_KEYS)")
    p.add_argument("--no-auth", action="store_true", help="accept requests without an API key (local use only)")
    p.add_argument(
        "--docs",
        action="store_true",
        help="serve the interactive API docs (/docs, /redoc, /openapi.json); off by default, and open "
        "to anyone who reaches the gateway when on",
    )
    p.add_argument(
        "--allow-private-urls",
        action="store_true",
        help="let image URLs point at private, loopback or link-local addresses",
    )
    p.add_argument("--max-body-mib", type=float, default=64, help="largest request body")
    p.add_argument("--max-items", type=int, default=256, help="items per request")
    p.add_argument("--fetch-timeout", type=float, default=10.0, help="seconds per image URL")
    p.add_argument("--fetch-max-mib", type=float, default=20.0, help="bytes per image URL")
    p.set_defaults(func=_gateway)

    p = _parser(sub, "classify", "zero-shot classify images against prompts (ranked table)")
    p.add_argument("images", nargs="+", help="image paths or http(s) URLs")
    p.add_argument("--prompts", nargs="+", required=True, help="one prompt per class")
    p.add_argument(
        "--templates",
        choices=["openai", "simple"],
        default=None,
        help="ensemble each prompt over open_clip's templates (default: the prompts as written)",
    )
    p.add_argument("--top", type=int, default=5, help="rows shown per image")
    _client_args(p)
    p.set_defaults(func=_classify)

    p = _parser(
        sub,
        "embed",
        "embed a folder of images or a text file (one text a line) into an index (.npy + .json); a rerun resumes",
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", help="folder of images (recursive)")
    source.add_argument("--texts", help="UTF-8 file, one text per line")
    p.add_argument(
        "--out",
        required=True,
        help="index to write: NAME.npy and NAME.json (a rerun embeds only the items without a row)",
    )
    p.add_argument("--force", action="store_true", help="start over instead of resuming an existing --out")
    p.add_argument(
        "--skip-errors",
        action="store_true",
        help="exit 0 although the server refused some items (they are listed in the .json either way)",
    )
    p.add_argument(
        "--all-files",
        action="store_true",
        help="--images: try every file by content, not only image suffixes (refused files are "
        "reported like any bad item); without it, other files are skipped and listed",
    )
    _client_args(p)
    p.set_defaults(func=_embed)

    p = _parser(sub, "search", "search an index written by `clip-triton embed` (or EmbeddingIndex.save)")
    p.add_argument("--index", required=True, help="NAME.npy (or NAME) written by `clip-triton embed`")
    query = p.add_mutually_exclusive_group(required=True)
    query.add_argument("--text", help="query text")
    query.add_argument("--image", help="query image path or http(s) URL")
    p.add_argument("-k", type=int, default=5, help="results to show")
    _client_args(p)
    p.set_defaults(func=_search)

    p = _parser(sub, "eval", "zero-shot top-1/top-5 and per-class accuracy over an ImageFolder dataset")
    p.add_argument("dataset", help="ROOT/CLASS/IMAGE folders")
    p.add_argument(
        "--classnames",
        default="folder",
        help="'folder' (folder names, _ as space), 'imagenet' (open_clip's 1000 names in sorted-wnid "
        "order), a file with one name per line in folder order, or a comma-separated list",
    )
    p.add_argument(
        "--templates",
        default="openai",
        help="'openai' (80), 'simple' (7), 'none' (the class name alone), or a file with one template per "
        "line, {} standing for the class name",
    )
    p.add_argument("--limit", type=int, default=None, help="evaluate the first N images only (default: all)")
    p.add_argument("--json", default=None, help="also write the report as JSON to this file")
    _client_args(p)
    p.set_defaults(func=_eval)

    p = _parser(
        sub,
        "eval-retrieval",
        "image-text retrieval recall@k over an image-caption dataset (COCO or Flickr30k/Karpathy captions JSON)",
    )
    p.add_argument("--images", required=True, help="folder the captions file's image names are relative to")
    p.add_argument(
        "--captions",
        required=True,
        help="COCO captions JSON (images + annotations) or Karpathy JSON (images[].filename, sentences)",
    )
    p.add_argument(
        "--split", default=None, help="Karpathy JSON: evaluate this split only, e.g. test (default: every image)"
    )
    p.add_argument("-k", default="1,5,10", help="comma-separated k of recall@k")
    p.add_argument("--limit", type=int, default=None, help="evaluate the first N images only (default: all)")
    p.add_argument("--json", default=None, help="also write the report as JSON to this file")
    _client_args(p)
    p.set_defaults(func=_eval_retrieval)

    p = _parser(sub, "perf", "run perf_analyzer against the ensembles with real inputs (bundled JPEGs, prompts)")
    p.add_argument(
        "--url",
        default=os.environ.get("CLIP_TRITON_URL", DEFAULT_URL),
        help="Triton gRPC host:port ($CLIP_TRITON_URL)",
    )
    p.add_argument(
        "--ensembles",
        nargs="+",
        choices=[tower.ensemble for tower in TOWERS],
        default=[tower.ensemble for tower in TOWERS],
        help="ensembles to measure",
    )
    p.add_argument("--batch-size", default="1", help="comma-separated batch sizes")
    p.add_argument("--concurrency", default="1,4", help="comma-separated concurrency levels")
    p.add_argument("--measurement-ms", type=int, default=4000, help="perf_analyzer measurement window")
    p.add_argument(
        "--print-command",
        action="store_true",
        help="print each perf_analyzer command line (with its environment) before running it",
    )
    p.set_defaults(func=_perf)
    return parser


# Flags that only mean something with another flag's value: (command, flag's dest, predicate on args, why).
_APPLIES = [
    (
        "export",
        "seed",
        lambda a: str(a.pretrained).lower() == "none",
        "--seed seeds random weights: it needs --pretrained none",
    ),
    ("export", "verify_batches", lambda a: not a.no_verify, "--verify-batches has no effect with --no-verify"),
    (
        "export",
        "openvino_ir",
        lambda a: a.precision == "fp32",
        "--openvino-ir converts fp32 exports (OpenVINO picks fp32 or bf16 compute itself): drop --precision fp16",
    ),
    (
        "export",
        "cache_dir",
        lambda a: str(a.pretrained).lower() != "none" and not Path(str(a.pretrained)).exists(),
        "--cache-dir is the hub download cache: it needs --pretrained TAG",
    ),
    (
        "repo",
        "cpu_runtime",
        lambda a: a.runtime == "python",
        "--cpu-runtime chooses the python backend's CPU library: it needs --runtime python",
    ),
    (
        "repo",
        "cpu_precision",
        lambda a: a.runtime in ("python", "openvino"),
        "--cpu-precision applies to CPU encoders: --runtime python or openvino",
    ),
    (
        "repo",
        "encoder_threads",
        lambda a: a.runtime in ("python", "openvino"),
        "--encoder-threads applies to CPU encoders: --runtime python or openvino",
    ),
    ("embed", "all_files", lambda a: bool(a.images), "--all-files applies to --images"),
    (
        "serve",
        "watchdog_timeout",
        lambda a: a.watchdog_interval > 0,
        "--watchdog-timeout has no effect with --watchdog-interval 0 (watchdog off)",
    ),
    ("gateway", "api_key_file", lambda a: not a.no_auth, "--api-key-file has no effect with --no-auth"),
    (
        "verify",
        "cpu_precision",
        lambda a: a.cpu_precision == "fp32" or a.cpu_runtime == "openvino",
        "--cpu-precision bf16 needs --cpu-runtime openvino",
    ),
    (
        "demo",
        "cpu_precision",
        lambda a: a.cpu_precision == "fp32" or a.cpu_runtime == "openvino",
        "--cpu-precision bf16 needs --cpu-runtime openvino",
    ),
]


def check_combinations(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse a flag given where the other flags make it meaningless, instead of silently dropping it."""
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[args.command]
    for command, dest, applies, why in _APPLIES:
        if command == args.command and getattr(args, dest) != sub.get_default(dest) and not applies(args):
            raise ClipTritonError(why)
    if args.command == "verify":
        if args.onnx_dir and args.onnx_dir_positional and args.onnx_dir != args.onnx_dir_positional:
            raise ClipTritonError("two export folders given (ONNX_DIR and --onnx-dir)", "pass one")
        args.onnx_dir = args.onnx_dir or args.onnx_dir_positional
        if not args.onnx_dir:
            raise ClipTritonError("verify needs the export folder", "clip-triton verify --onnx-dir DIR")


# A missing optional dependency, named by module, and the extra that brings it.
EXTRAS = {
    "torch": "export",
    "torchvision": "export",
    "open_clip": "export",
    "onnx": "export",
    "onnxscript": "export",
    "onnxruntime": "serve",
    "tritonclient": "client",
    "fastapi": "gateway",
    "uvicorn": "gateway",
    "httpx": "gateway",
    "prometheus_client": "gateway",
    "tensorrt": "gpu",
    "polygraphy": "gpu",
    "openvino": "cpu",
    "pytriton": "serve",
    "tqdm": "client",
    "pydantic": "gateway",
}


def missing_extra(exc: ImportError, command: str) -> ClipTritonError | None:
    """The one-line error for ``clip-triton COMMAND`` run without the extra it needs, or None."""
    name = (exc.name or "").split(".")[0]
    extra = EXTRAS.get(name)
    if extra is None:
        return None
    if command == "export" and extra == "serve":
        extra = "export"  # export verifies with ONNX Runtime: the export extra brings it
    return ClipTritonError(
        f"`clip-triton {command}` needs {name}, which is not installed", f"pip install 'clip-triton[{extra}]'"
    )


def main(argv: list[str] | None = None) -> int:
    from .progress import configure_cli_logging  # noqa: PLC0415

    parser = build_parser()
    args = parser.parse_args(argv)
    configure_cli_logging()
    try:
        check_combinations(parser, args)
        return int(args.func(args) or 0)
    except VerificationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_VERIFICATION_FAILED
    except ClipTritonError as exc:  # the client's errors included (ClipClientError is one)
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except ImportError as exc:
        error = missing_extra(exc, args.command)
        if error is None:
            raise
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
