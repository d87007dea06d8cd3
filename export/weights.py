"""Resolve weights (hub tag, local checkpoint, or random) and build the open_clip model."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from clip_triton.contract import ModelContract, normalise_pretrained, register_model_config
from clip_triton.errors import ClipTritonError
from clip_triton.progress import Progress


@dataclass
class LoadedModel:
    model: object  # open_clip.CLIP, in eval mode, fp32, requires_grad off
    contract: ModelContract
    checkpoint_path: str | None
    checkpoint_sha256: str | None
    random_weights: bool
    seed: int | None
    logit_scale: float
    logit_bias: float | None


def sha256_file(path: str | Path, chunk: int = 16 * 1024 * 1024) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _download(name: str, tag: str, cache_dir: str | None, log: Progress) -> str:
    """Fetch a tag's checkpoint before building the model, so no network fails fast and clearly."""
    import open_clip  # noqa: PLC0415
    from open_clip.pretrained import download_pretrained  # noqa: PLC0415

    cfg = open_clip.get_pretrained_cfg(name, tag)
    log(f"resolving weights {name}/{tag} from {cfg.get('hf_hub') or cfg.get('url')}")
    try:
        path = download_pretrained(cfg, cache_dir=cache_dir)
    except Exception as exc:  # huggingface_hub/urllib raise many types; all mean the same here
        raise ClipTritonError(
            f"could not download weights for {name}/{tag}: {str(exc).splitlines()[0][:200]}",
            "without internet, download the checkpoint elsewhere and pass its path with "
            "--pretrained /path/to/open_clip_pytorch_model.bin, or use --pretrained none for random weights",
        ) from None
    if not path:
        raise ClipTritonError(f"no download location is known for {name}/{tag}", "pass a checkpoint file path")
    return path


def load_model(
    model: str,
    pretrained: str | None,
    *,
    precision: str = "fp32",
    seed: int = 0,
    cache_dir: str | None = None,
    log: Progress | None = None,
) -> LoadedModel:
    """Build ``model`` with weights from a tag, a file, or random init (seeded, reproducible).

    The model is returned in fp32: it is the reference every exported graph is compared with.
    ``precision`` only selects the contract's encoder dtypes.
    """
    import torch  # noqa: PLC0415
    import open_clip  # noqa: PLC0415

    log = log or Progress("export")
    name = register_model_config(model)
    tag = normalise_pretrained(pretrained)
    local = tag != "none" and (Path(tag).exists() or os.sep in tag or tag.endswith((".bin", ".pt", ".pth", ".safetensors")))
    if local and not Path(tag).is_file():
        raise ClipTritonError(f"checkpoint file {tag} not found", "pass an existing checkpoint path, a tag, or 'none'")
    contract = ModelContract.from_open_clip(model, tag, precision=precision)  # validates name and tag

    checkpoint, digest = None, None
    if tag == "none":
        log(f"WARNING: building {name} with RANDOM weights (--pretrained none): embeddings are meaningless")
        torch.manual_seed(seed)
        create_kwargs = {"pretrained": None}
    elif local:
        checkpoint = str(Path(tag).resolve())
        log(f"hashing checkpoint {checkpoint}")
        digest = sha256_file(checkpoint)
        create_kwargs = {"pretrained": checkpoint}
    else:
        checkpoint = _download(name, tag, cache_dir, log)
        log(f"hashing checkpoint {checkpoint}")
        digest = sha256_file(checkpoint)
        create_kwargs = {"pretrained": tag, "cache_dir": cache_dir}

    log(f"building {name} (fp32) on the CPU")
    try:
        net = open_clip.create_model(name, precision="fp32", device="cpu", **create_kwargs)
    except (RuntimeError, KeyError, ValueError) as exc:
        raise ClipTritonError(
            f"could not load weights into {name}: {str(exc).splitlines()[0][:200]}",
            "check that the checkpoint belongs to this architecture",
        ) from None
    net.eval().requires_grad_(False)
    built = dict(net.visual.preprocess_cfg)
    expected = contract.preprocess
    if tuple(built["mean"]) != expected.mean or tuple(built["std"]) != expected.std:
        raise ClipTritonError(
            f"open_clip's preprocess config {built} disagrees with the contract {expected}",
            "report this: the contract must follow open_clip",
        )
    bias = getattr(net, "logit_bias", None)
    return LoadedModel(
        model=net,
        contract=contract,
        checkpoint_path=checkpoint,
        checkpoint_sha256=digest,
        random_weights=tag == "none",
        seed=seed if tag == "none" else None,
        logit_scale=float(net.logit_scale.exp().item()),
        logit_bias=float(bias.item()) if bias is not None else None,
    )
