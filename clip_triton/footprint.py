"""What a repository's served models cost in memory: estimated from the repository, measured on a server.

Each served model brings its own Triton models (contract ``ModelNames``): on the pip-installed Triton
(``--runtime python``) every instance of every python model is a stub process of its own, and each
encoder instance holds its graph's weights; on a GPU each TensorRT engine instance holds its weights and
the activation memory ``engine.json`` records (``device_memory_bytes``, written by build-engines). Nothing
is shared between served models: two models cost the sum of each (docs/serving.md, "Several models").

:func:`estimate` reads a repository; :func:`measured` reads a running tritonserver's processes from
/proc (proportional set size, so shared libraries are split, not counted once per stub). Linux only.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from .contract import MODEL_SEPARATOR, PLAN_FILE, TOWERS, ModelNames

ENGINE_MANIFEST = "engine.json"  # as clip_triton/export/engines.py writes it
# Measured on this project's machine with `python bench/multi_model.py` (proportional set size): a
# python stub's own memory (the interpreter, numpy, PIL or the tokenizer, the backend's shared memory),
# about 45 MiB each; an ONNX Runtime encoder instance holds 1.2-2.0 times its graph's bytes (ORT's
# initialised copy of the weights, and for a while the graph as read: 613 and 825 MiB in two runs of
# the tiny SigLIP 2), so the estimate takes 1.5 and is good to about +-40 %.
STUB_BASELINE_BYTES = 45 * 1024**2
CPU_WEIGHT_FACTOR = 1.5


@dataclass
class ModelCost:
    """One served model's estimated memory: its python stubs, the weights its CPU encoders load (each
    instance its own copy), and on GPU its engines' weights and activation memory."""

    name: str
    stubs: int = 0
    cpu_weight_bytes: int = 0
    gpu_bytes: int | None = None  # None: not a GPU repository, or engines not built yet
    detail: dict[str, int] = field(default_factory=dict)

    @property
    def host_bytes(self) -> int:
        return self.stubs * STUB_BASELINE_BYTES + self.cpu_weight_bytes


def _config_value(text: str, key: str) -> str | None:
    found = re.search(rf"^{key}:\s*\"?([^\"\n]+)\"?", text, re.M)
    return found.group(1) if found else None


def _instances(text: str) -> int:
    counts = [int(n) for n in re.findall(r"^\s*count:\s*(\d+)", text, re.M)]
    return sum(counts) or 1


def served_names(repo: Path) -> list[ModelNames]:
    """Every served model of a repository, from its image ensembles' folders."""
    return ModelNames.served_in(p.name for p in Path(repo).iterdir() if (p / "config.pbtxt").is_file())


def estimate(repo: str | Path) -> list[ModelCost]:
    """Each served model's estimated memory, from the repository's configs, graphs and engine.json."""
    repo = Path(repo)
    costs = []
    for names in served_names(repo):
        cost = ModelCost(names.slug or "(single)")  # the key measured() gives its stubs
        for tower in TOWERS:
            for model in (names.front(tower), names.encoder(tower)):
                config = (repo / model / "config.pbtxt").read_text()
                instances = _instances(config)
                backend = _config_value(config, "backend")
                if backend == "python":
                    cost.stubs += instances
                version = repo / model / "1"
                if model == names.encoder(tower):
                    plan = version / PLAN_FILE
                    if plan.is_file():  # TensorRT: weights and activations on the device, per instance
                        engine = version / ENGINE_MANIFEST
                        device = json.loads(engine.read_text()).get("device_memory_bytes") if engine.is_file() else None
                        per_instance = plan.stat().st_size + int(device or 0)
                        cost.gpu_bytes = (cost.gpu_bytes or 0) + per_instance * instances
                        cost.detail[model] = per_instance * instances
                    elif backend in ("python", "openvino", "onnxruntime"):
                        weights = sum(p.stat().st_size for p in version.iterdir() if p.suffix not in (".py", ".json"))
                        on_host = backend != "onnxruntime"  # Triton's ORT backend serves on the GPU
                        cost.cpu_weight_bytes += int(CPU_WEIGHT_FACTOR * weights) * instances if on_host else 0
                        cost.detail[model] = weights * instances
        costs.append(cost)
    return costs


def measured(server_pid: int) -> dict[str, int]:
    """Proportional set size (bytes) of a running tritonserver and its stubs, by served model: each stub
    process to the served model its Triton model belongs to ("(server)" for tritonserver itself)."""
    totals: dict[str, int] = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            stat = (proc / "stat").read_text()
            group = int(stat.rsplit(")", 1)[1].split()[2])  # pgrp: tritonserver leads its group
            if group != server_pid:
                continue
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            pss = _pss(proc)
        except (OSError, IndexError, ValueError):
            continue
        if int(proc.name) == server_pid:
            key = "(server)"
        else:
            key = _stub_owner(cmdline)
        totals[key] = totals.get(key, 0) + pss
    return totals


_BASES = tuple(model for tower in TOWERS for model in (tower.front, tower.model))


def _stub_owner(cmdline: list[bytes]) -> str:
    """The served model (slug, or "(single)") of a python stub, from the model instance its arguments
    name ("<model>_<group>_<index>", e.g. ``tokenizer__tiny-clip_0_0``); "(other)" if none does."""
    for arg in cmdline:
        found = re.fullmatch(r"(.+)_\d+_\d+", arg.decode(errors="replace"))
        if found is None:
            continue
        model = found.group(1)
        base, _, slug = model.partition(MODEL_SEPARATOR)
        if base in _BASES:
            return slug or "(single)"
    return "(other)"


def _pss(proc: Path) -> int:
    for line in (proc / "smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) * 1024
    return 0


def table(costs: list[ModelCost]) -> str:
    """The estimate as lines `clip-triton repo` prints."""
    rows = []
    for cost in costs:
        parts = [f"{cost.stubs} python stubs", f"{cost.cpu_weight_bytes / 1024**2:.0f} MiB of CPU-held weights"]
        if cost.gpu_bytes is not None:
            parts.append(f"{cost.gpu_bytes / 1024**2:.0f} MiB on the GPU (engines and activations)")
        rows.append(f"  {cost.name}: ~{cost.host_bytes / 1024**2:.0f} MiB host memory ({', '.join(parts)})")
    return "\n".join(rows)
