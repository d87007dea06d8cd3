"""The open_clip adapter: what the contract is for an open_clip architecture and tag, and the custom
configs open_clip must know. Export-time only (imports open_clip); the contract itself never does."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from clip_triton.contract import (
    BUCKETABLE_POOLING,
    DEFAULT_MODEL,
    DEFAULT_PRECISION,
    DEFAULT_PRETRAINED,
    MASKED_POOLING,
    TEXT_BUCKETS,
    BatchProfile,
    ModelContract,
    PreprocessSpec,
    TokenizerSpec,
    as_tuple,
    normalise_pretrained,
)
from clip_triton.errors import ClipTritonError


# -- derivation from open_clip ---------------------------------------------------------
def contract_from_open_clip(
    model: str = DEFAULT_MODEL,
    pretrained: str | None = DEFAULT_PRETRAINED,
    precision: str = DEFAULT_PRECISION,
    batch: BatchProfile | None = None,
    text_buckets: tuple[int, ...] | None = None,
) -> ModelContract:
    """The :class:`~clip_triton.contract.ModelContract` of an architecture: its config and a tag's
    preprocessing read from open_clip (no weights).

    Read an architecture's config and a tag's preprocessing from open_clip (no weights).

    ``model`` is an open_clip architecture name or the path of a custom JSON config (which is
    registered with open_clip under its file stem). ``pretrained`` is a tag, a local checkpoint
    path, or ``None``/``"none"`` for random weights. ``text_buckets``: the shorter sequence lengths
    to serve (default :data:`TEXT_BUCKETS`; ``()`` for a static graph); refused for a text tower
    where a cut text would not be exact.
    """
    open_clip = import_open_clip()
    name = register_model_config(model)
    model_cfg = open_clip.get_model_config(name)
    if model_cfg is None:
        raise ClipTritonError(
            f"unknown open_clip architecture {model!r}",
            "pass a name from open_clip.list_models() or a path to a model-config JSON",
        )
    vision_cfg, text_cfg = model_cfg.get("vision_cfg", {}), model_cfg.get("text_cfg", {})
    hf_text = hf_text_pooler(name, text_cfg) if text_cfg.get("hf_model_name") else None
    if isinstance(vision_cfg.get("layers"), (list, tuple)):
        raise ClipTritonError(f"{name} is a ResNet (ModifiedResNet) model", "choose an open_clip ViT architecture")

    from open_clip.transform import PreprocessCfg, merge_preprocess_dict  # noqa: PLC0415 (export only)

    pre = merge_preprocess_dict(PreprocessCfg(), model_cfg.get("preprocess_cfg", {}))
    tag = normalise_pretrained(pretrained)
    if tag != "none" and not Path(tag).exists():
        tag_cfg = open_clip.get_pretrained_cfg(name, tag)
        if not tag_cfg:
            tags = open_clip.list_pretrained_tags_by_model(name)
            raise ClipTritonError(
                f"unknown pretrained tag {tag!r} for {name}",
                f"known tags: {', '.join(tags) or 'none'}; or pass a checkpoint file path, or 'none'",
            )
        pre = merge_preprocess_dict(pre, tag_cfg)
    pre["size"] = vision_cfg.get("image_size", pre["size"])  # open_clip sets size from the tower

    text_kwargs = text_cfg.get("tokenizer_kwargs", {}) or {}
    if text_kwargs.get("reduction_mask"):
        raise ClipTritonError(f"{name} uses a tokenizer reduction mask", "only truncation is served")
    hf_name = text_cfg.get("hf_tokenizer_name") or ""
    unserved = sorted(set(text_kwargs) - {"clean"}) if hf_name else []
    # CLIPA's strip_sep_token, 'clips' mode; a fixed `language` (open_clip's set_language is lost in the
    # tokenizer's own call: texts name their language, docs/export.md)
    if unserved:
        raise ClipTritonError(
            f"{name}'s tokenizer options {unserved} are not served",
            "SigLIP, SigLIP 2 and MetaCLIP 2 tokenizers are; these options are not implemented server-side",
        )
    context = int(text_cfg.get("context_length", 77))
    pool_type = hf_text or text_cfg.get("pool_type", "argmax")
    exact_cut = pool_type in MASKED_POOLING or (
        pool_type in BUCKETABLE_POOLING and not text_cfg.get("no_causal_mask", False)
    )
    if text_buckets is None:
        text_buckets = tuple(b for b in TEXT_BUCKETS if b < context) if exact_cut else ()
    elif text_buckets and not exact_cut:
        raise ClipTritonError(
            f"{name}'s text tower pools with {pool_type!r}"
            f"{' without a causal mask' if text_cfg.get('no_causal_mask') else ''}: a text cut to a bucket "
            "would not give the embedding of the whole context",
            "export without --text-buckets (or --text-buckets none)",
        )
    return ModelContract(
        model=name,
        pretrained=tag,
        embed_dim=int(model_cfg["embed_dim"]),
        preprocess=PreprocessSpec(
            image_size=as_tuple(pre["size"], 2),
            mean=as_tuple(pre["mean"], 3),
            std=as_tuple(pre["std"], 3),
            interpolation=pre["interpolation"],
            resize_mode=pre["resize_mode"],
            fill_color=int(pre.get("fill_color", 0)),
        ),
        tokenizer=TokenizerSpec(
            context_length=context,
            # A Hugging Face transformer's vocabulary is in its config, read with the model at export.
            vocab_size=int(text_cfg.get("vocab_size", 49408)) if not hf_text else -1,
            # open_clip's defaults: SimpleTokenizer lower-cases, HFTokenizer only collapses whitespace
            clean=text_kwargs.get("clean", "whitespace" if hf_name else "lower"),
            pool_type=pool_type,
            buckets=tuple(text_buckets),
            # A Hugging Face tokenizer's ids are read from its files at export (export.weights).
            kind="hf" if hf_name else "clip-bpe",
            hf_name=hf_name,
            sot_token_id=-1 if hf_name else TokenizerSpec.sot_token_id,
            eot_token_id=-1 if hf_name else TokenizerSpec.eot_token_id,
            pad_token_id=-1 if hf_name else TokenizerSpec.pad_token_id,
        ),
        precision=precision,
        batch=batch or BatchProfile(),
        model_cfg=model_cfg,
    )


def _hf_config(text_cfg: dict):
    """The Hugging Face config of a text transformer: a local folder, the hub's cache, or the hub itself
    where it answers (checked first: offline, transformers retries for half a minute)."""
    try:
        from huggingface_hub import constants  # noqa: PLC0415
        from transformers import AutoConfig  # noqa: PLC0415
    except ImportError as exc:
        raise ClipTritonError(
            "a Hugging Face text transformer needs transformers", "pip install 'clip-triton[export]'"
        ) from exc
    from .hub import reachable  # noqa: PLC0415

    name = text_cfg["hf_model_name"]
    hint = (
        f"it comes from the hub on first use: run once with network access (or `hf download {name} "
        "config.json`), or set text_cfg.hf_model_name of a model-config JSON to a local folder"
    )
    try:
        return AutoConfig.from_pretrained(name, local_files_only=True)
    except (OSError, ValueError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        why = None if Path(name).is_dir() else reachable(constants.ENDPOINT)
        if Path(name).is_dir() or why is not None:
            where = f"; the hub cannot be reached ({why})" if why else ""
            raise ClipTritonError(
                f"could not read the Hugging Face config of the text transformer {name!r}: {first}{where}", hint
            ) from None
    try:
        return AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ClipTritonError(
            f"could not read the Hugging Face config of the text transformer {name!r}: {first}", hint
        ) from None


def hf_text_pooler(name: str, text_cfg: dict) -> str:
    """The pooler of a Hugging Face text tower (open_clip's HFTextEncoder), refused unless a cut after
    the last real token is exact for it (contract ``MASKED_POOLING``)."""
    from open_clip.hf_configs import arch_dict  # noqa: PLC0415 (export only)

    pooler = text_cfg.get("hf_pooler_type")
    if pooler is None:
        model_type = _hf_config(text_cfg).model_type
        if model_type not in arch_dict:
            raise ClipTritonError(f"{name}'s text transformer {model_type!r} is not one open_clip knows")
        pooler = arch_dict[model_type]["pooler"]
    if pooler not in MASKED_POOLING:
        raise ClipTritonError(
            f"{name}'s text transformer pools with {pooler!r}, which is not served",
            f"served: {', '.join(MASKED_POOLING)} (open_clip's max_pooler fails on its own attention mask)",
        )
    return pooler


def register_model_config(model: str) -> str:
    """Register a custom model-config JSON with open_clip; return the architecture name to use."""
    path = Path(model)
    if path.suffix == ".json":
        if not path.is_file():
            raise ClipTritonError(f"model config {model} not found", "pass an existing JSON file or an open_clip name")
        open_clip = import_open_clip()
        cfg = json.loads(path.read_text())
        text_cfg = cfg.get("text_cfg") or {}
        local = {
            key: str((path.parent / text_cfg[key]).resolve())
            for key in ("hf_tokenizer_name", "hf_model_name")
            if text_cfg.get(key) and not Path(text_cfg[key]).is_absolute() and (path.parent / text_cfg[key]).is_dir()
        }
        if local:
            # A tokenizer or text-transformer folder named relative to the config file (offline use):
            # made absolute, so that every process (export child, verification) finds it wherever it runs.
            import tempfile  # noqa: PLC0415

            cfg["text_cfg"].update(local)
            path = Path(tempfile.mkdtemp(prefix="clip-triton-cfg-")) / path.name
            path.write_text(json.dumps(cfg))
        open_clip.add_model_config(path)
        return path.stem
    return model


def register_recorded_config(name: str, model_cfg: dict[str, Any]) -> str:
    """Make an architecture recorded in a manifest known to open_clip (custom configs included)."""
    open_clip = import_open_clip()
    if open_clip.get_model_config(name) is None and model_cfg:
        import tempfile  # noqa: PLC0415

        folder = Path(tempfile.mkdtemp(prefix="clip-triton-cfg-"))
        path = folder / f"{name}.json"
        path.write_text(json.dumps(model_cfg))
        open_clip.add_model_config(path)
    return name


def import_open_clip():
    try:
        import open_clip  # noqa: PLC0415 (heavy, export-only dependency)
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ClipTritonError(
            "open_clip is not installed", "install the export extra: pip install 'clip-triton[export]'"
        ) from exc
    return open_clip
