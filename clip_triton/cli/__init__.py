"""The ``clip-triton`` command: one module per command group, each owning its flags, their rules and
their handlers (``build``: export, verify, repo, build-engines, check-engines; ``serve``: serve, health,
demo, gateway, perf; ``use``: classify, embed, search, eval, eval-retrieval), the flags several commands
take declared once in ``common``. Each handler imports only what its role needs."""

from __future__ import annotations

import argparse
import sys

from ..errors import ClipTritonError, VerificationError
from . import build, serve, use
from .common import (
    EXIT_INTERRUPTED,
    EXIT_USER_ERROR,
    EXIT_VERIFICATION_FAILED,
    EXTRAS,
    HelpFormatter,
    check_combinations,
    missing_extra,
)

GROUPS = (build, serve, use)


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__  # noqa: PLC0415

    parser = argparse.ArgumentParser(
        prog="clip-triton", description=__doc__.split("\n")[0], formatter_class=HelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"clip-triton {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in GROUPS:
        group.add_parsers(sub)
    return parser


def honour_ctrl_c() -> None:
    """Ctrl-C (SIGINT) stops every command, as documented, even where the process was started with
    SIGINT ignored: a background job of a non-interactive shell script (`clip-triton serve &`), or
    anything `nohup`-like, inherits SIG_IGN, and Python then installs no KeyboardInterrupt handler, so
    `serve` ran on after `kill -INT` and `embed` could not be interrupted."""
    import signal  # noqa: PLC0415
    import threading  # noqa: PLC0415

    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def main(argv: list[str] | None = None) -> int:
    from ..progress import configure_cli_logging  # noqa: PLC0415

    honour_ctrl_c()
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


__all__ = [
    "EXIT_INTERRUPTED",
    "EXIT_USER_ERROR",
    "EXIT_VERIFICATION_FAILED",
    "EXTRAS",
    "build_parser",
    "check_combinations",
    "main",
    "missing_extra",
]
