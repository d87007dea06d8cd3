"""The ``clip-triton`` command. Each subcommand imports only what its role needs."""

from __future__ import annotations

import argparse
import os
import sys

from .contract import DEFAULT_MODEL, DEFAULT_PRETRAINED, PRECISIONS, RUNTIMES
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

    verify_export(args.onnx_dir, seed=args.seed, checkpoint=args.checkpoint)
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
        ort_threads=args.ort_threads,
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
    return server.run_foreground(timeout=args.startup_timeout)


def _demo(args) -> int:
    from .demo import run_demo  # noqa: PLC0415

    return run_demo(model=args.model, pretrained=args.pretrained, workdir=args.workdir, images=args.images,
                    prompts=args.prompts)


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
    p.add_argument("--ort-threads", type=int, default=0, help="ONNX Runtime intra-op threads (0: all cores)")
    p.add_argument("--max-image-pixels", type=int, default=None)
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    p.set_defaults(func=_repo)

    p = sub.add_parser("serve", help="run the pip-installed tritonserver on a model repository (CPU)")
    p.add_argument("--repo", required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--grpc-port", type=int, default=8001)
    p.add_argument("--metrics-port", type=int, default=8002)
    p.add_argument("--log-verbose", type=int, default=0)
    p.add_argument("--startup-timeout", type=float, default=300)
    p.set_defaults(func=_serve)

    p = sub.add_parser("demo", help="offline main job: export a small model, serve it, classify sample photos")
    p.add_argument("--model", default="ViT-B-32")
    p.add_argument("--pretrained", default="none")
    p.add_argument("--workdir", default=os.path.join(".clip-triton", "demo"))
    p.add_argument("--images", nargs="*", default=None, help="image files (default: bundled photographs)")
    p.add_argument("--prompts", nargs="*", default=None)
    p.set_defaults(func=_demo)
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
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
