"""``clip-triton demo``: the whole shape on this machine, offline.

export (open_clip -> verified ONNX) -> repository (python-backend ORT encoders) -> tritonserver ->
ClipClient: image bytes and prompt strings in, zero-shot scores out.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

from .contract import MANIFEST, normalise_pretrained
from .progress import Progress

DEFAULT_PROMPTS = ("a photo of a cat", "a photo of a cup of coffee", "a photo of an astronaut",
                   "a photo of a rocket launch", "a photo of a dog")


def export_is_current(folder: Path, model: str, pretrained: str) -> bool:
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return False
    data = json.loads(manifest.read_text())
    return (data.get("model") == Path(model).stem and data.get("pretrained") == normalise_pretrained(pretrained)
            and data.get("verification", {}).get("passed") is True)


def run_demo(model: str = "ViT-B-32", pretrained: str = "none", workdir: str = ".clip-triton/demo",
             images: list[str] | None = None, prompts: list[str] | None = None, cpu_engine: str = "onnxruntime",
             cpu_precision: str = "fp32") -> int:
    from clip_triton.client import ClipClient  # noqa: PLC0415
    from clip_triton.export import export_model  # noqa: PLC0415

    from .repository import RepoOptions, write_repository  # noqa: PLC0415
    from .server import TritonServer  # noqa: PLC0415

    log = Progress("demo")
    work = Path(workdir)
    onnx_dir, repo = work / "onnx", work / "model_repository"
    if export_is_current(onnx_dir, model, pretrained):
        log(f"reusing the verified export in {onnx_dir}")
    else:
        log(f"exporting {model} ({pretrained}) to {onnx_dir}")
        export_model(model, pretrained, onnx_dir, precision="fp32", log=log)
    write_repository(repo, onnx_dir=onnx_dir, force=True,
                     options=RepoOptions(runtime="python", cpu_engine=cpu_engine, cpu_precision=cpu_precision))
    log(f"wrote the Triton model repository {repo} (encoders: {cpu_engine}, {cpu_precision})")

    if images:
        items = [Path(p) for p in images]
    else:
        folder = resources.files("clip_triton").joinpath("assets", "images")
        items = [Path(str(folder.joinpath(name))) for name in ("cat.jpg", "coffee.jpg", "astronaut.jpg", "rocket.jpg")]
    prompts = list(prompts or DEFAULT_PROMPTS)

    log("starting tritonserver (CPU, python backend)")
    with TritonServer(repo, log_file=work / "tritonserver.log") as server:
        log(f"tritonserver ready: gRPC {server.grpc_url}, HTTP {server.http_url}")
        with ClipClient(server.grpc_url) as client:
            facts = client.facts
            results = client.classify(items, prompts)
    print()
    print(f"model {facts.model} / {facts.pretrained}, embed_dim {facts.embed_dim}, "
          f"logit_scale {facts.logit_scale:.4f} (read from the server)")
    if facts.random_weights:
        print("NOTE: these weights are RANDOM (--pretrained none): the scores below exercise the whole serving")
        print("path but carry no meaning. Export real weights with --pretrained TAG or a checkpoint path.")
    for path, ranked in zip(items, results):
        print(f"\n{path.name}")
        print(f"  {'prompt':<32}{'cosine':>10}{'probability':>14}")
        for row in ranked:
            print(f"  {row['prompt']:<32}{row['cosine']:>10.4f}{row['probability']:>14.4f}")
    return 0
