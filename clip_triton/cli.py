"""The ``clip-triton`` command. Each subcommand imports only what its role needs."""

from __future__ import annotations

import argparse
import os
import sys

from .contract import CPU_ENGINES, CPU_PRECISIONS, DEFAULT_MODEL, DEFAULT_PRETRAINED, PRECISIONS, RUNTIMES
from .errors import ClipTritonError, VerificationError

EXIT_USER_ERROR = 2
EXIT_VERIFICATION_FAILED = 3


def _export(args) -> int:
    from clip_triton.export import export_model  # noqa: PLC0415

    batches = tuple(int(b) for b in args.verify_batches.split(","))
    export_model(
        args.model,
        args.pretrained,
        args.out,
        precision=args.precision,
        opset=args.opset,
        seed=args.seed,
        verify=not args.no_verify,
        verify_batches=batches,
        external_threshold=int(args.external_data_threshold_mib * 1024**2),
        cache_dir=args.cache_dir,
    )
    return 0


def _verify(args) -> int:
    from clip_triton.export import verify_export  # noqa: PLC0415

    verify_export(args.onnx_dir, seed=args.seed, checkpoint=args.checkpoint, engine=args.cpu_engine,
                  cpu_precision=args.cpu_precision)
    return 0


def _build_engines(args) -> int:
    from clip_triton.export.engines import BuildOptions, build_engines  # noqa: PLC0415

    options = BuildOptions(optimization_level=args.optimization_level, workspace_gib=args.workspace_gib,
                           timing_cache=args.timing_cache,
                           strongly_typed=None if args.typing == "auto" else args.typing == "strong")
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
        cpu_engine=args.cpu_engine,
        cpu_precision=args.cpu_precision,
        encoder_threads=args.encoder_threads,
        max_image_pixels=args.max_image_pixels,
    )
    path = write_repository(args.out, onnx_dir=args.onnx_dir, options=options, force=args.force)
    print(f"wrote Triton model repository {path} ({args.runtime})")
    return 0


def _serve(args) -> int:
    from .server import TritonServer  # noqa: PLC0415

    server = TritonServer(
        args.repo,
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        metrics_port=args.metrics_port,
        host=args.host,
        log_verbose=args.log_verbose,
    )
    return server.run_foreground(timeout=args.startup_timeout, watchdog_interval=args.watchdog_interval,
                                 canary_timeout=args.watchdog_timeout)


def _health(args) -> int:
    from .health import metrics_url_for, probe  # noqa: PLC0415

    metrics = None if args.metrics_url == "none" else (args.metrics_url or metrics_url_for(args.url))
    alive, reason = probe(args.url, metrics, timeout=args.timeout)
    print(("healthy" if alive else "UNHEALTHY") + f": {reason}", file=sys.stdout if alive else sys.stderr)
    return 0 if alive else 1


def _demo(args) -> int:
    from .demo import run_demo  # noqa: PLC0415

    return run_demo(model=args.model, pretrained=args.pretrained, workdir=args.workdir, images=args.images,
                    prompts=args.prompts, cpu_engine=args.cpu_engine, cpu_precision=args.cpu_precision)


def _gateway(args) -> int:
    from .gateway import FetchPolicy, GatewaySettings, serve_gateway  # noqa: PLC0415

    keys = tuple(k.strip() for k in os.environ.get("CLIP_TRITON_API_KEYS", "").split(",") if k.strip())
    if args.api_key_file:
        with open(args.api_key_file, encoding="utf-8") as handle:
            keys += tuple(line.strip() for line in handle if line.strip())
    settings = GatewaySettings(
        triton_url=args.url, api_keys=keys, auth=not args.no_auth,
        max_body_bytes=int(args.max_body_mib * 1024**2), max_items=args.max_items, docs=args.docs,
        fetch=FetchPolicy(timeout_s=args.fetch_timeout, max_bytes=int(args.fetch_max_mib * 1024**2),
                          allow_private=args.allow_private_urls))
    serve_gateway(settings, host=args.host, port=args.port)
    return 0


def _client(args):
    from clip_triton.client import ClipClient  # noqa: PLC0415

    urls = [u.strip() for u in args.url.split(",") if u.strip()]
    retry = {} if args.retry_seconds is None else {"retry_seconds": args.retry_seconds}
    client = ClipClient(urls if len(urls) > 1 else urls[0], timeout=args.timeout, concurrency=args.concurrency,
                        batch_size=args.batch_size, progress=args.progress, **retry)
    client.wait_until_ready(args.timeout)
    return client


def _report_item_errors(err, names) -> None:
    for index, reason in err.errors.items():
        print(f"error: item {index} ({names[index]}): {reason}", file=sys.stderr)


def _classify(args) -> int:
    from clip_triton.client import ItemErrors  # noqa: PLC0415
    from clip_triton.client.zeroshot import templates  # noqa: PLC0415

    with _client(args) as client:
        try:
            results = client.classify(args.images, args.prompts, templates(args.templates) if args.templates else None)
        except ItemErrors as err:
            _report_item_errors(err, args.images)
            return 1
        facts = client.facts
    if facts.random_weights:
        print("NOTE: the served model has RANDOM weights; scores carry no meaning", file=sys.stderr)
    for image, ranked in zip(args.images, results):
        print(image)
        print(f"  {'rank':<6}{'prompt':<40}{'cosine':>9}{'probability':>13}")
        for place, row in enumerate(ranked[: args.top], start=1):
            print(f"  {place:<6}{row['prompt'][:39]:<40}{row['cosine']:>9.4f}{row['probability']:>13.4f}")
    return 0


def _embed(args) -> int:
    import json  # noqa: PLC0415
    from pathlib import Path  # noqa: PLC0415

    import numpy as np  # noqa: PLC0415

    from clip_triton.client import ItemErrors, JobFailed  # noqa: PLC0415
    from clip_triton.client.zeroshot import IMAGE_SUFFIXES  # noqa: PLC0415

    skipped: dict[str, str] = {}
    if args.images:
        files = sorted(p for p in Path(args.images).rglob("*") if p.is_file())
        if args.all_files:
            items = [str(p) for p in files]  # the server decides by content; refusals are reported per item
        else:
            items = [str(p) for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
            skipped = {str(p): f"suffix {p.suffix or '(none)'} is not an image suffix" for p in files
                       if p.suffix.lower() not in IMAGE_SUFFIXES}
            if skipped:
                print(f"skipped {len(skipped)} files whose suffix is not an image suffix ({_suffix_counts(skipped)}); "
                      "listed in the side-car JSON; --all-files tries every file by content", file=sys.stderr)
        if not items:
            raise ClipTritonError(f"no images under {args.images}", f"accepted suffixes: {sorted(IMAGE_SUFFIXES)}, "
                                                                    "or --all-files to try every file")
    else:
        items = [line.rstrip("\n") for line in Path(args.texts).read_text(encoding="utf-8").splitlines() if line.strip()]
    unanswered: list[int] = []
    with _client(args) as client:
        try:
            embeddings = client.embed_images(items) if args.images else client.embed_texts(items)
            failed = {}
        except JobFailed as err:  # the server stayed unreachable: keep every row already answered
            print(f"error: {err}", file=sys.stderr)
            embeddings, failed = err.embeddings, err.errors
            unanswered = sorted(set(range(len(items))) - set(err.answered) - set(failed))
        except ItemErrors as err:
            _report_item_errors(err, items)
            if not args.skip_errors:
                return 1
            embeddings, failed = err.embeddings, err.errors
        facts = client.facts
    dropped = set(failed) | set(unanswered)
    keep = [i for i in range(len(items)) if i not in dropped]
    out = Path(args.out)
    np.save(out, embeddings[keep])
    meta = {"kind": "image" if args.images else "text", "items": [items[i] for i in keep], "model": facts.model,
            "pretrained": facts.pretrained, "embed_dim": facts.embed_dim, "failed": {items[i]: r for i, r in failed.items()},
            "unanswered": [items[i] for i in unanswered], "skipped": skipped}
    out.with_suffix(".json").write_text(json.dumps(meta, indent=1, ensure_ascii=False))
    print(f"wrote {out} ({len(keep)} x {facts.embed_dim} float32) and {out.with_suffix('.json')}"
          + (f"; {len(unanswered)} items unanswered (listed there)" if unanswered else ""))
    return 1 if unanswered else 0


def _suffix_counts(skipped: dict[str, str]) -> str:
    from collections import Counter  # noqa: PLC0415
    from pathlib import Path  # noqa: PLC0415

    counts = Counter(Path(path).suffix.lower() or "(none)" for path in skipped)
    return ", ".join(f"{suffix} x{n}" for suffix, n in counts.most_common(6)) + (", ..." if len(counts) > 6 else "")


def _search(args) -> int:
    import json  # noqa: PLC0415
    from pathlib import Path  # noqa: PLC0415

    import numpy as np  # noqa: PLC0415

    from clip_triton.client import ClipClient  # noqa: PLC0415

    index = np.load(args.index)
    meta = json.loads(Path(args.index).with_suffix(".json").read_text())
    with _client(args) as client:
        query = client.embed_texts([args.text]) if args.text else client.embed_images([args.image])
    top, scores = ClipClient.search(query, index, args.k)
    print(f"  {'rank':<6}{'cosine':>8}  item")
    for place, (i, score) in enumerate(zip(top[0], scores[0]), start=1):
        print(f"  {place:<6}{score:>8.4f}  {meta['items'][i]}")
    return 0


def _eval(args) -> int:
    from clip_triton.client.zeroshot import evaluate  # noqa: PLC0415

    with _client(args) as client:
        result = evaluate(client, args.dataset, classnames=args.classnames, template_set=args.templates,
                          limit=args.limit)
        random_weights = client.facts.random_weights
    print(result.table())
    if random_weights:
        print("NOTE: the served model has RANDOM weights; accuracy is chance level", file=sys.stderr)
    return 0


def _client_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default=os.environ.get("CLIP_TRITON_URL", "localhost:8001"),
                   help="Triton gRPC host:port, dns:///name:port, or several comma-separated")
    p.add_argument("--timeout", type=float, default=60.0)
    p.add_argument("--concurrency", type=int, default=4, help="requests in flight")
    p.add_argument("--batch-size", type=int, default=None, help="items per request (default: server max)")
    p.add_argument("--progress", action="store_true", help="print progress for long jobs")
    p.add_argument("--retry-seconds", type=float, default=None,
                   help="keep retrying a server that is restarting or unreachable this long before giving up; "
                        "rows answered by then are kept (default: the client's, 150)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clip-triton", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("export", help="export open_clip's vision and text towers to verified ONNX graphs")
    p.add_argument("--model", default=DEFAULT_MODEL, help="open_clip architecture name or model-config JSON path")
    p.add_argument("--pretrained", default=DEFAULT_PRETRAINED,
                   help="pretrained tag (hub download), checkpoint file path, or 'none' for random weights")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset, 17-20 (default 18)")
    p.add_argument("--seed", type=int, default=0, help="seed for --pretrained none (recorded in the manifest)")
    p.add_argument("--no-verify", action="store_true", help="skip ONNX Runtime vs PyTorch verification")
    p.add_argument("--verify-batches", default="1,3,8", help="comma-separated batch sizes to verify")
    p.add_argument("--external-data-threshold-mib", type=float, default=1.8 * 1024,
                   help="write weights to a .data file beside a graph above this size (default 1843.2 MiB)")
    p.add_argument("--cache-dir", default=None, help="download cache for hub weights")
    p.set_defaults(func=_export)

    p = sub.add_parser("verify", help="re-check an export folder against open_clip PyTorch")
    p.add_argument("onnx_dir")
    p.add_argument("--seed", type=int, default=None, help="override the recorded seed (random-weight exports)")
    p.add_argument("--checkpoint", default=None, help="override the recorded checkpoint path")
    p.add_argument("--cpu-engine", choices=CPU_ENGINES, default="onnxruntime", help="CPU engine that runs the graphs")
    p.add_argument("--cpu-precision", choices=CPU_PRECISIONS, default="fp32",
                   help="bf16: check OpenVINO's bf16 compute (tolerance: cosine >= 0.999)")
    p.set_defaults(func=_verify)

    p = sub.add_parser("repo", help="write a Triton model repository (ensemble) for an export")
    p.add_argument("--runtime", choices=RUNTIMES, default="tensorrt")
    p.add_argument("--onnx-dir", default=None, help="export folder (manifest.json + graphs); omitted: bigG defaults")
    p.add_argument("--out", required=True)
    p.add_argument("--max-batch-size", type=int, default=None)
    p.add_argument("--queue-delay-us", type=int, default=None, help="dynamic batching max queue delay")
    p.add_argument("--encoder-instances", type=int, default=1)
    p.add_argument("--preprocess-instances", type=int, default=None)
    p.add_argument("--tokenizer-instances", type=int, default=1)
    p.add_argument("--cpu-engine", choices=CPU_ENGINES, default="onnxruntime",
                   help="--runtime python: run the graphs with ONNX Runtime or OpenVINO")
    p.add_argument("--cpu-precision", choices=CPU_PRECISIONS, default="fp32",
                   help="CPU encoders compute in fp32 (exact) or bf16 (OpenVINO on AMX/AVX512-BF16 CPUs)")
    p.add_argument("--encoder-threads", "--ort-threads", type=int, default=0,
                   help="CPU encoders: threads per instance (0: all cores)")
    p.add_argument("--max-image-pixels", type=int, default=None)
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    p.set_defaults(func=_repo)

    p = sub.add_parser("build-engines", help="build and validate TensorRT engines (GPU host, TensorRT container)")
    p.add_argument("--onnx-dir", required=True, help="export folder (graphs, manifest.json, references.npz)")
    p.add_argument("--repo", required=True, help="repository written by `clip-triton repo --runtime tensorrt`")
    p.add_argument("--optimization-level", type=int, default=3, help="TensorRT builder optimisation level 0-5")
    p.add_argument("--workspace-gib", type=float, default=8.0)
    p.add_argument("--timing-cache", default=None, help="timing cache file (default: REPO/timing.cache, reused)")
    p.add_argument("--typing", choices=["auto", "strong", "weak"], default="auto",
                   help="auto: strongly typed on TensorRT >= 10.12, else the weakly typed FP16 fallback")
    p.set_defaults(func=_build_engines)

    p = sub.add_parser("check-engines", help="refuse engines that failed validation or were built for another "
                                             "TensorRT version or GPU (exit 2)")
    p.add_argument("--repo", required=True, help="TensorRT repository (each model.plan with its engine.json)")
    p.add_argument("--onnx-dir", default=None,
                   help="also require the engines to be built from exactly these graphs (sha256): "
                        "exit 0 means they are current and need no rebuild")
    p.set_defaults(func=_check_engines)

    p = sub.add_parser("serve", help="run the pip-installed tritonserver on a model repository (CPU)")
    p.add_argument("--repo", required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--grpc-port", type=int, default=8001)
    p.add_argument("--metrics-port", type=int, default=8002)
    p.add_argument("--log-verbose", type=int, default=0)
    p.add_argument("--startup-timeout", type=float, default=300)
    p.add_argument("--watchdog-interval", type=float, default=15.0,
                   help="seconds between liveness probes (0: off). A crashed tritonserver is restarted at once; "
                        "a live one only on evidence of death, 2 probes in a row: a dead python stub, no answer, "
                        "or a failed canary while no request completes (busy is not dead). Default: %(default)s")
    p.add_argument("--watchdog-timeout", type=float, default=10.0,
                   help="the probe's canary deadline in seconds (default: %(default)s)")
    p.set_defaults(func=_serve)

    p = sub.add_parser("health", help="liveness: a canary request through each ensemble; a server that is busy "
                                      "(requests keep completing) counts as alive, only evidence of death fails")
    p.add_argument("--url", default=os.environ.get("CLIP_TRITON_URL", "localhost:8001"),
                   help="Triton gRPC host:port (default: %(default)s)")
    p.add_argument("--metrics-url", default=None,
                   help="Triton's Prometheus metrics, read to tell busy from dead (default: http://HOST:8002/metrics; "
                        "'none': judge by the canary alone)")
    p.add_argument("--timeout", type=float, default=10.0, help="canary deadline in seconds (default: %(default)s)")
    p.set_defaults(func=_health)

    p = sub.add_parser("demo", help="offline main job: export a small model, serve it, classify sample photos")
    p.add_argument("--model", default="ViT-B-32")
    p.add_argument("--pretrained", default="none")
    p.add_argument("--workdir", default=os.path.join(".clip-triton", "demo"))
    p.add_argument("--images", nargs="*", default=None, help="image files (default: bundled photographs)")
    p.add_argument("--prompts", nargs="*", default=None)
    p.add_argument("--cpu-engine", choices=CPU_ENGINES, default="onnxruntime")
    p.add_argument("--cpu-precision", choices=CPU_PRECISIONS, default="fp32",
                   help="bf16 needs --cpu-engine openvino")
    p.set_defaults(func=_demo)

    p = sub.add_parser("gateway", help="OpenAI-compatible HTTP API in front of Triton")
    p.add_argument("--url", default=os.environ.get("CLIP_TRITON_URL", "localhost:8001"),
                   help="Triton gRPC host:port, dns:///name:port, or several comma-separated")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--api-key-file", default=None, help="file with one API key per line (also: $CLIP_TRITON_API_KEYS)")
    p.add_argument("--no-auth", action="store_true", help="accept requests without an API key (local use only)")
    p.add_argument("--docs", action="store_true",
                   help="serve the interactive API docs (/docs, /redoc, /openapi.json); off by default, and open "
                        "to anyone who reaches the gateway when on")
    p.add_argument("--allow-private-urls", action="store_true",
                   help="let image URLs point at private, loopback or link-local addresses")
    p.add_argument("--max-body-mib", type=float, default=64)
    p.add_argument("--max-items", type=int, default=256, help="items per request")
    p.add_argument("--fetch-timeout", type=float, default=10.0, help="seconds per image URL")
    p.add_argument("--fetch-max-mib", type=float, default=20.0, help="bytes per image URL")
    p.set_defaults(func=_gateway)

    p = sub.add_parser("classify", help="zero-shot classify images against prompts (ranked table)")
    p.add_argument("images", nargs="+", help="image paths or http(s) URLs")
    p.add_argument("--prompts", nargs="+", required=True)
    p.add_argument("--templates", choices=["openai", "simple"], default=None, help="ensemble prompt templates")
    p.add_argument("--top", type=int, default=5)
    _client_args(p)
    p.set_defaults(func=_classify)

    p = sub.add_parser("embed", help="embed a folder of images or a text file (one text a line) to .npy")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", help="folder of images (recursive)")
    source.add_argument("--texts", help="UTF-8 file, one text per line")
    p.add_argument("--out", required=True, help="output .npy (items list beside it as .json)")
    p.add_argument("--skip-errors", action="store_true", help="leave out items the server refuses")
    p.add_argument("--all-files", action="store_true",
                   help="--images: try every file by content, not only image suffixes (refused files are "
                        "reported like any bad item); without it, other files are skipped and listed")
    _client_args(p)
    p.set_defaults(func=_embed)

    p = sub.add_parser("search", help="search an index written by `clip-triton embed`")
    p.add_argument("--index", required=True, help=".npy written by `clip-triton embed`")
    query = p.add_mutually_exclusive_group(required=True)
    query.add_argument("--text")
    query.add_argument("--image")
    p.add_argument("-k", type=int, default=5)
    _client_args(p)
    p.set_defaults(func=_search)

    p = sub.add_parser("eval", help="zero-shot top-1/top-5 over an ImageFolder dataset through the deployment")
    p.add_argument("dataset", help="ROOT/CLASS/IMAGE folders")
    p.add_argument("--classnames", choices=["folder", "imagenet"], default="folder",
                   help="imagenet: open_clip's 1000 ImageNet names in sorted-wnid order")
    p.add_argument("--templates", choices=["openai", "simple", "none"], default="openai")
    p.add_argument("--limit", type=int, default=None, help="evaluate the first N images only")
    _client_args(p)
    p.set_defaults(func=_eval)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except VerificationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_VERIFICATION_FAILED
    except ClipTritonError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except Exception as exc:
        from clip_triton.client import ClipClientError  # noqa: PLC0415

        if isinstance(exc, ClipClientError):
            print(f"error: {exc} (is the server up? check --url)", file=sys.stderr)
            return EXIT_USER_ERROR
        raise
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
