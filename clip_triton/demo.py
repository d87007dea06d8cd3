"""``clip-triton demo``: the whole shape on this machine, offline.

export (open_clip -> verified ONNX, and OpenVINO IR where OpenVINO is installed) -> repository
(python-backend encoders: OpenVINO fp32 on the IR, else ONNX Runtime) -> tritonserver ->
ClipClient: image bytes and prompt strings in, zero-shot scores out.
"""

from __future__ import annotations

from pathlib import Path

from .progress import Progress
from .samples import DEMO_PROMPTS, DEMO_WORKDIR, example, image_paths, write_sample_dataset


def run_demo(
    model: str = "ViT-B-32",
    pretrained: str = "none",
    workdir: str = DEMO_WORKDIR,
    images: list[str] | None = None,
    prompts: list[str] | None = None,
    cpu_runtime: str = "auto",
    cpu_precision: str = "fp32",
    compare: str | None = None,
    compare_pretrained: str = "none",
) -> int:
    """``compare``: a second model, served beside the first from one repository and one tritonserver
    (issue 30), and the sample photos classified by both, side by side."""
    from clip_triton.client import ClipClient  # noqa: PLC0415
    from clip_triton.export import export_model  # noqa: PLC0415

    from .repository import RepoOptions, read_export_facts, write_repository  # noqa: PLC0415
    from .server import TritonServer  # noqa: PLC0415

    log = Progress("demo")
    work = Path(workdir)
    onnx_dir, repo = work / "onnx", work / "model_repository"
    export_model(model, pretrained, onnx_dir, precision="fp32", log=log, reuse=True)
    options = RepoOptions(runtime="python", cpu_runtime=cpu_runtime, cpu_precision=cpu_precision)
    if compare is not None:
        return _compare(work, onnx_dir, compare, compare_pretrained, options, images, prompts, log)
    write_repository(repo, onnx_dir=onnx_dir, force=True, options=options)
    facts = read_export_facts(onnx_dir)
    served = options.resolved(facts)  # what --cpu-runtime auto became for this export, never "auto"
    log(f"wrote the Triton model repository {repo} (encoders: {served.encoder_runtime})")
    note = options.runtime_note(facts)
    if note:
        log(f"note: {note}")
    if "requested" in served.encoder_runtime:
        log("WARNING: this CPU has no native bf16 (AVX512-BF16 or AMX): OpenVINO computes in fp32 here")

    write_sample_dataset(work / "samples")  # what the next steps (and every --help example) use
    items = [Path(p) for p in images] if images else image_paths()
    prompts = list(prompts or DEMO_PROMPTS)

    log("starting tritonserver (CPU, python backend)")
    with TritonServer(repo, log_file=work / "tritonserver.log") as server:
        log(f"tritonserver ready: gRPC {server.grpc_url}, HTTP {server.http_url}")
        with ClipClient(server.grpc_url) as client:
            facts = client.facts
            results = client.classify(items, prompts)
    print()
    print(
        f"model {facts.public_id} ({facts.model} / {facts.public_pretrained}), embed_dim {facts.embed_dim}, "
        f"logit_scale {facts.logit_scale:.4f}, encoders {facts.encoder_runtime} (read from the server)"
    )
    if facts.random_weights:
        print("NOTE: these weights are RANDOM (--pretrained none): the scores below exercise the whole serving")
        print("path but carry no meaning. Export real weights with --pretrained TAG or a checkpoint path.")
    for path, ranked in zip(items, results):
        print(f"\n{path.name}")
        print(f"  {'prompt':<32}{'cosine':>10}{'probability':>14}")
        for row in ranked:
            print(f"  {row['prompt']:<32}{row['cosine']:>10.4f}{row['probability']:>14.4f}")
    print(next_steps(work))
    return 0


def _compare(work: Path, onnx_dir: Path, model: str, pretrained: str, options, images, prompts, log) -> int:
    """Two served models from one repository and one tritonserver, the photos classified by each."""
    from clip_triton.client import ClipClient  # noqa: PLC0415
    from clip_triton.export import export_model  # noqa: PLC0415

    from .repository import read_export_facts, write_repository  # noqa: PLC0415
    from .server import TritonServer  # noqa: PLC0415

    second = work / "compare" / "onnx"
    export_model(model, pretrained, second, precision="fp32", log=log, reuse=True)
    first_name = read_export_facts(onnx_dir).contract.model
    second_name = read_export_facts(second).contract.model
    if second_name == first_name:
        second_name = f"{second_name}-compare"
    repo = work / "compare" / "model_repository"
    write_repository(repo, options=options, force=True, exports=[(onnx_dir, first_name), (second, second_name)])
    log(f"wrote one Triton model repository of two served models: {repo}")
    write_sample_dataset(work / "samples")
    items = [Path(p) for p in images] if images else image_paths()
    prompts = list(prompts or DEMO_PROMPTS)
    log("starting tritonserver (CPU, python backend)")
    results, facts = {}, {}
    with TritonServer(repo, log_file=work / "compare" / "tritonserver.log") as server:
        log(f"tritonserver ready: gRPC {server.grpc_url}")
        for name in (first_name, second_name):
            with ClipClient(server.grpc_url, model=name) as client:
                facts[name] = client.facts
                results[name] = client.classify(items, prompts)
    print()
    for name, served in facts.items():
        scoring = "softmax over the prompts" if served.scoring == "softmax" else "a sigmoid per prompt"
        weights = " RANDOM weights" if served.random_weights else ""
        print(f"{name}: {served.embed_dim}-d, {scoring}, logit_scale {served.logit_scale:.4f}{weights}")
    width = max(12, *(len(name) + 2 for name in facts))
    for index, path in enumerate(items):
        print(f"\n{path.name}")
        print(f"  {'prompt':<32}" + "".join(f"{name:>{width}}" for name in facts))
        for prompt in prompts:
            cells = []
            for name in facts:
                row = next(r for r in results[name][index] if r["prompt"] == prompt)
                cells.append(f"{row['probability']:>{width}.4f}")
            print(f"  {prompt:<32}" + "".join(cells))
    activate = activation()
    print("\nNext, in a new shell:")
    if activate is not None:
        print(f"  {activate}")
    print(f"  clip-triton serve --repo {repo}")
    sample = work / "samples" / "cat" / "cat.jpg"
    for name in facts:
        print(f'  clip-triton classify {sample} --prompts "a cat" "a dog" --served-model {name}')
    return 0


def activation() -> str | None:
    """The line that puts this clip-triton on PATH in a new shell, or None when it already is there
    (`bash dev.sh demo` runs .venv/bin/clip-triton without activating .venv)."""
    import os  # noqa: PLC0415
    import shutil  # noqa: PLC0415
    import sys  # noqa: PLC0415

    bin_dir = Path(sys.executable).parent
    found = shutil.which("clip-triton")
    if found and Path(found).resolve().parent == bin_dir.resolve():
        return None
    activate = bin_dir / "activate"
    if not activate.is_file():
        return f'export PATH="{bin_dir}:$PATH"'
    try:
        shown = os.path.relpath(activate)
    except ValueError:
        shown = str(activate)
    return f"source {shown if not shown.startswith('..') else activate}"


def next_steps(work: Path) -> str:
    """What to try after the demo, as lines that run as written in a new shell (activation first where
    clip-triton is not on PATH): serve the repository, then the use commands on the sample dataset."""
    activate = activation()
    lines = ["", "Next, in a new shell" + (" (each line runs as written):" if activate is None else ":")]
    if activate is not None:
        lines.append(f"  {activate}  # put this clip-triton on PATH (in every new shell)")
    lines.append(f"  {example('serve', work)}  # keep it up (Ctrl-C stops); then, in another shell:")
    for command, what in (
        ("classify", "zero-shot scores"),
        ("embed", "an index: .npy + .json (resumable)"),
        ("search", "search it"),
        ("eval", "zero-shot accuracy on the samples"),
        ("eval-retrieval", "recall@k on their captions"),
    ):
        lines.append(f"  {example(command, work)}  # {what}")
    lines.append(
        "Real weights: clip-triton demo --pretrained laion2b_s34b_b79k (download) or --pretrained /path/to/checkpoint.bin"
    )
    return "\n".join(lines)
