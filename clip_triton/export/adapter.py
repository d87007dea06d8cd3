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
    if "hf_model_name" in text_cfg:
        raise ClipTritonError(
            f"{name} uses a Hugging Face text transformer (hf_model_name), which this exporter does not serve",
            "choose a model whose text tower is open_clip's own (CLIP, SigLIP, MetaCLIP 2, EVA, PE-Core, MobileCLIP)",
        )
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
    if unserved:  # CLIPA's strip_sep_token, NLLB's language, 'clips' mode
        raise ClipTritonError(
            f"{name}'s tokenizer options {unserved} are not served",
            "SigLIP, SigLIP 2 and MetaCLIP 2 tokenizers are; these options are not implemented server-side",
        )
    context = int(text_cfg.get("context_length", 77))
    pool_type = text_cfg.get("pool_type", "argmax")
    exact_cut = pool_type in BUCKETABLE_POOLING and not text_cfg.get("no_causal_mask", False)
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
            vocab_size=int(text_cfg.get("vocab_size", 49408)),
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


def register_model_config(model: str) -> str:
    """Register a custom model-config JSON with open_clip; return the architecture name to use."""
    path = Path(model)
    if path.suffix == ".json":
        if not path.is_file():
            raise ClipTritonError(f"model config {model} not found", "pass an existing JSON file or an open_clip name")
        open_clip = import_open_clip()
        cfg = json.loads(path.read_text())
        tokenizer = (cfg.get("text_cfg") or {}).get("hf_tokenizer_name")
        if tokenizer and not Path(tokenizer).is_absolute() and (path.parent / tokenizer).is_dir():
            # A tokenizer folder named relative to the config file (offline use): made absolute, so that
            # every process (export child, verification) finds it wherever it runs.
            import tempfile  # noqa: PLC0415

            cfg["text_cfg"]["hf_tokenizer_name"] = str((path.parent / tokenizer).resolve())
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
