"""Progress for long work: step lines with elapsed time and memory (export, engine builds), logged to
``clip_triton.<prefix>`` at INFO, and bars with rate and ETA on stderr (bulk embedding, evaluation,
export steps). The CLI sends log records to stderr as plain lines; a library caller configures
``logging`` as it likes."""

from __future__ import annotations

import logging
import sys
import time


class Progress:
    def __init__(self, prefix: str, stream=None, enabled: bool = True, start: float | None = None, sink=None):
        self.prefix = prefix
        self.stream = stream or sys.stderr  # where bars go
        self.enabled = enabled
        self.start = time.monotonic() if start is None else start  # monotonic: shared across processes
        self.sink = sink  # where lines go instead of the log (a child's queue to its parent)
        self.logger = logging.getLogger(f"clip_triton.{prefix}")

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def __call__(self, message: str) -> None:
        if self.enabled:
            line = f"[{self.prefix} {self.elapsed():7.1f}s{memory()}] {message}"
            if self.sink is not None:
                self.sink(line)
            else:
                emit(self.logger, line)


def emit(logger: logging.Logger, line: str) -> None:
    """Log ``line`` at INFO without tearing a progress bar that is on screen (tqdm clears and redraws)."""
    from tqdm import tqdm  # noqa: PLC0415

    with tqdm.external_write_mode(file=sys.stderr):
        logger.info(line)


def configure_cli_logging(level: int = logging.INFO) -> None:
    """What the command line shows: clip_triton's records as plain lines on stderr (once)."""
    ours = logging.getLogger("clip_triton")
    if not ours.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        ours.addHandler(handler)
    ours.setLevel(level)
    ours.propagate = False  # a library that configures the root logger must not print each line twice


def memory() -> str:
    """`` rss X GiB (peak Y)`` for this process, read from /proc (empty where there is none)."""
    try:
        with open("/proc/self/status") as status:
            fields = dict(line.split(":", 1) for line in status if line.startswith(("VmRSS", "VmHWM")))
    except OSError:
        return ""
    rss, peak = (int(fields[k].split()[0]) / 1024**2 for k in ("VmRSS", "VmHWM"))
    return f" rss {rss:.1f} GiB (peak {peak:.1f})"


def bar(total: int | None, desc: str, *, unit: str = "item", enabled: bool | None = None):
    """A progress bar on stderr with rate and ETA (tqdm). ``enabled=None``: shown only when stderr is a
    terminal, so logs and pipes stay clean; ``True``/``False`` force it."""
    from tqdm import tqdm  # noqa: PLC0415

    return tqdm(
        total=total,
        desc=desc,
        unit=unit,
        file=sys.stderr,
        disable=None if enabled is None else not enabled,
        dynamic_ncols=True,
        smoothing=0.1,
        leave=True,
    )
