"""The exported towers run their last transformer block for the pooled token only
(clip_triton/export/graphs.py ``pooled_transformer``): the same embeddings as open_clip, less arithmetic.

In-process (open_clip modules on random weights); the exported graphs of every family are compared with
open_clip by the export's own verification (tests/test_families.py, tests/test_export.py)."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest

from clip_triton.contract import TEXT, TOLERANCES, VISION

from .helpers import ROOT, SEED, TINY_CONFIG

FP32 = TOLERANCES["fp32"]
CONFIGS = ROOT / "tests" / "configs"


def _load(config):
    from clip_triton.export.weights import load_model

    return load_model(str(config), "none", seed=SEED)


def _flops_per_item():
    spec = importlib.util.spec_from_file_location("forward_bench", ROOT / "bench" / "forward.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.flops_per_item


def _close(got: np.ndarray, want: np.ndarray) -> None:
    cosine = float((got * want).sum(-1).min())
    worst = float(np.abs(got - want).max())
    assert cosine >= FP32["min_cosine"] and worst <= FP32["max_abs_diff"], (cosine, worst)


def _texts(contract, lengths, rng):
    """Token rows (start, body, end, padding) whose ends lie at ``lengths``; cut to the longest + 1."""
    tok = contract.tokenizer
    start = 1 if tok.sot_token_id >= 0 else 0
    ids = np.full((len(lengths), contract.context_length), tok.pad_token_id, np.int32)
    for row, end in enumerate(lengths):
        if start:
            ids[row, 0] = tok.sot_token_id
        ids[row, start:end] = rng.integers(300, 1000, end - start)
        ids[row, end] = tok.eot_token_id
    return ids


@pytest.mark.parametrize("config", ["clip-triton-tiny.json", "clip-triton-tiny-bigG-io.json"])
def test_the_pooled_last_block_embeds_as_open_clip(config):
    """Images, and texts whose end-of-text tokens lie at different positions in one batch (each row's
    query must see its own causal mask row), at two cuts: within fp32's tolerance of open_clip's own
    encode_image / encode_text on the whole context."""
    import torch

    from clip_triton.export.graphs import export_module, tower_module

    loaded = _load(CONFIGS / config)
    model, contract = loaded.model, loaded.contract
    rng = np.random.default_rng(3)
    pixels = rng.standard_normal((3, *contract.pixels.shape)).astype(np.float32)
    with torch.no_grad():
        got = export_module(model, contract, VISION.name)(torch.from_numpy(pixels)).numpy()
        want = tower_module(model, VISION.name)(torch.from_numpy(pixels)).numpy()
    _close(got, want)
    ids = _texts(contract, [2, 7, 12, 5], rng)
    module = export_module(model, contract, TEXT.name)
    assert module.inner.pooled
    with torch.no_grad():
        want = tower_module(model, TEXT.name)(torch.from_numpy(ids).long()).numpy()
        for cut in (13, 16, contract.context_length):
            got = module(torch.from_numpy(ids[:, :cut])).numpy()
            _close(got, want)


def test_the_last_block_runs_for_the_pooled_token_only():
    """Counted, not timed: per image and per text the exported module skips the last block's query,
    output projection and MLP for every token but the pooled one (2 d^2 + 2 d m multiply-adds each)."""
    from clip_triton.export.graphs import export_module, tower_module

    flops_per_item = _flops_per_item()
    loaded = _load(TINY_CONFIG)
    model, contract = loaded.model, loaded.contract

    def skipped(transformer, tokens: int) -> int:
        width = transformer.width
        mlp = transformer.resblocks[-1].mlp.c_fc.out_features
        return 2 * (tokens - 1) * (2 * width * width + 2 * width * mlp)

    pixels = np.zeros((2, *contract.pixels.shape), np.float32)
    full = flops_per_item(tower_module(model, VISION.name), pixels)
    pooled = flops_per_item(export_module(model, contract, VISION.name), pixels)
    patches = model.visual.grid_size[0] * model.visual.grid_size[1]
    assert full - pooled >= skipped(model.visual.transformer, patches + 1) > 0

    ids = _texts(contract, [5, 9], np.random.default_rng(0))[:, :16]
    module = export_module(model, contract, TEXT.name)
    pooled = flops_per_item(module, ids)
    module.inner.pooled = False  # the same cut, every token through the last block
    full = flops_per_item(module, ids)
    assert full - pooled >= skipped(model.transformer, 16) > 0


def test_towers_that_do_not_pool_one_token_keep_open_clips_forward(tmp_path):
    """Average pooling (every token's output counts) and timm towers (EVA) run open_clip's own forward,
    and still embed as open_clip does: pooling one token there would be a different model."""
    import torch

    from clip_triton.export.graphs import export_module, poolable_vision, tower_module

    tiny = json.loads(TINY_CONFIG.read_text())
    tiny["vision_cfg"]["pool_type"] = "avg"
    average = tmp_path / "clip-triton-tiny-avg.json"
    average.write_text(json.dumps(tiny))
    for config in (average, CONFIGS / "clip-triton-tiny-eva02.json"):
        loaded = _load(config)
        model, contract = loaded.model, loaded.contract
        assert not poolable_vision(model.visual), config.name
        pixels = torch.from_numpy(np.random.default_rng(1).standard_normal((2, *contract.pixels.shape)))
        with torch.no_grad():
            got = export_module(model, contract, VISION.name)(pixels.float()).numpy()
            want = tower_module(model, VISION.name)(pixels.float()).numpy()
        assert np.array_equal(got, want), config.name
