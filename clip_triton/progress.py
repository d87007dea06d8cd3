"""Progress for long work, always on stderr: step lines with elapsed time and memory (export, engine
builds) and bars with rate and ETA (bulk embedding, evaluation, export steps)."""

from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, prefix: str, stream=None, enabled: bool = True, start: float | None = None, sink=None):
        self.prefix = prefix
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.start = time.monotonic() if start is None else start  # monotonic: shared across processes
        self.sink = sink  # where lines go instead of the stream (a progress bar's writer, a child's queue)

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def __call__(self, message: str) -> None:
        if self.enabled:
            line = f"[{self.prefix} {self.elapsed():7.1f}s{memory()}] {message}"
            if self.sink is not None:
                self.sink(line)
            else:
                print(line, file=self.stream, flush=True)


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

    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, disable=None if enabled is None else not enabled,
                dynamic_ncols=True, smoothing=0.1, leave=True)
