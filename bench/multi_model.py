"""What a second served model costs: one tritonserver serving a tiny CLIP alone, then beside a tiny
SigLIP 2 from one repository (issue 30). Prints each served model's estimated and measured memory
(proportional set size of its python stubs) and the server's own.

    python bench/multi_model.py [--runtime python]

Exports the two tiny test models (random weights, tests/configs) into a temporary folder first.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "tests" / "configs"


def main() -> None:
    from clip_triton.export import export_model
    from clip_triton.footprint import estimate, measured
    from clip_triton.repository import RepoOptions, write_repository
    from clip_triton.server import TritonServer

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--settle-s", type=float, default=5.0, help="wait after ready before reading /proc")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="clip-triton-multi-"))
    exports = {}
    for name, config in (("tiny-clip", "clip-triton-tiny.json"), ("tiny-siglip2", "clip-triton-tiny-siglip2.json")):
        exports[name] = work / name
        export_model(str(CONFIGS / config), "none", exports[name], precision="fp32", seed=0, verify=False)
    layouts = {"one model": ["tiny-clip"], "two models": ["tiny-clip", "tiny-siglip2"]}
    print(f"{'repository':<12}{'served model':<16}{'stubs':>6}{'estimated MiB':>15}{'measured MiB':>14}")
    for layout, served in layouts.items():
        repo = work / layout.replace(" ", "-")
        options = RepoOptions(runtime="python", cpu_runtime="onnxruntime", preprocess_instances=1)
        write_repository(repo, options=options, exports=[(exports[name], name) for name in served])
        costs = {cost.name: cost for cost in estimate(repo)}
        with TritonServer(repo, log_file=work / f"{repo.name}.log") as server:
            time.sleep(args.settle_s)
            assert server.process is not None
            memory = measured(server.process.pid)
        for key, value in sorted(memory.items()):
            cost = costs.get(key)
            stubs = f"{cost.stubs:>6}" if cost else f"{'':>6}"
            guess = f"{cost.host_bytes / 1024**2:>15.0f}" if cost else f"{'':>15}"
            print(f"{layout:<12}{key:<16}{stubs}{guess}{value / 1024**2:>14.0f}")


if __name__ == "__main__":
    main()
