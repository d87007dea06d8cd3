"""``clip-triton export``: weights -> two verified ONNX graphs -> manifest.json.

Memory plan for bigG (2.54 B parameters, ~10 GB in fp32) on a 24 GiB machine. A child process builds
the model, computes the fp32 PyTorch references, exports the text tower, deletes it, exports the
vision tower, and exits: its memory returns to the system. Only then does ONNX Runtime load the
graphs, one tower at a time, and compare them with the saved references. No two towers' export state,
and never a graph's session beside its PyTorch tower, are held at once.
"""

from __future__ import annotations

import gc
import json
import multiprocessing
import platform
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from clip_triton.contract import MANIFEST, ModelContract, register_model_cfg
from clip_triton.errors import ClipTritonError
from clip_triton.progress import Progress

from . import verify as V
from .graphs import DEFAULT_EXTERNAL_THRESHOLD, GRAPH_FILES, export_tower, to_half
from .weights import load_model

TEXT_ATTRIBUTES = ("transformer", "token_embedding", "positional_embedding", "ln_final", "text_projection",
                   "attn_mask", "text")
DEFAULT_VERIFY_BATCHES = (1, 3, 8)
# Inputs and open_clip PyTorch fp32 outputs of the verification, kept so that TensorRT engines built
# later are checked against PyTorch itself (a few MB, even for bigG).
REFERENCES = "references.npz"


def _versions() -> dict:
    import onnx  # noqa: PLC0415
    import onnxruntime  # noqa: PLC0415
    import open_clip  # noqa: PLC0415
    import torch  # noqa: PLC0415

    import clip_triton  # noqa: PLC0415

    return {
        "clip_triton": clip_triton.__version__,
        "torch": torch.__version__,
        "open_clip": open_clip.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "python": platform.python_version(),
    }


def _peak_rss_gib() -> float:
    import resource  # noqa: PLC0415

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # Linux: KiB


def _export_stage(job: dict) -> dict:
    """Child process: weights -> fp32 references -> both graphs. Its exit returns every byte of torch,
    dynamo and onnx_ir state to the system (deleting the model in-process does not: the exporter's IR
    keeps references to the weights)."""
    log = Progress("export", start=job["start"])
    out = Path(job["out"])
    loaded = load_model(job["model"], job["pretrained"], precision=job["precision"], seed=job["seed"],
                        cache_dir=job["cache_dir"], log=log)
    contract: ModelContract = loaded.contract
    net = loaded.model
    log(f"{contract.model}: embed_dim {contract.embed_dim}, image {contract.image_size}, "
        f"context {contract.context_length}, logit_scale {loaded.logit_scale:.4f}")
    if job["verify"]:
        inputs = V.verification_inputs(contract, tuple(job["verify_batches"]))
        arrays = {}
        for tower in ("text", "vision"):
            log(f"computing open_clip PyTorch fp32 reference outputs ({tower})")
            for i, ((label, x), ref) in enumerate(zip(inputs[tower], V.torch_reference(net, tower, inputs[tower]))):
                arrays[f"{tower}/{i}/{label}/input"], arrays[f"{tower}/{i}/{label}/reference"] = x, ref
        np.savez(job["references"], **arrays)
    if job["precision"] == "fp16":
        log("converting weights to fp16 (LayerNorm kept in float32)")
        to_half(net)
    graphs = {}
    for tower in ("text", "vision"):
        log(f"exporting {tower} tower to {out / GRAPH_FILES[tower]} (torch.onnx dynamo, opset {job['opset']}, "
            f"{job['precision']})")
        graphs[tower] = export_tower(net, contract, tower, out, opset=job["opset"],
                                     external_threshold=job["external_threshold"])
        mib = (graphs[tower]["graph_bytes"] + graphs[tower]["data_bytes"]) / 1024**2
        log(f"wrote {graphs[tower]['file']} ({mib:.1f} MiB{', external data' if graphs[tower]['external_data'] else ''})")
        if tower == "text":  # the vision export needs no text weights
            for name in TEXT_ATTRIBUTES:
                if hasattr(net, name):
                    delattr(net, name)
            gc.collect()
    return {
        "contract": contract.to_dict(),
        "graphs": graphs,
        "random_weights": loaded.random_weights,
        "seed": loaded.seed,
        "checkpoint": {"path": loaded.checkpoint_path, "sha256": loaded.checkpoint_sha256},
        "logit_scale": loaded.logit_scale,
        "logit_bias": loaded.logit_bias,
        "versions": _versions(),
        "peak_rss_gib": round(_peak_rss_gib(), 2),
    }


def load_references(path: Path) -> dict[str, list]:
    """{tower: [(label, input, reference), ...]} in the order they were computed."""
    with np.load(path) as data:
        found: dict[str, dict[int, list]] = {"text": {}, "vision": {}}
        for key in data.files:
            tower, index, label, kind = key.split("/")
            found[tower].setdefault(int(index), [label, None, None])[1 if kind == "input" else 2] = data[key]
    return {tower: [tuple(found[tower][i]) for i in sorted(found[tower])] for tower in found}


def check_graphs(onnx_dir: Path, contract: ModelContract, batches: dict[str, list], log: Progress,
                 engine: str = "onnxruntime", cpu_precision: str = "fp32") -> list:
    """A CPU engine (ONNX Runtime by default) vs the references, one tower at a time; prints the table.

    ``batches`` is ``{tower: [(label, input, reference), ...]}``.
    """
    checks = []
    tolerance = V.tolerance_key(contract.precision, cpu_precision)
    sizes = sorted({x.shape[0] for label, x, _ in batches["vision"] if label == "random"})
    for tower in ("text", "vision"):
        log(f"verifying {tower}.onnx with {engine} ({cpu_precision}) at batch sizes {sizes} and real inputs")
        cases = [(label, x) for label, x, _ in batches[tower]]
        outputs = V.run_graph(Path(onnx_dir) / GRAPH_FILES[tower], contract, tower, cases, log=log,
                              engine=engine, cpu_precision=cpu_precision)
        checks += V.compare(tower, cases, [ref for _, _, ref in batches[tower]], outputs, tolerance)
        del outputs
        gc.collect()
    V.report(checks, tolerance, engine_note=f"; engine: {engine} {cpu_precision}")
    return checks


def export_model(
    model: str,
    pretrained: str | None,
    out_dir: str | Path,
    *,
    precision: str = "fp32",
    opset: int = 18,
    seed: int = 0,
    verify: bool = True,
    verify_batches: tuple[int, ...] = DEFAULT_VERIFY_BATCHES,
    external_threshold: int = DEFAULT_EXTERNAL_THRESHOLD,
    cache_dir: str | None = None,
    log: Progress | None = None,
) -> dict:
    """Export both towers of ``model`` into ``out_dir``; returns the manifest (also written).

    The PyTorch work runs in a child process; ONNX Runtime then verifies one tower at a time here.
    """
    log = log or Progress("export")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    references = out / REFERENCES
    job = {"model": model, "pretrained": pretrained, "out": str(out), "precision": precision, "opset": opset,
           "seed": seed, "verify": verify, "verify_batches": list(verify_batches), "cache_dir": cache_dir,
           "external_threshold": external_threshold, "references": str(references), "start": log.start}
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        facts = pool.submit(_export_stage, job).result()
    contract = ModelContract.from_dict(facts["contract"])

    checks = []
    if verify:
        checks = check_graphs(out, contract, load_references(references), log)
    else:
        log("WARNING: verification skipped (--no-verify); the graphs are unchecked against open_clip")

    manifest = {
        "format": 1,
        "model": contract.model,
        "pretrained": contract.pretrained,
        "random_weights": facts["random_weights"],
        "seed": facts["seed"],
        "checkpoint": facts["checkpoint"],
        "precision": precision,
        "opset": opset,
        "embed_dim": contract.embed_dim,
        "logit_scale": facts["logit_scale"],
        "logit_bias": facts["logit_bias"],
        "contract": facts["contract"],
        "graphs": facts["graphs"],
        "references": REFERENCES if verify else None,
        "verification": {
            "performed": verify,
            "passed": all(c.passed for c in checks) if verify else None,
            "tolerance": V.TOLERANCES[precision],
            "reference": "open_clip PyTorch fp32",
            "checks": V.as_dicts(checks),
        },
        "versions": facts["versions"],
        "export_seconds": round(time.monotonic() - started, 1),
        "peak_rss_gib": {"export_process": facts["peak_rss_gib"], "verification_process": round(_peak_rss_gib(), 2)},
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    log(f"wrote {out / MANIFEST} (peak RSS: export {facts['peak_rss_gib']} GiB, "
        f"verification {manifest['peak_rss_gib']['verification_process']} GiB)")
    if verify:
        V.raise_on_failure(checks)
    return manifest


def read_manifest(onnx_dir: str | Path) -> dict:
    path = Path(onnx_dir) / MANIFEST
    if not path.is_file():
        raise ClipTritonError(f"{path} not found", "point at a folder written by `clip-triton export`")
    return json.loads(path.read_text())


def verify_export(onnx_dir: str | Path, *, seed: int | None = None, checkpoint: str | None = None,
                  batches: tuple[int, ...] = DEFAULT_VERIFY_BATCHES, log: Progress | None = None,
                  engine: str = "onnxruntime", cpu_precision: str = "fp32") -> list:
    """Re-check an existing export against open_clip rebuilt from its manifest.

    Random-weight exports are rebuilt from their recorded seed (``seed`` overrides it); exports of
    real weights reload the recorded checkpoint (``checkpoint`` overrides its path).
    """
    log = log or Progress("verify")
    manifest = read_manifest(onnx_dir)
    contract = ModelContract.from_dict(manifest["contract"])
    if manifest["random_weights"]:
        pretrained, use_seed = "none", manifest["seed"] if seed is None else seed
    else:
        pretrained, use_seed = checkpoint or manifest["checkpoint"]["path"] or manifest["pretrained"], 0
    model_name = register_model_cfg(contract.model, contract.model_cfg)
    loaded = load_model(model_name, pretrained, precision=contract.precision, seed=use_seed, log=log)
    inputs = V.verification_inputs(contract, tuple(batches))
    cases = {tower: [(label, x, ref) for (label, x), ref in zip(inputs[tower],
                                                                V.torch_reference(loaded.model, tower, inputs[tower]))]
             for tower in ("text", "vision")}
    del loaded  # no export ran here, so this frees the weights before ONNX Runtime loads the graphs
    gc.collect()
    checks = check_graphs(Path(onnx_dir), contract, cases, log, engine=engine, cpu_precision=cpu_precision)
    V.raise_on_failure(checks)
    return checks
