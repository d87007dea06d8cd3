"""Plain progress lines with elapsed time, for long steps (export, engine builds, bulk jobs)."""

from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, prefix: str, stream=None, enabled: bool = True, start: float | None = None):
        self.prefix = prefix
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.start = time.monotonic() if start is None else start  # monotonic: shared across processes

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def __call__(self, message: str) -> None:
        if self.enabled:
            print(f"[{self.prefix} {self.elapsed():7.1f}s{memory()}] {message}", file=self.stream, flush=True)


def memory() -> str:
    """`` rss X GiB (peak Y)`` for this process, read from /proc (empty where there is none)."""
    try:
        with open("/proc/self/status") as status:
            fields = dict(line.split(":", 1) for line in status if line.startswith(("VmRSS", "VmHWM")))
    except OSError:
        return ""
    rss, peak = (int(fields[k].split()[0]) / 1024**2 for k in ("VmRSS", "VmHWM"))
    return f" rss {rss:.1f} GiB (peak {peak:.1f})"
