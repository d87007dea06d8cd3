"""Serve commands: ``serve`` (the pip-installed tritonserver), ``health``, ``demo``, ``gateway`` (the
OpenAI-compatible API) and ``perf`` (perf_analyzer). Each declares its flags and their rules."""

from __future__ import annotations

import os
import sys

from ..contract import GATEWAY_PORT, GRPC_PORT, HTTP_PORT, METRICS_PORT, TOWERS
from .common import (
    BF16_NEEDS_OPENVINO,
    Rule,
    add_command,
    cpu_args,
    finish,
    int_list,
    read_text,
    served_model_arg,
    url_arg,
)

SERVE_RULES: list[Rule] = [
    (
        "watchdog_timeout",
        lambda a: a.watchdog_interval > 0,
        "--watchdog-timeout has no effect with --watchdog-interval 0 (watchdog off)",
    ),
]
GATEWAY_RULES: list[Rule] = [
    ("api_key_file", lambda a: not a.no_auth, "--api-key-file has no effect with --no-auth"),
]


def _serve(args) -> int:
    from ..server import TritonServer  # noqa: PLC0415

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
    from ..health import metrics_url_for, probe  # noqa: PLC0415

    metrics = None if args.metrics_url == "none" else (args.metrics_url or metrics_url_for(args.url))
    alive, reason = probe(args.url, metrics, timeout=args.timeout)
    print(("healthy" if alive else "UNHEALTHY") + f": {reason}", file=sys.stdout if alive else sys.stderr)
    return 0 if alive else 1


def _demo(args) -> int:
    from ..demo import run_demo  # noqa: PLC0415

    return run_demo(
        model=args.model,
        pretrained=args.pretrained,
        workdir=args.workdir,
        images=args.images,
        prompts=args.prompts,
        cpu_runtime=args.cpu_runtime,
        cpu_precision=args.cpu_precision,
        compare=args.compare,
        compare_pretrained=args.compare_pretrained,
    )


def _gateway(args) -> int:
    from ..gateway import FetchPolicy, GatewaySettings, serve_gateway  # noqa: PLC0415

    keys = tuple(k.strip() for k in os.environ.get("CLIP_TRITON_API_KEYS", "").split(",") if k.strip())
    if args.api_key_file:
        keys += tuple(
            line.strip() for line in read_text(args.api_key_file, "--api-key-file").splitlines() if line.strip()
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
    from ..perf import perf_table  # noqa: PLC0415

    ensembles = list(args.ensembles)
    if args.served_model:  # that served model's ensembles (a repository of several: clip_image__<slug>)
        from clip_triton.client import ClipClient  # noqa: PLC0415

        with ClipClient(args.url, model=args.served_model) as client:
            names = client.names
        ensembles = [names.of(name) for name in ensembles]
    print(
        perf_table(
            args.url,
            ensembles,
            batch_sizes=int_list(args.batch_size, "--batch-size"),
            concurrencies=int_list(args.concurrency, "--concurrency"),
            measurement_ms=args.measurement_ms,
            print_command=args.print_command,
        )
    )
    return 0


def add_parsers(sub) -> None:
    from ..server import DEFAULT_RESPONSE_CACHE_MIB  # noqa: PLC0415 (stdlib-only module)

    p = add_command(sub, "serve", "run the pip-installed tritonserver on a model repository (CPU)")
    p.add_argument("--repo", required=True, help="repository written by `clip-triton repo --runtime python`")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--http-port", type=int, default=HTTP_PORT, help="Triton HTTP port")
    p.add_argument("--grpc-port", type=int, default=GRPC_PORT, help="Triton gRPC port")
    p.add_argument("--metrics-port", type=int, default=METRICS_PORT, help="Prometheus metrics port")
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
    finish(p, _serve, rules=SERVE_RULES)
    p = add_command(
        sub,
        "health",
        "liveness: a canary request through each ensemble; a server that is busy "
        "(requests keep completing) counts as alive, only evidence of death fails",
    )
    url_arg(p, several=False)
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
    finish(p, _health)
    p = add_command(sub, "demo", "offline main job: export a small model, serve it, classify sample photos")
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
    p.add_argument(
        "--compare",
        default=None,
        metavar="MODEL",
        help="a second model (architecture name or model-config JSON) served beside --model from one "
        "repository and one tritonserver; the photos are classified by both, side by side",
    )
    p.add_argument(
        "--compare-pretrained", default="none", help="the second model's weights (as --pretrained; needs --compare)"
    )
    cpu_args(p, "")
    finish(
        p,
        _demo,
        rules=[
            BF16_NEEDS_OPENVINO,
            ("compare_pretrained", lambda a: a.compare is not None, "--compare-pretrained needs --compare MODEL"),
        ],
    )
    p = add_command(sub, "gateway", "OpenAI-compatible HTTP API in front of Triton (needs the gateway extra)")
    url_arg(p, several=True)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=GATEWAY_PORT, help="port to listen on")
    p.add_argument(
        "--served-model-name",
        default=None,
        help="the model id clients send and /v1/models lists, for a server of one model (default: the "
        "repository's served_model_name, else the architecture name); a server of several lists each "
        "by its own served name",
    )
    p.add_argument(
        "--tokenizer-dir",
        default=os.environ.get("CLIP_TRITON_TOKENIZER_DIR"),
        help="only for repositories written before the server counted tokens (no TOKENS output): folder "
        "with the served model's tokenizer.json (SigLIP, MetaCLIP 2), to count usage here; current "
        "repositories count on the server and need nothing ($CLIP_TRITON_TOKENIZER_DIR)",
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
    finish(p, _gateway, rules=GATEWAY_RULES)
    p = add_command(sub, "perf", "run perf_analyzer against the ensembles with real inputs (bundled JPEGs, prompts)")
    url_arg(p, several=False)
    served_model_arg(p)
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
    finish(p, _perf)
