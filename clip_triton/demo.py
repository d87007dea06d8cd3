"""``clip-triton demo``: the whole shape on this machine, offline.

export (open_clip -> verified ONNX) -> repository (python-backend ORT encoders) -> tritonserver ->
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
    cpu_runtime: str = "onnxruntime",
    cpu_precision: str = "fp32",
) -> int:
    from clip_triton.client import ClipClient  # noqa: PLC0415
    from clip_triton.export import export_model  # noqa: PLC0415

    from .repository import RepoOptions, write_repository  # noqa: PLC0415
    from .server import TritonServer  # noqa: PLC0415

    log = Progress("demo")
    work = Path(workdir)
    onnx_dir, repo = work / "onnx", work / "model_repository"
    export_model(model, pretrained, onnx_dir, precision="fp32", log=log, reuse=True)
    options = RepoOptions(runtime="python", cpu_runtime=cpu_runtime, cpu_precision=cpu_precision)
    write_repository(repo, onnx_dir=onnx_dir, force=True, options=options)
    log(f"wrote the Triton model repository {repo} (encoders: {options.encoder_runtime})")
    if "requested" in options.encoder_runtime:
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
