"""Exec shim: ``python -I -S _execshim.py PARENT_PID -- COMMAND...``.

Runs in its own interpreter, started by :func:`clip_triton.children.spawn` with no Python code
between fork and exec in the parent. It asks the kernel to SIGKILL it when its parent thread dies
(``PR_SET_PDEATHSIG``, kept across ``execve``), checks that the parent is still the one that started it
(a parent that died before ``prctl`` took effect would never send the signal), then replaces itself
with COMMAND. Standard library only, no site-packages: it starts in ~20 ms.
"""

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1


def main(argv: list[str]) -> None:
    if len(argv) < 4 or argv[2] != "--" or not argv[1].isdigit():
        sys.stderr.write("usage: _execshim.py PARENT_PID -- COMMAND [ARG...]\n")
        os._exit(2)
    parent, command = int(argv[1]), argv[3:]
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        sys.stderr.write(f"_execshim: prctl(PR_SET_PDEATHSIG) failed: {os.strerror(ctypes.get_errno())}\n")
        os._exit(1)
    if os.getppid() != parent:  # the parent died before prctl took effect: nobody would kill us
        os._exit(1)
    try:
        os.execvp(command[0], command)
    except OSError as exc:
        sys.stderr.write(f"_execshim: cannot run {command[0]}: {exc}\n")
        os._exit(127)


if __name__ == "__main__":
    main(sys.argv)
