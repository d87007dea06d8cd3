"""Resolve weights (hub tag, local checkpoint, or random) and build the open_clip model."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from clip_triton.contract import DEFAULT_PRECISION, ModelContract, normalise_pretrained, register_model_config
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


def _hub_files(cfg: dict) -> tuple[str, list[str]]:
    """``(repo_id, [file names to look for, safetensors first])`` of a pretrained config's hf_hub entry."""
    from open_clip.pretrained import HF_WEIGHTS_NAME, _get_safe_alternatives  # noqa: PLC0415

    model_id, filename = os.path.split(cfg["hf_hub"])
    filename = filename or HF_WEIGHTS_NAME
    return model_id, [*_get_safe_alternatives(filename), filename]


def _cached(cfg: dict, cache_dir: str | None) -> str | None:
    """The checkpoint's path when the hub cache already holds it (no network needed)."""
    if not cfg.get("hf_hub"):
        return None
    from huggingface_hub import try_to_load_from_cache  # noqa: PLC0415

    model_id, names = _hub_files(cfg)
    for name in names:
        found = try_to_load_from_cache(model_id, name, cache_dir=cache_dir)
        if isinstance(found, str):
            return found
    return None


def _reachable(url: str, timeout: float = 5.0) -> str | None:
    """None when a TCP connection to ``url``'s host opens within ``timeout``, else why not. Behind a proxy
    (``HTTPS_PROXY``) the download goes through it, so the direct check is skipped."""
    import socket  # noqa: PLC0415
    from urllib.parse import urlsplit  # noqa: PLC0415

    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    parts = urlsplit(url)
    try:
        socket.create_connection(
            (parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)), timeout=timeout
        ).close()
    except OSError as exc:
        return f"{parts.hostname}: {exc.strerror or exc}"
    return None


OFFLINE_HINT = (
    "offline: pass a checkpoint file with --pretrained /path/to/open_clip_pytorch_model.bin, set "
    "HF_HUB_OFFLINE=1 to use only the local Hugging Face cache, or use --pretrained none for random "
    "weights"
)


def _download(name: str, tag: str, cache_dir: str | None, log: Progress) -> str:
    """Find or fetch a tag's checkpoint before building the model. Offline, this fails within seconds
    (no minute of hub retries) with the ways forward."""
    import open_clip  # noqa: PLC0415
    from open_clip.pretrained import download_pretrained  # noqa: PLC0415

    cfg = open_clip.get_pretrained_cfg(name, tag)
    cached = _cached(cfg, cache_dir)
    if cached:
        log(f"weights {name}/{tag} found in the hub cache: {cached}")
        return cached
    source = cfg.get("hf_hub") or cfg.get("url")
    if cfg.get("hf_hub"):
        from huggingface_hub import constants  # noqa: PLC0415

        if constants.HF_HUB_OFFLINE:
            raise ClipTritonError(
                f"the weights for {name}/{tag} are not in the Hugging Face cache and HF_HUB_OFFLINE is set",
                "download them where there is internet, or pass a checkpoint file with --pretrained PATH",
            )
        endpoint = constants.ENDPOINT
    else:
        endpoint = cfg.get("url", "")
    why = _reachable(endpoint) if endpoint else None
    if why:
        raise ClipTritonError(f"cannot reach {endpoint} to download the weights for {name}/{tag} ({why})", OFFLINE_HINT)
    log(f"downloading weights {name}/{tag} from {source}")
    try:
        path = download_pretrained(cfg, cache_dir=cache_dir)
    except Exception as exc:  # huggingface_hub/urllib raise many types; all mean the same here  # noqa: BLE001
        reason = "; ".join(line.strip() for line in str(exc).splitlines() if line.strip()) or type(exc).__name__
        raise ClipTritonError(f"could not download the weights for {name}/{tag}: {reason}", OFFLINE_HINT) from None
    if not path:
        raise ClipTritonError(f"no download location is known for {name}/{tag}", "pass a checkpoint file path")
    return path


def load_model(
    model: str,
    pretrained: str | None,
    *,
    precision: str = DEFAULT_PRECISION,
    seed: int = 0,
    cache_dir: str | None = None,
    log: Progress | None = None,
) -> LoadedModel:
    """Build ``model`` with weights from a tag, a file, or random init (seeded, reproducible).

    The model is returned in fp32: it is the reference every exported graph is compared with.
    ``precision`` only selects the contract's encoder dtypes.
    """
    import open_clip  # noqa: PLC0415
    import torch  # noqa: PLC0415

    log = log or Progress("export")
    name = register_model_config(model)
    tag = normalise_pretrained(pretrained)
    local = tag != "none" and (
        Path(tag).exists() or os.sep in tag or tag.endswith((".bin", ".pt", ".pth", ".safetensors"))
    )
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
            f"could not load weights into {name}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}",
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
