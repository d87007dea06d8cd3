"""What every command shares: exit codes, the help format, the flags several commands take (each
declared once here), list and file arguments, and the rule check that refuses a flag the other flags make
meaningless. Command modules (build, serve, use) declare their own flags and rules next to each other."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Sequence
from pathlib import Path

from ..contract import CONNECT_SECONDS, CPU_PRECISIONS, CPU_RUNTIMES, DEFAULT_URL, RETRY_SECONDS
from ..errors import ClipTritonError

CPU_RUNTIME_CHOICES = ("auto", *CPU_RUNTIMES)  # "auto": resolved per export (cpuruntime.resolve_cpu_runtime)

EXIT_USER_ERROR = 2
EXIT_VERIFICATION_FAILED = 3
EXIT_INTERRUPTED = 130
URL_ENV = "CLIP_TRITON_URL"

# A flag that only means something with another flag's value: (flag's dest, predicate on args, why).
Rule = tuple[str, Callable[[argparse.Namespace], bool], str]

# bf16 on the CPU is OpenVINO's (verify, demo).
BF16_NEEDS_OPENVINO: Rule = (
    "cpu_precision",
    lambda a: a.cpu_precision == "fp32" or a.cpu_runtime in ("openvino", "auto"),
    "--cpu-precision bf16 needs --cpu-runtime openvino",
)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Every flag's default in its help (flags without a value, and defaults that are None, describe
    themselves in words)."""

    def _get_help_string(self, action):
        if action.default is None or isinstance(action.default, bool) or "%(default)" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


# What an example needs first (samples.EXAMPLES run as written after it).
EXAMPLE_CONTEXT = {
    **dict.fromkeys(("verify", "repo", "serve"), " (after `clip-triton demo`)"),
    **dict.fromkeys(
        ("health", "gateway", "perf", "classify", "embed", "search", "eval", "eval-retrieval"),
        " (after `clip-triton demo`, with its `clip-triton serve` example running)",
    ),
}


def _given_once(action: argparse.Action, namespace: argparse.Namespace, option_string: str | None) -> None:
    """Refuse a flag given twice (under any of its spellings): argparse keeps the last value silently,
    and `repo --onnx-dir A --onnx-dir B` once served B alone. Flags that mean several take ``append``."""
    if option_string is None:
        return
    seen = namespace.__dict__.setdefault("_given", {})
    if action.dest in seen:
        raise argparse.ArgumentError(
            action,
            f"given twice ({seen[action.dest]} and {option_string}); it takes one value: pass it once",
        )
    seen[action.dest] = option_string


class StoreOnce(argparse._StoreAction):
    """argparse's ``store``, refusing a second value (:func:`_given_once`)."""

    def __call__(self, parser, namespace, values, option_string=None):
        _given_once(self, namespace, option_string)
        super().__call__(parser, namespace, values, option_string)


class BooleanOnce(argparse.BooleanOptionalAction):
    """``--x`` / ``--no-x``, refusing both or either twice (:func:`_given_once`)."""

    def __call__(self, parser, namespace, values, option_string=None):
        _given_once(self, namespace, option_string)
        super().__call__(parser, namespace, values, option_string)


def add_command(sub, name: str, help_text: str) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help_text, description=help_text, formatter_class=HelpFormatter)
    p.register("action", None, StoreOnce)  # every flag declared without an action: one value
    p.register("action", "store", StoreOnce)
    return p


def finish(
    p: argparse.ArgumentParser,
    run: Callable[[argparse.Namespace], int],
    rules: Sequence[Rule] = (),
    check: Callable[[argparse.Namespace], None] | None = None,
) -> None:
    """A command's handler, its flag rules and any further check of its arguments, kept on its parser;
    its --help ends with the command's example (samples.EXAMPLES: runs as written after the demo)."""
    from ..samples import EXAMPLES, example  # noqa: PLC0415

    p.set_defaults(func=run, _parser=p, _rules=tuple(rules), _check=check)
    command = p.prog.split()[-1]
    if command in EXAMPLES:
        after = (
            ""
            if command in ("demo", "export")
            else " (after `clip-triton demo`; the use commands with `serve` running)"
        )
        p.epilog = f"example{after}:\n  {example(command)}"


def check_combinations(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse a flag given where the other flags make it meaningless, instead of silently dropping it;
    then the command's own check. ``parser`` is the top-level parser (kept for callers' symmetry)."""
    for dest, applies, why in args._rules:
        if getattr(args, dest) != args._parser.get_default(dest) and not applies(args):
            raise ClipTritonError(why)
    if args._check is not None:
        args._check(args)


def url_arg(p: argparse.ArgumentParser, several: bool = True) -> None:
    """--url, the one declaration every command that talks to Triton uses."""
    forms = "host:port, dns:///name:port, or several comma-separated" if several else "host:port"
    p.add_argument("--url", default=os.environ.get(URL_ENV, DEFAULT_URL), help=f"Triton gRPC {forms} (${URL_ENV})")


def progress_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--progress",
        action=BooleanOnce,
        default=None,
        help="progress bar with rate and ETA on stderr (default: on when stderr is a terminal)",
    )


def cpu_args(p: argparse.ArgumentParser, applies: str) -> None:
    p.add_argument(
        "--cpu-runtime",
        "--cpu-engine",
        dest="cpu_runtime",
        choices=CPU_RUNTIME_CHOICES,
        default="auto",
        help=f"what runs the graphs on the CPU{applies}; auto: OpenVINO where the export holds its IR "
        "(export --openvino-ir) and OpenVINO is installed, or bf16 is asked, else ONNX Runtime "
        "(--cpu-engine: old spelling)",
    )
    p.add_argument(
        "--cpu-precision",
        choices=CPU_PRECISIONS,
        default="fp32",
        help="what CPU encoders compute in: fp32 (exact) or bf16 (OpenVINO, on CPUs with AVX512-BF16 or "
        "AMX; elsewhere OpenVINO computes in fp32 and says so)",
    )


MODEL_ENV = "CLIP_TRITON_MODEL"


def served_model_arg(p: argparse.ArgumentParser) -> None:
    """--served-model: which of a server's models to use (``--model`` names an architecture in export)."""
    p.add_argument(
        "--served-model",
        default=os.environ.get(MODEL_ENV) or None,
        metavar="NAME",
        help=f"the served model to use, by its public name, where the server serves several (${MODEL_ENV}; "
        "without it such a server is refused with the list of its models)",
    )


def client_args(p: argparse.ArgumentParser) -> None:
    url_arg(p)
    served_model_arg(p)
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
        help="seconds to wait for a server that answers but is still loading clip_image and clip_text",
    )
    p.add_argument(
        "--connect-timeout",
        type=float,
        default=CONNECT_SECONDS,
        help="seconds to wait for anything to answer at --url before saying nothing does",
    )
    p.add_argument("--concurrency", type=int, default=4, help="requests in flight")
    p.add_argument("--batch-size", type=int, default=None, help="items per request (default: the server's max)")
    p.add_argument(
        "--retry-seconds",
        type=float,
        default=RETRY_SECONDS,
        help="keep retrying a server that is restarting or unreachable this long before giving up; "
        "rows answered by then are kept",
    )
    progress_arg(p)


def int_list(text: str, flag: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        values = ()
    if not values or min(values) < 1:
        raise ClipTritonError(f"{flag} {text!r}: expected positive integers separated by commas, e.g. 1,4,16")
    return values


def read_text(path: str, flag: str) -> str:
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


def text_buckets(text: str | None) -> tuple[int, ...] | None:
    """--text-buckets: None (the contract's default), 'none' (a static graph) or lengths."""
    if text is None:
        return None
    if text.strip().lower() == "none":
        return ()
    return int_list(text, "--text-buckets")


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
