"""Model families beyond open_clip's own ViT: EVA (timm EVA02: RoPE, SwiGLU), PE-Core (timm PE: RoPE,
attention-pool head, its own context length), MobileCLIP 2 (timm FastViT: convolutional, BatchNorm,
reparameterised at export, bidirectional text), SigLIP 2 (timm SigLIP ViT, a Gemma-like Hugging Face
tokenizer, last-token pooling, sigmoid scoring), MetaCLIP 2 (an XLM-V-like tokenizer, EOS pooling) and
XLM-RoBERTa, mT5 and NLLB (Hugging Face text transformers pooled over their mask: tests/test_hf_towers.py). Tiny
random configs of each (tests/configs) go through
the whole path as ViT-bigG does: export with verification against open_clip PyTorch, fp16 with its
float32 islands, a repository served by the real tritonserver, and answers compared with open_clip's
own transform, tokenizer and model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from clip_triton import contract as C
from clip_triton.contract import TOLERANCES, ModelContract
from clip_triton.errors import ClipTritonError
from clip_triton.export.adapter import contract_from_open_clip

from .helpers import ROOT, SEED, cos, export_for_tests, open_clip_reference_for

CONFIGS = ROOT / "tests" / "configs"
# family: (config, image size, context length, text buckets, BatchNorm layers calibrated, modules fused)
FAMILIES = {
    "eva02": ("clip-triton-tiny-eva02.json", 224, 77, (8, 16, 32), False, False),
    "pe-core": ("clip-triton-tiny-pe-core.json", 384, 32, (8, 16), False, False),
    "mobileclip2": ("clip-triton-tiny-mobileclip2.json", 256, 77, (), True, True),
    # Hugging Face tokenizers (tests/configs/tokenizers: trained locally, of the same kinds as the real ones)
    "siglip2": ("clip-triton-tiny-siglip2.json", 256, 64, (), False, False),
    "metaclip2": ("clip-triton-tiny-metaclip2.json", 32, 77, (8, 16, 32), False, False),
    # a Hugging Face text transformer (XLM-RoBERTa, mean pooling over its mask): bucketed, exact
    "xlmr": ("clip-triton-tiny-xlmr.json", 32, 77, (8, 16, 32), False, False),
    # mT5's encoder (an encoder-decoder's, T5 relative positions), mean pooling, a T5-like tokenizer
    "mt5": ("clip-triton-tiny-mt5.json", 32, 77, (8, 16, 32), False, False),
    # NLLB's encoder (M2M100: sinusoidal positions from the ids), CLS pooling, [language code] text </s>
    "nllb": ("clip-triton-tiny-nllb.json", 32, 77, (8, 16, 32), False, False),
}
PARITY = 0.9999  # served fp32 vs open_clip PyTorch (observed 1.0 to 1e-7, as for the CLIP ViT)


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    """(name, config path, verified fp32 export folder, with OpenVINO IR) of one family."""
    config = CONFIGS / FAMILIES[request.param][0]
    out = export_for_tests(tmp_path_factory, f"family-{request.param}", config=config, openvino_ir=True)
    return request.param, config, out


def test_export_of_each_family_is_verified_against_open_clip(family):
    """The export verified every bucket and batch against open_clip (export_model raises otherwise),
    and the contract carries what differs: image size, context length, buckets (none for a
    bidirectional tower: a cut text would change its embedding)."""
    name, config, out = family
    _, size, context, buckets, _, _ = FAMILIES[name]
    manifest = json.loads((out / "manifest.json").read_text())
    contract = ModelContract.from_dict(manifest["contract"])
    assert manifest["verification"]["passed"]
    assert contract.image_size == (size, size) and contract.context_length == context
    assert contract.tokenizer.buckets == buckets
    labels = {c["inputs"] for c in manifest["verification"]["checks"] if c["tower"] == "text"}
    assert labels == ({f"random@{n}" for n in (*buckets, context)} if buckets else {"random"}) | {
        label for label in labels if label.startswith("prompts")
    } | {"refused"}  # a batch with a refused row: NaN there, every other row exact (issue 25)
    assert all(c["min_cosine"] >= 0.99999 for c in manifest["verification"]["checks"])
    refusals = [c for c in manifest["verification"]["checks"] if c["inputs"] == "refused"]
    assert len(refusals) == 4 and all(c["passed"] and c["max_abs_diff"] == 0.0 for c in refusals)
    # OpenVINO IR converted from the module (--openvino-ir), verified the same way: its example input
    # for a tokenizer without a start token (SigLIP's) once indexed the embedding at -1.
    assert {c["tower"] for c in manifest["verification"]["checks"]} == {"text", "vision", "text ir", "vision ir"}


def test_random_weights_embed_each_image_differently(family):
    """With BatchNorm at its init, MobileCLIP's random tower gave one embedding for every image
    (pairwise cosine 1.0): a check against it could not see a wrong pixel. Its BatchNorm is now
    calibrated on seeded noise; every family's photos embed apart."""
    name, _, out = family
    references = np.load(out / "references.npz")
    (key,) = [k for k in references.files if k.startswith("vision/") and "/photos/" in k and k.endswith("reference")]
    rows = references[key]
    similarity = rows @ rows.T
    assert similarity[~np.eye(len(rows), dtype=bool)].max() < 0.99, similarity


@pytest.mark.integration  # builds each family's model
def test_batchnorm_calibration_and_fusion_only_where_the_tower_has_them():
    from clip_triton.export.graphs import fuse_for_inference
    from clip_triton.export.weights import calibrate_batch_norm, load_model

    for name, (config, *_, calibrated, fused) in FAMILIES.items():
        loaded = load_model(str(CONFIGS / config), "none", seed=SEED)
        assert (calibrate_batch_norm(loaded.model, loaded.contract, SEED) > 0) is calibrated, name
        assert (fuse_for_inference(loaded.model) > 0) is fused, name
    # The CLIP ViT has neither: the bigG path is unchanged.
    loaded = load_model(str(CONFIGS / "clip-triton-tiny.json"), "none", seed=SEED)
    assert calibrate_batch_norm(loaded.model, loaded.contract, SEED) == 0
    assert fuse_for_inference(loaded.model) == 0


@pytest.mark.integration  # exports
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_fp16_export_of_each_family_keeps_its_norms_and_softmax_in_float32(tmp_path, name):
    """timm towers go to fp16 whole (their RoPE tables, position embeddings and pooling latents met
    fp16 activations in float32, and torch.export refused); every norm, whatever its class, computes
    in float32. Verified against open_clip PyTorch fp32 at the fp16 tolerance."""
    import onnx

    from clip_triton.export import export_model
    from clip_triton.export.graphs import float32_islands

    config = CONFIGS / FAMILIES[name][0]
    manifest = export_model(str(config), "none", tmp_path, precision="fp16", seed=SEED, verify_batches=(1, 3))
    assert manifest["verification"]["passed"]
    assert all(c["min_cosine"] >= TOLERANCES["fp16"]["min_cosine"] for c in manifest["verification"]["checks"])
    for tower in ("vision", "text"):
        islands = float32_islands(tmp_path / f"{tower}.onnx")
        assert islands["Softmax"] and set(islands["Softmax"]) == {"FLOAT"}, (tower, islands)
        assert set(islands["LayerNormalization"]) <= {"FLOAT"}, (tower, islands)
    graph = onnx.load(str(tmp_path / "vision.onnx"), load_external_data=False).graph
    assert graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    float32_weights = [i.name for i in graph.initializer if i.data_type == onnx.TensorProto.FLOAT and i.dims]
    float16_weights = [i.name for i in graph.initializer if i.data_type == onnx.TensorProto.FLOAT16]
    assert float16_weights and len(float16_weights) > len(float32_weights)


def test_norms_in_fp32_wraps_every_norm_class():
    import torch
    from timm.layers import LayerNorm2d, RmsNorm

    from clip_triton.export.graphs import norms_in_fp32

    model = torch.nn.Sequential(torch.nn.LayerNorm(8), RmsNorm(8), torch.nn.GroupNorm(2, 8), LayerNorm2d(8)).half()
    assert norms_in_fp32(model) == 4 and norms_in_fp32(model) == 0  # once only
    for module in model:
        assert all(p.dtype == torch.float32 for p in module.parameters())
        assert isinstance(module, torch.nn.Module) and type(module).__name__.endswith("Fp32")
    x = torch.randn(2, 8, dtype=torch.float16)
    assert model[0](x).dtype == torch.float16 and model[1](x).dtype == torch.float16
    expected = torch.nn.functional.layer_norm(x.float(), (8,), model[0].weight, model[0].bias, model[0].eps)
    assert torch.equal(model[0](x), expected.half())


@pytest.fixture(scope="module")
def served(family, tmp_path_factory):
    """The family's repository on the real tritonserver, and open_clip's reference for it."""
    from clip_triton.export.weights import load_model
    from clip_triton.repository import RepoOptions, write_repository
    from clip_triton.server import TritonServer

    name, config, out = family
    repo = write_repository(
        tmp_path_factory.mktemp(f"repo-{name}") / "model_repository",
        onnx_dir=out,
        options=RepoOptions(runtime="python", cpu_runtime="onnxruntime"),
    )
    server = TritonServer(repo, log_file=tmp_path_factory.mktemp(f"log-{name}") / "triton.log").start(timeout=180)
    try:
        reference = open_clip_reference_for(config, load_model(str(config), "none", seed=SEED).model)
        yield name, server, reference
    finally:
        server.stop()


def _embed(grpc, model: str, items: list[bytes]) -> tuple[np.ndarray, list[str]]:
    name = C.IMAGE_INPUT if model == C.IMAGE_ENSEMBLE else C.TEXT_INPUT
    tensor = grpcclient.InferInput(name, [len(items), 1], "BYTES")
    tensor.set_data_from_numpy(np.array(items, dtype=object).reshape(-1, 1))
    result = grpc.infer(model, [tensor])
    return result.as_numpy(C.EMBEDDING_OUTPUT), [s.decode() for s in result.as_numpy(C.STATUS_OUTPUT).reshape(-1)]


def test_each_family_served_matches_open_clip(served, photos):
    """Bytes and strings in at the ensembles, embeddings equal to open_clip's transform + tokenizer +
    model out: the server-side preprocessing at the family's size, the tokenizer at its context (and
    buckets), the graphs."""
    name, server, reference = served
    grpc = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        blobs = list(photos.values())
        images, status = _embed(grpc, C.IMAGE_ENSEMBLE, blobs)
        assert status == [""] * len(blobs)
        expected = reference.images(blobs)
        assert cos(images, expected).min() >= PARITY and np.abs(images - expected).max() < 1e-4, name
        texts = ["a photo of a cat", "a diagram", "Ünïcödé 🐱 日本語", "a long caption " * 40, "x"]
        got, status = _embed(grpc, C.TEXT_ENSEMBLE, [t.encode() for t in texts])
        assert status == [""] * len(texts)
        expected = reference.texts(texts)
        assert cos(got, expected).min() >= PARITY and np.abs(got - expected).max() < 1e-4, name
    finally:
        grpc.close()


def test_each_family_classifies_through_the_client(served, photos):
    """The thin client's classify on each family, scored as the model was trained: softmax over
    logit_scale * cosine for CLIP-style models; for SigLIP, sigmoid(logit_scale * cosine + logit_bias)
    per prompt on its own (they need not sum to 1), and facts.scoring says which."""
    from clip_triton.client import ClipClient

    name, server, reference = served
    prompts = ["a photo of a rocket", "a photo of a cat", "a photo of a coffee cup"]
    client = ClipClient(server.grpc_url)
    try:
        (ranking,) = client.classify([photos["rocket"]], prompts)
        facts = client.facts
    finally:
        client.close()
    image, texts = reference.images([photos["rocket"]]), reference.texts(prompts)
    logits = facts.logit_scale * (image @ texts.T)[0]
    if name == "siglip2":
        assert facts.scoring == "sigmoid" and facts.logit_bias == pytest.approx(-10.0)
        probs = 1 / (1 + np.exp(-(logits + facts.logit_bias)))
    else:
        assert facts.scoring == "softmax" and facts.logit_bias is None
        probs = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    got = {row["prompt"]: row["probability"] for row in ranking}
    assert np.allclose([got[p] for p in prompts], probs, atol=1e-4), (name, ranking, probs)


def test_gateway_scores_siglip_with_a_sigmoid_and_counts_its_tokens(family, request, photos):
    """/v1/classify on a SigLIP model says `scoring: sigmoid` and scores each prompt on its own; usage
    counts tokens with the model's own tokenizer.json, on the server (its TOKENS output): the gateway
    needs no tokenizer files (it once answered 500 without --tokenizer-dir), and gives the same count
    with them."""
    import base64

    import httpx

    from clip_triton.gateway import FetchPolicy, GatewaySettings
    from clip_triton.tokenizer import text_tokenizer

    from .test_gateway import KEY, LiveGateway

    if family[0] not in ("siglip2", "metaclip2", "xlmr", "mt5", "nllb"):
        pytest.skip("Hugging Face tokenizers only")
    name, server, reference = request.getfixturevalue("served")
    url = "data:image/jpeg;base64," + base64.b64encode(photos["rocket"]).decode()
    prompts = ["a photo of a rocket", "a photo of a cat"]
    folder = server.repo / C.TOKENIZER_MODEL / "1"
    for tokenizer_dir in (str(folder), None):
        settings = GatewaySettings(
            triton_url=server.grpc_url, api_keys=(KEY,), tokenizer_dir=tokenizer_dir, fetch=FetchPolicy()
        )
        live = LiveGateway(settings)
        try:
            response = httpx.post(
                f"{live.url}/v1/classify",
                headers={"Authorization": f"Bearer {KEY}"},
                json={"model": live_model(live), "images": [url], "prompts": prompts},
                timeout=60,
            )
        finally:
            live.stop()
        assert response.status_code == 200, (tokenizer_dir, response.text)
        body = response.json()
        image, texts = reference.images([photos["rocket"]]), reference.texts(prompts)
        logits = body["logit_scale"] * (image @ texts.T)[0] + (body["logit_bias"] or 0.0)
        scores = {s["prompt"]: s["probability"] for s in body["data"][0]["scores"]}
        if name == "siglip2":
            assert body["scoring"] == "sigmoid"
            assert np.allclose([scores[p] for p in prompts], 1 / (1 + np.exp(-logits)), atol=1e-4)
        else:
            assert body["scoring"] == "softmax" and sum(scores.values()) == pytest.approx(1.0, abs=1e-5)
        manifest = json.loads((server.repo / "manifest.json").read_text())
        tokenizer = text_tokenizer(ModelContract.from_dict(manifest["contract"]).tokenizer, folder)
        expected = sum(int((tokenizer.ids(p) != tokenizer.spec.pad_token_id).sum()) for p in prompts)
        assert body["usage"]["prompt_tokens"] == expected


def live_model(live) -> str:
    import httpx

    from .test_gateway import KEY

    models = httpx.get(f"{live.url}/v1/models", headers={"Authorization": f"Bearer {KEY}"}, timeout=30).json()
    return models["data"][0]["id"]


@pytest.mark.integration  # starts an export
def test_a_hugging_face_tokenizer_that_cannot_be_had_stops_the_export_early(monkeypatch):
    """SigLIP 2's tokenizer comes from the Hugging Face hub: offline and not cached, the export stops
    before building any weights, with the ways forward."""
    import sys

    from clip_triton.export.weights import load_model

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", "/nonexistent-clip-triton-hf-home")
    # Offline as a process started offline is: huggingface_hub and transformers read HF_HUB_OFFLINE once,
    # when imported (earlier tests import them); otherwise the hub is dialled and retried (46 s in CI).
    if "huggingface_hub.constants" in sys.modules:
        monkeypatch.setattr(sys.modules["huggingface_hub.constants"], "HF_HUB_OFFLINE", True)
    if "transformers.utils.hub" in sys.modules and hasattr(sys.modules["transformers.utils.hub"], "_is_offline_mode"):
        monkeypatch.setattr(sys.modules["transformers.utils.hub"], "_is_offline_mode", True)
    with pytest.raises(
        ClipTritonError, match="could not load the Hugging Face tokenizer 'timm/ViT-B-16-SigLIP2'"
    ) as info:
        load_model("ViT-B-16-SigLIP2", "none")
    assert "hf download timm/ViT-B-16-SigLIP2" in info.value.hint and "local folder" in info.value.hint


def test_tokenizer_options_not_served_are_refused():
    """CLIPA strips the separator token: refused up front."""
    with pytest.raises(ClipTritonError, match="not served|does not serve"):
        contract_from_open_clip("ViT-L-14-CLIPA", None)


@pytest.mark.parametrize(
    "model", ["nllb-clip-base", "nllb-clip-large", "nllb-clip-base-siglip", "nllb-clip-large-siglip"]
)
def test_nllb_clip_contracts(model):
    """NLLB-CLIP (once refused): CLS-pooled NLLB encoder, bucketed; the SigLIP variants score with a sigmoid."""
    contract = contract_from_open_clip(model, None)
    spec = contract.tokenizer
    assert (spec.kind, spec.pool_type, spec.context_length, spec.buckets) == ("hf", "cls_pooler", 77, (8, 16, 32))
    assert spec.hf_name.startswith("facebook/nllb-200-distilled-")
    assert contract.scoring == ("sigmoid" if model.endswith("siglip") else "softmax")


def test_scoring_follows_the_config():
    assert contract_from_open_clip("ViT-B-16-SigLIP2", None).scoring == "sigmoid"
    assert contract_from_open_clip("ViT-bigG-14-worldwide", None).scoring == "softmax"
    assert ModelContract.default().scoring == "softmax"
    spec = contract_from_open_clip("ViT-bigG-14-worldwide", None).tokenizer
    assert (spec.kind, spec.hf_name, spec.pool_type, spec.buckets) == ("hf", "facebook/xlm-v-base", "eos", (8, 16, 32))
    assert not spec.resolved  # its ids come from the tokenizer's files, at export
    siglip = contract_from_open_clip("ViT-B-16-SigLIP2", None).tokenizer
    assert (siglip.clean, siglip.pool_type, siglip.context_length, siglip.buckets) == ("canonicalize", "last", 64, ())


def test_family_configs_are_open_clip_configs():
    """The tiny configs differ from open_clip's shipped ones only in size: same kind of vision tower
    (timm model family and pooling, or open_clip's ViT), same text pooling, mask and tokenizer kind,
    same scoring."""
    import open_clip

    shipped = {
        "eva02": "EVA02-B-16",
        "pe-core": "PE-Core-T-16-384",
        "mobileclip2": "MobileCLIP2-S0",
        "siglip2": "ViT-B-32-SigLIP2-256",
        "metaclip2": "ViT-bigG-14-worldwide",
        "xlmr": "xlm-roberta-base-ViT-B-32",
        "mt5": "mt5-base-ViT-B-32",
        "nllb": "nllb-clip-base",
    }
    for name, (config, *_) in FAMILIES.items():
        ours = json.loads(Path(CONFIGS / config).read_text())
        theirs = open_clip.get_model_config(shipped[name])
        for key in ("custom_text", "init_logit_bias"):
            assert (key in ours) == (key in theirs), (name, key)
        assert ours["vision_cfg"].get("timm_pool") == theirs["vision_cfg"].get("timm_pool"), name
        for key in ("no_causal_mask", "pool_type", "eos_id", "tokenizer_kwargs", "hf_pooler_type"):
            assert ours["text_cfg"].get(key) == theirs["text_cfg"].get(key), (name, key)
        for key in ("hf_tokenizer_name", "hf_model_name"):
            assert (key in ours["text_cfg"]) == (key in theirs["text_cfg"]), (name, key)


def test_each_family_validates_through_the_polygraphy_twin(family):
    """build-engines' validation step on each family's references, the "engine" computed by ONNX
    Runtime from the same graphs (TensorRT needs a GPU: this is the boundary the twin stands in for).
    One optimisation profile per text bucket, or one for a bidirectional tower's static graph."""
    from clip_triton.export.pipeline import read_manifest

    from .gpu_twin import validate_export_through_twin

    name, _, out = family
    contract = ModelContract.from_dict(read_manifest(out)["contract"])
    for tower, (checks, profiles, twin) in validate_export_through_twin(out).items():
        assert checks and all(c["passed"] for c in checks), (name, checks)
        if tower == "text":
            assert len(profiles) == len(contract.tokenizer.lengths), name
            assert {shape[1] for _, shape in twin.profiles_used} == set(contract.tokenizer.lengths), name
