"""Resolve weights (hub tag, local checkpoint, or random) and build the open_clip model."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from clip_triton.contract import DEFAULT_PRECISION, ModelContract, normalise_pretrained
from clip_triton.errors import ClipTritonError
from clip_triton.progress import Progress

from .adapter import contract_from_open_clip, register_model_config
from .hub import reachable


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
    hf_tokenizer: object = None  # open_clip's HFTokenizer, for a model with a Hugging Face tokenizer


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
    why = reachable(endpoint) if endpoint else None
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
    text_buckets: tuple[int, ...] | None = None,
) -> LoadedModel:
    """Build ``model`` with weights from a tag, a file, or random init (seeded, reproducible).

    The model is returned in fp32: it is the reference every exported graph is compared with.
    ``precision`` only selects the contract's encoder dtypes; ``text_buckets`` the text graph's
    sequence lengths (None: the contract's default for this text tower).
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
    # validates name and tag
    contract = contract_from_open_clip(model, tag, precision=precision, text_buckets=text_buckets)
    hf_tokenizer = None
    if contract.tokenizer.kind == "hf":  # before any weights: a tokenizer that cannot be had stops the export early
        contract, hf_tokenizer = resolve_hf_tokenizer(contract, cache_dir, log)

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
        if contract.model_cfg.get("text_cfg", {}).get("hf_model_name"):
            # A Hugging Face text tower is built from its config, never from the hub's weights: random
            # means random, and a checkpoint holds the text weights too.
            create_kwargs["pretrained_hf"] = False
        net = open_clip.create_model(name, precision="fp32", device="cpu", **create_kwargs)
    except (RuntimeError, KeyError, ValueError) as exc:
        raise ClipTritonError(
            f"could not load weights into {name}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}",
            "check that the checkpoint belongs to this architecture",
        ) from None
    net.eval().requires_grad_(False)
    text = getattr(net, "text", None)
    if type(text).__name__ == "HFTextEncoder":  # its vocabulary is in the transformer's config
        from dataclasses import replace  # noqa: PLC0415

        contract = contract.with_(tokenizer=replace(contract.tokenizer, vocab_size=int(text.vocab_size)))
    if tag == "none":
        calibrated = calibrate_batch_norm(net, contract, seed)
        if calibrated:
            log(
                f"random weights: calibrated {calibrated} BatchNorm layers on seeded noise (else outputs ignore the image)"
            )
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
        hf_tokenizer=hf_tokenizer,
    )


def resolve_hf_tokenizer(contract: ModelContract, cache_dir: str | None, log: Progress) -> tuple[ModelContract, object]:
    """Load the model's Hugging Face tokenizer as open_clip does (``open_clip.get_tokenizer``) and read
    its special ids into the contract: the end token (pooled by ``eos`` towers, the bucket cut), the
    pad id, and the start token where the tokenizer adds one. Returns (contract, open_clip tokenizer)."""
    from dataclasses import replace  # noqa: PLC0415

    import open_clip  # noqa: PLC0415

    spec = contract.tokenizer
    log(f"loading the Hugging Face tokenizer {spec.hf_name}")
    try:
        tokenizer = open_clip.get_tokenizer(contract.model, cache_dir=cache_dir)
    except ImportError as exc:
        raise ClipTritonError(
            f"{contract.model}'s tokenizer needs transformers ({exc.name or exc})",
            "pip install 'clip-triton[export]' (it brings transformers and tokenizers)",
        ) from None
    except (OSError, ValueError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ClipTritonError(
            f"could not load the Hugging Face tokenizer {spec.hf_name!r}: {first}",
            "it comes from the Hugging Face hub on first use: run once with network access (or "
            f"`hf download {spec.hf_name}`), HF_HUB_OFFLINE=1 then uses the cache; or set text_cfg."
            "hf_tokenizer_name of a model-config JSON to a local folder",
        ) from None
    hf = tokenizer.tokenizer
    if getattr(hf, "padding_side", "right") != "right" or getattr(hf, "truncation_side", "right") != "right":
        raise ClipTritonError(
            f"{spec.hf_name} pads or truncates on the left", "only right padding and truncation are served"
        )
    if hf.eos_token_id is None or hf.pad_token_id is None:
        raise ClipTritonError(f"{spec.hf_name} has no end or pad token", "its texts cannot be served in batches")
    first = int(tokenizer(["x"])[0][0])
    sot = hf.bos_token_id if hf.bos_token_id is not None and first == hf.bos_token_id else -1
    eos_id = contract.model_cfg.get("text_cfg", {}).get("eos_id")
    if spec.pool_type == "eos" and eos_id is not None and eos_id != hf.eos_token_id:
        raise ClipTritonError(
            f"{contract.model} pools at token {eos_id} but its tokenizer ends texts with {hf.eos_token_id}",
            "the model config and the tokenizer disagree: check text_cfg.eos_id",
        )
    languages, default = _source_languages(tokenizer, contract.model)
    resolved = replace(
        spec,
        sot_token_id=int(sot),
        eot_token_id=int(hf.eos_token_id),
        pad_token_id=int(hf.pad_token_id),
        languages=languages,
        default_language=default,
    )
    return contract.with_(tokenizer=resolved), tokenizer


def _source_languages(tokenizer, model: str) -> tuple[tuple[str, ...], str]:
    """(language codes, default) of a tokenizer that starts a text with its source-language code (NLLB's,
    ``src_lang``); ``((), "")`` for any other. Each code is checked to change the first id only (the
    ``[code] $A </s>`` template the server's tokenizer relies on); a legacy template is refused."""
    hf = tokenizer.tokenizer
    default = getattr(hf, "src_lang", None)
    if not default or not callable(getattr(hf, "set_src_lang_special_tokens", None)):
        return (), ""
    listed = getattr(hf, "additional_special_tokens", None) or getattr(hf, "extra_special_tokens", None) or []
    codes = tuple(str(code) for code in listed)
    base = tokenizer(["a photo of a cat"])[0].tolist()
    try:
        for code in codes:
            hf.src_lang = code  # what open_clip's set_language means to do (its __call__ resets it: docs/export.md)
            row = tokenizer(["a photo of a cat"])[0].tolist()
            if row[0] != hf.convert_tokens_to_ids(code) or row[1:] != base[1:]:
                raise ClipTritonError(
                    f"{model}'s tokenizer does not start a text with its language code {code!r} "
                    f"(got {row[:3]}...; legacy_behaviour puts it after </s>)",
                    "only the [code] text </s> template is served (transformers' default for NLLB)",
                )
    finally:
        hf.src_lang = default
    if default not in codes:
        raise ClipTritonError(f"{model}'s tokenizer defaults to {default!r}, not one of its language codes")
    return codes, str(default)


def calibrate_batch_norm(model, contract: ModelContract, seed: int, batches: int = 2, batch: int = 8) -> int:
    """Give a randomly initialised tower's BatchNorm layers the running statistics of its own
    activations (two seeded batches of noise, cumulative average), as a trained model has; returns
    how many. Left at their init (mean 0, var 1), a convolutional tower such as MobileCLIP's FastViT
    gives the same embedding for every image (pairwise cosine 1.0 on the tiny config), and a check
    against it could not catch a wrong pixel. Only for random weights: a checkpoint is never touched."""
    import torch  # noqa: PLC0415

    norms = [m for m in model.visual.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return 0
    generator = torch.Generator().manual_seed(seed)
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative average over the calibration batches
        norm.train()
    with torch.no_grad():
        for _ in range(batches):
            model.encode_image(torch.randn((batch, *contract.pixels.shape), generator=generator))
    for norm in norms:
        norm.eval()
    return len(norms)
