"""The contract: derived from open_clip's own config lookups, readable without weights or torch."""

import json
import subprocess
import sys

import pytest

from clip_triton import contract as C
from clip_triton.errors import ClipTritonError
from clip_triton.export.adapter import contract_from_open_clip


def test_default_snapshot_matches_open_clip_lookups_for_bigG():
    """The shipped ViT-bigG-14 snapshot equals what open_clip's config and pretrained registry say."""
    import open_clip
    from open_clip.transform import PreprocessCfg, merge_preprocess_dict

    snapshot = C.ModelContract.default()
    live = contract_from_open_clip("ViT-bigG-14", "laion2b_s39b_b160k", precision="fp16")
    assert snapshot == live
    assert snapshot.model_cfg == live.model_cfg

    cfg = open_clip.get_model_config("ViT-bigG-14")
    tag = open_clip.get_pretrained_cfg("ViT-bigG-14", "laion2b_s39b_b160k")
    pre = merge_preprocess_dict(PreprocessCfg(), tag)
    assert snapshot.embed_dim == cfg["embed_dim"] == 1280
    assert snapshot.image_size == (cfg["vision_cfg"]["image_size"],) * 2 == (224, 224)
    assert snapshot.context_length == cfg["text_cfg"]["context_length"] == 77
    assert snapshot.tokenizer.vocab_size == cfg["text_cfg"]["vocab_size"]
    assert snapshot.preprocess.mean == tuple(pre["mean"]) and snapshot.preprocess.std == tuple(pre["std"])
    assert snapshot.preprocess.interpolation == pre["interpolation"] == "bicubic"
    assert snapshot.preprocess.resize_mode == pre["resize_mode"] == "shortest"
    tok = open_clip.get_tokenizer("ViT-bigG-14")
    assert (tok.sot_token_id, tok.eot_token_id) == (snapshot.tokenizer.sot_token_id, snapshot.tokenizer.eot_token_id)


def test_tensor_specs_follow_precision():
    c = C.ModelContract.default()
    assert c.pixels == C.TensorSpec("pixel_values", "float16", (3, 224, 224))
    assert c.with_(precision="fp32").pixels.dtype == "float32"
    # int32: ArgMax on int64 is unsupported; -1: the text graph takes any of the buckets 8/16/32/77.
    assert c.input_ids == C.TensorSpec("input_ids", "int32", (-1,))
    assert c.with_(tokenizer=C.TokenizerSpec()).input_ids == C.TensorSpec("input_ids", "int32", (77,))
    assert c.image_embeds.shape == c.text_embeds.shape == (1280,)
    assert c.image_embeds.dtype == c.text_embeds.dtype == "float32"
    assert c.pixels.config_type == "TYPE_FP16" and c.input_ids.wire_type == "INT32"


def test_round_trip_through_json():
    c = contract_from_open_clip("ViT-B-32", "laion2b_s34b_b79k", precision="fp32")
    assert C.ModelContract.from_json(c.to_json()) == c


@pytest.mark.integration  # a fresh interpreter, to see what it imports
def test_readable_without_torch():
    """Serving and clients load the default contract in a process where torch cannot be imported."""
    code = (
        "import sys; sys.modules['torch'] = None; sys.modules['open_clip'] = None\n"
        "from clip_triton.contract import ModelContract\n"
        "import clip_triton.preprocess, clip_triton.tokenizer, clip_triton.repository, clip_triton.client\n"
        "print(ModelContract.default().embed_dim)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "1280"


def test_any_open_clip_vit_through_the_same_code(tiny_config):
    c = contract_from_open_clip("ViT-L-14", "openai")
    assert (c.embed_dim, c.image_size) == (768, (224, 224))
    custom = contract_from_open_clip(str(tiny_config), "none")
    assert custom.model == "clip-triton-tiny" and custom.embed_dim == 32 and custom.image_size == (32, 32)
    assert custom.pretrained == "none"


@pytest.mark.parametrize(
    "model, pretrained, fragment",
    [
        ("ViT-Nope-99", "none", "unknown open_clip architecture"),
        ("ViT-bigG-14", "laion_does_not_exist", "unknown pretrained tag"),
        ("RN50", "openai", "ResNet"),
        ("missing-config.json", "none", "not found"),
    ],
)
def test_errors_say_what_to_do(model, pretrained, fragment):
    with pytest.raises(ClipTritonError) as err:
        contract_from_open_clip(model, pretrained)
    assert fragment in str(err.value)
    assert err.value.hint


def test_batch_profile():
    profile = C.BatchProfile(1, 16, 64)
    assert profile.preferred == (16, 32, 64)
    assert C.BatchProfile(1, 8, 24).preferred == (8, 16, 24)
    with pytest.raises(ValueError):
        C.BatchProfile(1, 128, 64)


def test_snapshot_round_trips_through_the_contract():
    """The shipped snapshot is exactly what ModelContract writes for what it reads (no field lost,
    added or reordered), so the default contract a server uses is the one the snapshot test checked."""
    from importlib import resources

    text = resources.files("clip_triton").joinpath("assets", C.DEFAULT_SNAPSHOT).read_text()
    contract = C.ModelContract.default()
    assert json.loads(contract.to_json()) == json.loads(text)
    assert C.ModelContract.from_json(contract.to_json()) == contract


def test_each_tower_is_declared_once_and_found_by_either_name():
    contract = C.ModelContract.default()
    for tower in C.TOWERS:
        assert C.tower(tower.name) is C.tower(tower.model) is tower
        encoder = contract.encoder(tower.name)
        assert (encoder.input, encoder.output) == contract.encoder_io(tower.model)
        assert encoder.tolerance == C.TOLERANCES[contract.precision]
    assert contract.encoder("vision").client_input.name == C.IMAGE_INPUT
    with pytest.raises(ValueError, match="no tower"):
        C.tower("audio")


def test_text_buckets_are_data_of_the_contract():
    spec = C.TokenizerSpec(buckets=(32, 8, 16, 77))  # sorted, the context length itself implied
    assert spec.buckets == (8, 16, 32) and spec.lengths == (8, 16, 32, 77) and spec.dynamic
    assert [spec.bucket(n) for n in (2, 8, 9, 16, 17, 33, 77, 90)] == [8, 8, 16, 16, 32, 77, 77, 77]
    assert C.TokenizerSpec().lengths == (77,) and not C.TokenizerSpec().dynamic
    for bad in ((1,), (0, 8), (100,)):
        with pytest.raises(ClipTritonError, match="text buckets"):
            C.TokenizerSpec(buckets=bad)
    # A manifest from before buckets reads back as a static graph (its text graph takes 77 tokens).
    old = C.ModelContract.default().to_dict()
    del old["tokenizer"]["buckets"]
    assert C.ModelContract.from_dict(old).input_ids.shape == (77,)
    live = contract_from_open_clip("ViT-B-32", "none")
    assert live.tokenizer.buckets == C.TEXT_BUCKETS
    assert contract_from_open_clip("ViT-B-32", "none", text_buckets=()).tokenizer.lengths == (77,)
    assert contract_from_open_clip("ViT-B-32", "none", text_buckets=(24,)).tokenizer.lengths == (24, 77)


def test_text_buckets_are_refused_where_a_cut_is_not_exact(tmp_path):
    """Without a causal mask (or with last-token pooling) the padding changes the embedding."""
    from .helpers import TINY_CONFIG

    cfg = json.loads(TINY_CONFIG.read_text())
    cfg["text_cfg"]["no_causal_mask"] = True
    path = tmp_path / "tiny-bidirectional.json"
    path.write_text(json.dumps(cfg))
    assert contract_from_open_clip(str(path), "none").tokenizer.lengths == (77,)  # default: static
    with pytest.raises(ClipTritonError, match="would not give the embedding"):
        contract_from_open_clip(str(path), "none", text_buckets=(16,))
