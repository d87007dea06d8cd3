"""open_clip's Hugging Face text towers (HFTextEncoder: XLM-RoBERTa, as in xlm-roberta-base-ViT-B-32
and xlm-roberta-large-ViT-H-14, mT5's encoder, as in mt5-base-ViT-B-32, and NLLB's encoder, as in
nllb-clip-base and nllb-clip-large, with a language code per text), issue 31.

The tower is bidirectional; open_clip masks its padding itself (``attn_mask = ids != pad`` inside
``forward``), so the exported graph computes the mask from the ids it is given and needs no input of its
own. Whether a text cut after its last real token embeds exactly as the whole padded context is measured
here for every pooler the exporter serves; a tiny XLM-R-style model (tests/configs/hf/xlmr-tiny, the
XLM-V-like tokenizer of tests/configs/tokenizers: SentencePiece Unigram, <s> text </s>) then goes
through the family tests (tests/test_families.py: export verified per bucket at fp32 and fp16, OpenVINO
IR, the real tritonserver, the client, the gateway).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from clip_triton.contract import MASKED_POOLING
from clip_triton.errors import ClipTritonError

from .helpers import ROOT, SEED

CONFIG = ROOT / "tests" / "configs" / "clip-triton-tiny-xlmr.json"
MT5 = ROOT / "tests" / "configs" / "clip-triton-tiny-mt5.json"
NLLB = ROOT / "tests" / "configs" / "clip-triton-tiny-nllb.json"
TEXTS = ["a photo of a cat", "x", "Ünïcödé 🐱 日本語 and Ελληνικά", "a long caption of a horse in the city " * 2]


def _variant(tmp_path, pooler: str, config=CONFIG):
    cfg = json.loads(config.read_text())
    cfg["text_cfg"]["hf_pooler_type"] = pooler
    for key in ("hf_model_name", "hf_tokenizer_name"):
        cfg["text_cfg"][key] = str((config.parent / cfg["text_cfg"][key]).resolve())
    path = tmp_path / f"{config.stem}-{pooler.replace('_', '-')}.json"
    path.write_text(json.dumps(cfg))
    return path


@pytest.mark.integration  # builds open_clip models
@pytest.mark.parametrize(
    "pooler, config",
    [*((pooler, CONFIG) for pooler in MASKED_POOLING), ("mean_pooler", MT5), ("cls_pooler", NLLB)],
    ids=str,
)
def test_a_cut_after_the_last_real_token_is_exact_for_each_served_pooler(tmp_path, pooler, config):
    """For each pooler: open_clip's own encode_text of the ids cut to every bucket that holds the
    longest text equals encode_text of the whole padded context (to float rounding); a cut inside the
    real tokens does not (so the check can fail)."""
    import open_clip
    import torch

    from clip_triton.export.weights import load_model

    loaded = load_model(str(_variant(tmp_path, pooler, config)), "none", seed=SEED)
    spec = loaded.contract.tokenizer
    assert spec.pool_type == pooler and spec.buckets == (8, 16, 32) and spec.kind == "hf"
    tokenizer = open_clip.get_tokenizer(loaded.contract.model)
    with torch.no_grad():
        for texts in (TEXTS[:2], TEXTS):
            ids = tokenizer(texts)
            needed = int((ids != spec.pad_token_id).sum(1).max())
            whole = loaded.model.encode_text(ids, normalize=True)
            for length in [n for n in spec.lengths if n >= needed]:
                cut = loaded.model.encode_text(ids[:, :length], normalize=True)
                assert float((whole - cut).abs().max()) <= 1e-6, (pooler, length)
            if needed > 4:
                inside = loaded.model.encode_text(ids[:, : needed - 2], normalize=True)
                assert float((whole - inside).abs().max()) > 1e-4, pooler  # a real token cut off: not exact


@pytest.mark.integration  # reads the HF config through transformers
def test_an_unserved_pooler_is_refused_by_name(tmp_path):
    from clip_triton.export.adapter import contract_from_open_clip

    with pytest.raises(ClipTritonError, match="pools with 'max_pooler', which is not served") as info:
        contract_from_open_clip(str(_variant(tmp_path, "max_pooler")), "none")
    assert "mean_pooler" in info.value.hint


@pytest.mark.integration  # reads the HF config through transformers
def test_the_contract_of_an_hf_tower(tmp_path):
    from clip_triton.export.adapter import contract_from_open_clip

    contract = contract_from_open_clip(str(CONFIG), "none")
    spec = contract.tokenizer
    assert (spec.kind, spec.pool_type, spec.context_length, spec.buckets) == ("hf", "mean_pooler", 77, (8, 16, 32))
    assert spec.vocab_size == -1  # the transformer's, read with the model at export (no hub call here)
    assert contract.input_ids.shape == (-1,) and contract.input_ids.dtype == "int32"  # one input: the ids


@pytest.mark.integration  # exports
def test_the_served_xlmr_tower_is_exact_and_counts_its_tokens(tmp_path_factory, photos):
    """export -> repo -> the real tritonserver -> ClipClient: every text, short or long, embeds as
    open_clip's encode_text does; the tokens the server counts are the tokenizer's own."""
    from clip_triton.client import AsyncClipClient, ClipClient
    from clip_triton.export.weights import load_model
    from clip_triton.repository import RepoOptions, write_repository
    from clip_triton.server import TritonServer
    from clip_triton.tokenizer import text_tokenizer

    from .helpers import cos, export_for_tests, open_clip_reference_for

    out = export_for_tests(tmp_path_factory, "family-xlmr", config=CONFIG, openvino_ir=True)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["verification"]["passed"]
    assert manifest["contract"]["tokenizer"]["vocab_size"] == 512  # from tests/configs/hf/xlmr-tiny
    repo = write_repository(
        tmp_path_factory.mktemp("xlmr") / "repo",
        onnx_dir=out,
        options=RepoOptions(runtime="python", cpu_runtime="onnxruntime"),
    )
    reference = open_clip_reference_for(CONFIG, load_model(str(CONFIG), "none", seed=SEED).model)
    with TritonServer(repo, log_file=tmp_path_factory.mktemp("xlmr-log") / "triton.log") as server:
        with ClipClient(server.grpc_url) as client:
            got = client.embed_texts(TEXTS)
            images = client.embed_images(list(photos.values()))
        expected = reference.texts(TEXTS)
        assert cos(got, expected).min() >= 0.99999 and np.abs(got - expected).max() < 1e-4
        assert cos(images, reference.images(list(photos.values()))).min() >= 0.99999

        import asyncio

        async def counted():
            async with AsyncClipClient(server.grpc_url) as client:
                return await client.embed_texts_counted(TEXTS)

        _, counts = asyncio.run(counted())
    from clip_triton.contract import ModelContract

    tokenizer = text_tokenizer(ModelContract.from_dict(manifest["contract"]).tokenizer, out / "tokenizer")
    assert counts is not None
    assert counts.tolist() == [int((tokenizer.ids(t) != tokenizer.spec.pad_token_id).sum()) for t in TEXTS]


@pytest.mark.integration  # exports
def test_the_served_nllb_tower_reads_each_texts_language(tmp_path_factory):
    """NLLB: a text names its language with a ``>>code<<`` prefix (raw tritonclient), the clients'
    ``language=`` or the gateway's ``language`` field; each embeds as open_clip's model does with NLLB's
    tokenizer set to that language, one batch may mix languages, the default is open_clip's own
    (eng_Latn), and an unknown code refuses that text alone with the list of codes."""
    import asyncio

    import httpx
    import tritonclient.grpc as grpcclient

    from clip_triton import contract as C
    from clip_triton.client import AsyncClipClient, ClipClient
    from clip_triton.export.weights import load_model
    from clip_triton.gateway import FetchPolicy, GatewaySettings
    from clip_triton.repository import RepoOptions, write_repository
    from clip_triton.server import TritonServer

    from .helpers import cos, export_for_tests, open_clip_reference_for
    from .test_gateway import KEY, LiveGateway

    out = export_for_tests(tmp_path_factory, "family-nllb", config=NLLB, openvino_ir=True)
    repo = write_repository(
        tmp_path_factory.mktemp("nllb") / "repo",
        onnx_dir=out,
        options=RepoOptions(runtime="python", cpu_runtime="onnxruntime"),
    )
    reference = open_clip_reference_for(NLLB, load_model(str(NLLB), "none", seed=SEED).model)
    texts = ["un chat sur le canapé", "a photo of a cat", "Ünïcödé 🐱 日本語", "x"]
    french, default = reference.texts(texts, language="fra_Latn"), reference.texts(texts)
    assert cos(french, default).max() < 0.9999  # the code matters: the check below can fail

    def close(got, expected):
        return cos(got, expected).min() >= 0.99999 and np.abs(got - expected).max() < 1e-4

    with TritonServer(repo, log_file=tmp_path_factory.mktemp("nllb-log") / "triton.log") as server:
        with ClipClient(server.grpc_url) as client:
            assert len(client.facts.languages) == 202
            assert close(client.embed_texts(texts, language="fra_Latn"), french)
            assert close(client.embed_texts(texts), default)
            with pytest.raises(ValueError, match="unknown language 'fr'.*knows 202"):
                client.embed_texts(texts, language="fr")

        async def asynchronous():
            async with AsyncClipClient(server.grpc_url) as client:
                return await client.embed_texts_counted(texts, language="fra_Latn")

        got, counts = asyncio.run(asynchronous())
        assert close(got, french) and counts is not None and counts.min() >= 3

        # raw tritonclient: languages mixed in one request, a bad code refused for its item alone
        grpc = grpcclient.InferenceServerClient(server.grpc_url)
        try:
            items = [">>fra_Latn<< " + texts[0], ">>deu_Latn<< " + texts[1], ">>fr<< " + texts[2], texts[3]]
            tensor = grpcclient.InferInput(C.TEXT_INPUT, [len(items), 1], "BYTES")
            tensor.set_data_from_numpy(np.array([t.encode() for t in items], dtype=object).reshape(-1, 1))
            result = grpc.infer(C.TEXT_ENSEMBLE, [tensor])
            rows = result.as_numpy(C.EMBEDDING_OUTPUT)
            status = [s.decode() for s in result.as_numpy(C.STATUS_OUTPUT).reshape(-1)]
        finally:
            grpc.close()
        assert status[0] == status[1] == status[3] == "" and "unknown language code 'fr'" in status[2]
        assert "zul_Latn" in status[2]
        assert close(rows[:1], french[:1]) and close(rows[1:2], reference.texts(texts[1:2], language="deu_Latn"))
        assert close(rows[3:], default[3:])

        live = LiveGateway(GatewaySettings(triton_url=server.grpc_url, api_keys=(KEY,), fetch=FetchPolicy()))
        try:
            headers = {"Authorization": f"Bearer {KEY}"}
            model = httpx.get(f"{live.url}/v1/models", headers=headers, timeout=30).json()["data"][0]["id"]
            answer = httpx.post(
                f"{live.url}/v1/embeddings",
                headers=headers,
                json={"model": model, "input": texts, "language": "fra_Latn"},
                timeout=60,
            )
            refused = httpx.post(
                f"{live.url}/v1/embeddings",
                headers=headers,
                json={"model": model, "input": texts, "language": "french"},
                timeout=60,
            )
        finally:
            live.stop()
        assert answer.status_code == 200, answer.text
        got = np.array([row["embedding"] for row in answer.json()["data"]], dtype=np.float32)
        assert close(got, french)
        assert answer.json()["usage"]["prompt_tokens"] == int(counts.sum())
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "language"
        assert "unknown language 'french'" in refused.json()["error"]["message"]
