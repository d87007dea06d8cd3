"""The Kubernetes manifests as `kubectl kustomize` renders them, committed under tests/k8s_rendered so the
manifest tests run in-process (the fast tier); `test_committed_renders_are_what_kubectl_renders` re-renders
them with kubectl and fails on any drift. After changing deploy/k8s: `python -m tests.k8s_render`."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
RENDERED = ROOT / "tests" / "k8s_rendered"
TARGETS = ("base", "overlays/production", "overlays/no-operators")


def rendered_path(target: str) -> Path:
    return RENDERED / f"{target.rsplit('/', 1)[-1]}.yaml"


def kustomize(target: str) -> str:
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl is needed to render the manifests (apt-get install kubectl)"
    return subprocess.run([kubectl, "kustomize", str(K8S / target)], capture_output=True, text=True, check=True).stdout


def main() -> None:
    RENDERED.mkdir(exist_ok=True)
    for target in TARGETS:
        rendered_path(target).write_text(kustomize(target))
        print(f"wrote {rendered_path(target).relative_to(ROOT)}")


if __name__ == "__main__":
    main()
