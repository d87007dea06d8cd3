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
import os
import platform
import shutil
import time
from pathlib import Path

import numpy as np

from clip_triton.contract import (
    DEFAULT_PRECISION,
    EXPORT_FORMAT,
    HF_TOKENIZER_DIR,
    MANIFEST,
    TEXT,
    VISION,
    ModelContract,
)
from clip_triton.contract import tower as tower_spec
from clip_triton.cpuruntime import openvino_installed, resolve_cpu_runtime
from clip_triton.errors import ClipTritonError, VerificationError
from clip_triton.progress import Progress, emit

from . import verify as V
from .adapter import register_recorded_config
from .graphs import DEFAULT_EXTERNAL_THRESHOLD, export_openvino_ir, export_tower, fuse_for_inference, to_half
from .weights import load_model

TEXT_ATTRIBUTES = (
    "transformer",
    "token_embedding",
    "positional_embedding",
    "ln_final",
    "text_projection",
    "attn_mask",
    "text",  # open_clip's attribute of a custom text tower (not a tower name)
)
DEFAULT_VERIFY_BATCHES = (1, 3, 8)
# Text first: its weights are deleted before the (much larger) vision tower is exported.
EXPORT_ORDER = (TEXT.name, VISION.name)
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


_EVENTS = None  # the export child's queue to the parent


def _export_stage(job: dict) -> dict:
    """Child process: weights -> fp32 references -> both graphs. Its exit returns every byte of torch,
    dynamo and onnx_ir state to the system (deleting the model in-process does not: the exporter's IR
    keeps references to the weights)."""
    events = _EVENTS
    log = Progress("export", start=job["start"], sink=lambda line: events.put(("log", line)))

    def step(name: str) -> None:
        events.put(("step", name))

    out = Path(job["out"])
    loaded = load_model(
        job["model"],
        job["pretrained"],
        precision=job["precision"],
        seed=job["seed"],
        cache_dir=job["cache_dir"],
        log=log,
        text_buckets=None if job["text_buckets"] is None else tuple(job["text_buckets"]),
    )
    step("weights")
    contract: ModelContract = loaded.contract
    net = loaded.model
    log(
        f"{contract.model}: embed_dim {contract.embed_dim}, image {contract.image_size}, "
        f"context {contract.context_length} (text served at lengths {list(contract.tokenizer.lengths)}), "
        f"logit_scale {loaded.logit_scale:.4f}"
    )
    tokenizer_dir = None
    if loaded.hf_tokenizer is not None:  # the server's tokenizer model runs this copy (tokenizer.json)
        tokenizer_dir = out / HF_TOKENIZER_DIR
        loaded.hf_tokenizer.save_pretrained(tokenizer_dir)
        log(f"saved the Hugging Face tokenizer {contract.tokenizer.hf_name} to {tokenizer_dir}")
    pad = contract.tokenizer.pad_token_id
    if job["verify"]:
        inputs = V.verification_inputs(contract, tuple(job["verify_batches"]), tokenizer_dir=tokenizer_dir)
        arrays = {}
        for tower in EXPORT_ORDER:
            log(f"computing open_clip PyTorch fp32 reference outputs ({tower})")
            for i, ((label, x), ref) in enumerate(
                zip(inputs[tower], V.torch_reference(net, tower, inputs[tower], pad, contract))
            ):
                arrays[f"{tower}/{i}/{label}/input"], arrays[f"{tower}/{i}/{label}/reference"] = x, ref
            step(f"{tower} reference")
        np.savez(job["references"], **arrays)
    fused = fuse_for_inference(net)  # after the references: they come from open_clip's model as built
    if fused:
        log(f"reparameterised the vision tower for inference ({fused} modules fused)")
    if job["precision"] == "fp16":
        log("converting weights to fp16 (normalisations kept in float32)")
        to_half(net)
    graphs, irs = {}, {}
    ir_skipped: str | None = None
    for tower in EXPORT_ORDER:
        log(
            f"exporting {tower} tower to {out / tower_spec(tower).onnx_file} (torch.onnx dynamo, opset {job['opset']}, "
            f"{job['precision']})"
        )
        graphs[tower] = export_tower(
            net, contract, tower, out, opset=job["opset"], external_threshold=job["external_threshold"]
        )
        mib = (graphs[tower]["graph_bytes"] + graphs[tower]["data_bytes"]) / 1024**2
        log(
            f"wrote {graphs[tower]['file']} ({mib:.1f} MiB{', external data' if graphs[tower]['external_data'] else ''})"
        )
        step(f"{tower} graph")
        if job["openvino_ir"] and ir_skipped is None:
            why = "" if job["openvino_ir_required"] else "; fp32 with OpenVINO installed, --no-openvino-ir skips it"
            log(
                f"converting {tower} tower to OpenVINO IR {out / tower_spec(tower).ir_file} (openvino.convert_model{why})"
            )
            try:
                irs[tower] = export_openvino_ir(net, contract, tower, out)
            except Exception as exc:  # OpenVINO's frontends raise their own types
                if job["openvino_ir_required"]:
                    raise
                ir_skipped = f"OpenVINO could not convert the {tower} tower: {str(exc).splitlines()[0][:200]}"
                log(f"WARNING: {ir_skipped}; the export carries no IR and serves on ONNX Runtime")
                remove_ir(out)
                irs = {}
            else:
                log(f"wrote {irs[tower]['file']} ({irs[tower]['bytes'] / 1024**2:.1f} MiB with its weights)")
        if job["openvino_ir"]:
            step(f"{tower} IR")
        if tower == TEXT.name:  # the vision export needs no text weights
            for name in TEXT_ATTRIBUTES:
                if hasattr(net, name):
                    delattr(net, name)
            gc.collect()
    return {
        "contract": contract.to_dict(),
        "graphs": graphs,
        "openvino_ir": irs or None,
        "openvino_ir_skipped": ir_skipped,
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
        found: dict[str, dict[int, list]] = {tower: {} for tower in EXPORT_ORDER}
        for key in data.files:
            tower, index, label, kind = key.split("/")
            found[tower].setdefault(int(index), [label, None, None])[1 if kind == "input" else 2] = data[key]
    return {tower: [tuple(found[tower][i]) for i in sorted(found[tower])] for tower in found}


def check_graphs(
    onnx_dir: Path,
    contract: ModelContract,
    batches: dict[str, list],
    log: Progress,
    runtime: str = "onnxruntime",
    cpu_precision: str = "fp32",
    steps=None,
    graph: str = "onnx",
) -> list:
    """A CPU runtime (ONNX Runtime by default) vs the references, one tower at a time; prints the table.

    ``batches`` is ``{tower: [(label, input, reference), ...]}``. ``graph``: the ONNX graphs, or
    (``"ir"``, OpenVINO only) the IR converted from the module; IR rows name their tower ``vision ir``.
    """
    checks = []
    tolerance = V.tolerance_key(contract.precision, cpu_precision)
    sizes = sorted({x.shape[0] for label, x, _ in batches[VISION.name] if label == "random"})
    for tower in EXPORT_ORDER:
        spec = tower_spec(tower)
        path = Path(onnx_dir) / (spec.ir_file if graph == "ir" else spec.onnx_file)
        lengths = f", lengths {list(contract.tokenizer.lengths)}" if spec is TEXT else ""
        log(f"verifying {path.name} with {runtime} ({cpu_precision}) at batch sizes {sizes}{lengths} and real inputs")
        # One more batch: a copy with a refused row, which must come back NaN with the others unchanged.
        cases, index = V.with_refusal(contract, tower, [(label, x) for label, x, _ in batches[tower]])
        outputs = V.run_graph(path, contract, tower, cases, log=log, runtime=runtime, cpu_precision=cpu_precision)
        name = f"{tower} ir" if graph == "ir" else tower
        references = [ref for _, _, ref in batches[tower]]
        checks += V.compare_with_refusal(name, cases, index, references, outputs, tolerance)
        del outputs
        gc.collect()
        if steps is not None:
            steps.update(1)
            steps.set_postfix_str(f"{path.name} verified", refresh=True)
    V.report(checks, tolerance, note=f"; CPU runtime: {runtime} {cpu_precision}")
    return checks


def wants_openvino_ir(openvino_ir: bool | None, precision: str) -> bool:
    """Whether an export converts its towers to OpenVINO IR. ``None``, the default: wherever it would
    be served, i.e. an fp32 export on a host with OpenVINO installed (the ``cpu`` extra), which
    ``--cpu-runtime auto`` then serves with OpenVINO fp32, the faster exact CPU path
    (docs/benchmarks.md). An fp16 export (TensorRT) or a host without OpenVINO gets none."""
    if openvino_ir is not None:
        return openvino_ir
    return precision == "fp32" and openvino_installed()


def remove_ir(folder: Path) -> None:
    """Delete any OpenVINO IR files of the towers from an export folder."""
    for spec in (TEXT, VISION):
        xml = Path(folder) / spec.ir_file
        for path in (xml, xml.with_suffix(".bin")):
            path.unlink(missing_ok=True)


def current_export(
    folder: str | Path,
    model: str,
    pretrained: str | None,
    *,
    precision: str = DEFAULT_PRECISION,
    seed: int = 0,
    text_buckets: tuple[int, ...] | None = None,
    openvino_ir: bool | None = False,
) -> dict | None:
    """The manifest of a verified export in ``folder`` of exactly this model, weights, precision (and
    seed, for random weights), else None. A checkpoint file must have the recorded sha256. An export
    from before text buckets (a static text graph) is not current unless ``text_buckets == ()``;
    with ``text_buckets`` None, any bucketed export is. An export from before the graphs recorded
    ``pooled_last_block`` is not current (made again, it serves less arithmetic for the same
    embeddings). With ``openvino_ir`` True, it must hold the IR;
    None (export's default, ``wants_openvino_ir``): it must hold it, or record why OpenVINO could not
    convert it, wherever an export made now would write it."""
    from clip_triton.contract import normalise_pretrained  # noqa: PLC0415

    path = Path(folder) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    tag = normalise_pretrained(pretrained)
    buckets = tuple((manifest.get("contract") or {}).get("tokenizer", {}).get("buckets") or ())
    same = (
        manifest.get("format", 1) == EXPORT_FORMAT
        and manifest.get("model") == Path(model).stem
        and manifest.get("precision") == precision
        and manifest.get("verification", {}).get("passed") is True
        and (bool(buckets) if text_buckets is None else buckets == tuple(sorted(text_buckets)))
        # graphs from before the pooled last block (the same embeddings, ~7% more arithmetic at ViT-B/32)
        and all("pooled_last_block" in graph for graph in (manifest.get("graphs") or {None: {}}).values())
        and (
            not wants_openvino_ir(openvino_ir, precision)
            or bool(manifest.get("openvino_ir"))
            or (openvino_ir is None and bool(manifest.get("openvino_ir_skipped")))
        )
    )
    if not same:
        return None
    if tag == "none":
        return manifest if manifest.get("random_weights") and manifest.get("seed") == seed else None
    checkpoint = manifest.get("checkpoint") or {}
    if Path(tag).is_file():
        from .weights import sha256_file  # noqa: PLC0415

        resolved = str(Path(tag).resolve())
        return manifest if checkpoint.get("path") == resolved and checkpoint.get("sha256") == sha256_file(tag) else None
    return manifest if manifest.get("pretrained") == tag else None


def require_modules(*names: str) -> None:
    """Raise ``ModuleNotFoundError`` (with ``.name``) for the first module that is not installed."""
    import importlib.util  # noqa: PLC0415

    for name in names:
        if importlib.util.find_spec(name) is None:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)


def _prepare_folder(out: Path, force: bool) -> Path:
    """Refuse to overwrite an export without ``force``; return the temporary sibling folder to write into.

    The export is written there and renamed into place only when complete, so an interrupted or
    killed export never leaves a half-written folder behind a valid-looking manifest.
    """
    if out.exists() and not out.is_dir():
        raise ClipTritonError(f"{out} is a file", "choose a folder for --onnx-dir")
    if out.is_dir() and any(out.iterdir()) and not force:
        what = "an export (manifest.json)" if (out / MANIFEST).exists() else "other files"
        raise ClipTritonError(f"{out} already holds {what}", "pass --force to replace it, or choose another --onnx-dir")
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in out.parent.glob(f".{out.name}.partial-*"):  # left by an export that was killed
        if not _alive(stale.name.rsplit("-", 1)[-1]):
            shutil.rmtree(stale, ignore_errors=True)
    work = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    return work


def _alive(pid: str) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


def _publish(work: Path, out: Path) -> None:
    """Swap the finished export into place (the old one, with --force, goes only after)."""
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.is_dir():
        if any(out.iterdir()):
            out.rename(old)
        else:
            out.rmdir()
    work.rename(out)
    shutil.rmtree(old, ignore_errors=True)


# The export's steps, shown as a progress bar (the child reports its five through a queue).
CHILD_STEPS = ("weights", "text reference", "vision reference", "text graph", "vision graph")


def _child_main(job: dict, events) -> None:
    """The export child: report the result (or the error) through the queue the parent drains."""
    global _EVENTS  # noqa: PLW0603 (this process's channel to the parent)
    _EVENTS = events
    try:
        events.put(("result", _export_stage(job)))
    except BaseException as exc:  # noqa: BLE001 (re-raised in the parent)
        try:
            events.put(("error", exc))
        except Exception:  # noqa: BLE001 (an exception that does not pickle)
            events.put(("error", ClipTritonError(f"export failed: {type(exc).__name__}: {exc}")))


def _run_child(job: dict, steps, write_line) -> dict:
    """Run the PyTorch stage in a spawned child, relaying its log lines and steps. Whatever ends the
    parent (Ctrl-C, an error) ends the child too: no orphan keeps exporting into a removed folder."""
    import queue as queue_module  # noqa: PLC0415

    context = multiprocessing.get_context("spawn")
    events = context.Queue()
    child = context.Process(target=_child_main, args=(job, events), name="clip-triton-export", daemon=True)
    child.start()
    try:
        while True:
            try:
                kind, payload = events.get(timeout=0.2)
            except queue_module.Empty:
                if not child.is_alive():
                    raise ClipTritonError(
                        f"the export process died (exit code {child.exitcode})",
                        "a negative code is the signal that killed it (-9: often the kernel's OOM killer; "
                        "bigG needs ~24 GiB)",
                    ) from None
                continue
            if kind == "step":
                steps.update(1)
                steps.set_postfix_str(payload, refresh=True)
            elif kind == "log":
                write_line(payload)
            elif kind == "error":
                raise payload
            else:
                return payload
    finally:
        if child.is_alive():
            child.join(timeout=10)  # it finishes on its own after the result; stopped otherwise
        if child.is_alive():
            child.terminate()
            child.join(timeout=10)
        if child.is_alive():
            child.kill()
            child.join()


def export_model(
    model: str,
    pretrained: str | None,
    out_dir: str | Path,
    *,
    precision: str = DEFAULT_PRECISION,
    opset: int = 18,
    seed: int = 0,
    verify: bool = True,
    verify_batches: tuple[int, ...] = DEFAULT_VERIFY_BATCHES,
    external_threshold: int = DEFAULT_EXTERNAL_THRESHOLD,
    cache_dir: str | None = None,
    log: Progress | None = None,
    force: bool = False,
    reuse: bool = False,
    progress: bool | None = None,
    text_buckets: tuple[int, ...] | None = None,
    openvino_ir: bool | None = None,
) -> dict:
    """Export both towers of ``model`` into ``out_dir``; returns the manifest (also written).

    The PyTorch work runs in a child process; ONNX Runtime then verifies one tower at a time here.
    ``out_dir`` must be empty or absent unless ``force``; it appears only once the export is complete.
    ``reuse``: keep a verified export of the same model, weights and precision already in ``out_dir``
    (returns its manifest); anything else there is replaced. ``progress``: a step bar on stderr
    (None: when stderr is a terminal). ``text_buckets``: the text graph's shorter sequence lengths
    (None: the contract's default, ``()``: a static graph at the context length). ``openvino_ir``: also
    convert each tower to OpenVINO IR straight from the module, verified like the ONNX graphs (the
    OpenVINO runtimes serve it instead of the ONNX: faster on the CPU, docs/benchmarks.md). None, the
    default: where it would be served (``wants_openvino_ir``: fp32 with OpenVINO installed); there, an
    IR that OpenVINO cannot convert or that fails verification is left out with a warning (the ONNX
    graphs still serve), where True fails the export.
    """
    from clip_triton.progress import bar  # noqa: PLC0415

    require_modules("torch", "open_clip", "onnx", "onnxruntime")  # before any work, not after minutes of it
    log = log or Progress("export")
    out = Path(out_dir)
    if reuse:
        existing = current_export(
            out, model, pretrained, precision=precision, seed=seed, text_buckets=text_buckets, openvino_ir=openvino_ir
        )
        if existing is not None:
            log(f"reusing the verified export in {out} ({existing['model']}, {existing['pretrained']}, {precision})")
            return existing
    work = _prepare_folder(out, force or reuse)
    started = time.monotonic()
    required, openvino_ir = openvino_ir is True, wants_openvino_ir(openvino_ir, precision)
    extra = (2 if openvino_ir else 0) * (2 if verify else 1)  # IR conversion (and its verification), per tower
    steps = bar(len(CHILD_STEPS) + (3 if verify else 1) + extra, "export", unit="step", enabled=progress)
    try:
        manifest = _export_into(
            work,
            model,
            pretrained,
            precision=precision,
            opset=opset,
            seed=seed,
            verify=verify,
            verify_batches=verify_batches,
            external_threshold=external_threshold,
            cache_dir=cache_dir,
            log=log,
            steps=steps,
            started=started,
            text_buckets=text_buckets,
            openvino_ir=openvino_ir,
            openvino_ir_required=required,
        )
    except VerificationError:
        _publish(work, out)  # kept for inspection: its manifest says the verification failed, so nothing serves it
        steps.close()
        raise
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        steps.close()
        raise
    _publish(work, out)
    steps.update(1)
    steps.close()
    log(
        f"wrote {out / MANIFEST} (peak RSS: export {manifest['peak_rss_gib']['export_process']} GiB, "
        f"verification {manifest['peak_rss_gib']['verification_process']} GiB)"
    )
    return manifest


def _export_into(
    work: Path,
    model: str,
    pretrained: str | None,
    *,
    precision: str,
    opset: int,
    seed: int,
    verify: bool,
    verify_batches: tuple[int, ...],
    external_threshold: int,
    cache_dir: str | None,
    log: Progress,
    steps,
    started: float,
    text_buckets: tuple[int, ...] | None = None,
    openvino_ir: bool = False,
    openvino_ir_required: bool = True,
) -> dict:
    references = work / REFERENCES
    job = {
        "model": model,
        "pretrained": pretrained,
        "out": str(work),
        "precision": precision,
        "opset": opset,
        "seed": seed,
        "verify": verify,
        "verify_batches": list(verify_batches),
        "text_buckets": None if text_buckets is None else list(text_buckets),
        "openvino_ir": openvino_ir,
        "openvino_ir_required": openvino_ir_required,
        "cache_dir": cache_dir,
        "external_threshold": external_threshold,
        "references": str(references),
        "start": log.start,
    }
    facts = _run_child(job, steps, lambda line: emit(log.logger, line) if log.enabled else None)
    contract = ModelContract.from_dict(facts["contract"])

    checks = []
    if verify:
        cases = load_references(references)
        checks = check_graphs(work, contract, cases, log, steps=steps)
        if facts.get("openvino_ir"):  # OpenVINO fp32 on the IR: the same references, the same tolerance
            ir_checks = check_graphs(work, contract, cases, log, runtime="openvino", steps=steps, graph="ir")
            if openvino_ir_required or all(c.passed for c in ir_checks):
                checks += ir_checks
            else:  # asked for by default only: the verified ONNX graphs serve, nothing unverified does
                failed = sorted({c.tower.split()[0] for c in ir_checks if not c.passed})  # "text ir" -> text
                facts["openvino_ir_skipped"] = f"the OpenVINO IR of {', '.join(failed)} failed verification"
                log(
                    f"WARNING: {facts['openvino_ir_skipped']} against open_clip; it is removed and the export "
                    "serves on ONNX Runtime (export --openvino-ir to fail instead)"
                )
                remove_ir(work)
                facts["openvino_ir"] = None
    else:
        log("WARNING: verification skipped (--no-verify); the graphs are unchecked against open_clip")

    manifest = {
        "format": EXPORT_FORMAT,
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
        "scoring": contract.scoring,
        "contract": facts["contract"],
        "hf_tokenizer": _tokenizer_facts(work),
        "graphs": facts["graphs"],
        "openvino_ir": facts.get("openvino_ir"),
        "openvino_ir_skipped": facts.get("openvino_ir_skipped"),
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
    (work / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    if verify:
        V.raise_on_failure(checks)
    return manifest


def _tokenizer_facts(folder: Path) -> dict | None:
    """The Hugging Face tokenizer saved with the export (its files and the served file's sha256)."""
    from clip_triton.contract import HF_TOKENIZER_FILE  # noqa: PLC0415

    from .weights import sha256_file  # noqa: PLC0415

    path = folder / HF_TOKENIZER_DIR
    if not (path / HF_TOKENIZER_FILE).is_file():
        return None
    return {
        "dir": HF_TOKENIZER_DIR,
        "files": sorted(p.name for p in path.iterdir()),
        "sha256": sha256_file(path / HF_TOKENIZER_FILE),
    }


def read_manifest(onnx_dir: str | Path) -> dict:
    path = Path(onnx_dir) / MANIFEST
    if not path.is_file():
        raise ClipTritonError(f"{path} not found", "point at a folder written by `clip-triton export`")
    return json.loads(path.read_text())


def verify_export(
    onnx_dir: str | Path,
    *,
    seed: int | None = None,
    checkpoint: str | None = None,
    batches: tuple[int, ...] = DEFAULT_VERIFY_BATCHES,
    log: Progress | None = None,
    runtime: str = "onnxruntime",
    cpu_precision: str = "fp32",
) -> list:
    """Re-check an existing export against open_clip rebuilt from its manifest (with OpenVINO, its
    OpenVINO IR too, when it has one). ``runtime`` may be ``auto``: resolved for this export as the
    repository resolves it (``cpuruntime.resolve_cpu_runtime``).

    Random-weight exports are rebuilt from their recorded seed (``seed`` overrides it); exports of
    real weights reload the recorded checkpoint (``checkpoint`` overrides its path).
    """
    log = log or Progress("verify")
    manifest = read_manifest(onnx_dir)
    runtime = resolve_cpu_runtime(runtime, cpu_precision, bool(manifest.get("openvino_ir")))
    contract = ModelContract.from_dict(manifest["contract"])
    if manifest["random_weights"]:
        pretrained, use_seed = "none", manifest["seed"] if seed is None else seed
    else:
        pretrained, use_seed = checkpoint or manifest["checkpoint"]["path"] or manifest["pretrained"], 0
    model_name = register_recorded_config(contract.model, contract.model_cfg)
    loaded = load_model(model_name, pretrained, precision=contract.precision, seed=use_seed, log=log)
    folder = Path(onnx_dir) / HF_TOKENIZER_DIR
    inputs = V.verification_inputs(contract, tuple(batches), tokenizer_dir=folder if folder.is_dir() else None)
    pad = contract.tokenizer.pad_token_id
    cases = {
        tower: [
            (label, x, ref)
            for (label, x), ref in zip(
                inputs[tower], V.torch_reference(loaded.model, tower, inputs[tower], pad, contract)
            )
        ]
        for tower in EXPORT_ORDER
    }
    del loaded  # no export ran here, so this frees the weights before ONNX Runtime loads the graphs
    gc.collect()
    checks = check_graphs(Path(onnx_dir), contract, cases, log, runtime=runtime, cpu_precision=cpu_precision)
    if runtime == "openvino" and manifest.get("openvino_ir"):  # what the OpenVINO runtimes serve
        checks += check_graphs(
            Path(onnx_dir), contract, cases, log, runtime=runtime, cpu_precision=cpu_precision, graph="ir"
        )
    V.raise_on_failure(checks)
    return checks
