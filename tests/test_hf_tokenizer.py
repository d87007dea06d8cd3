"""The server's Hugging Face tokenizer (torch-free: open_clip's cleaning + the `tokenizers` library on
the saved tokenizer.json) equals open_clip's HFTokenizer (transformers), token for token, for each
tokenizer kind: SentencePiece-style BPE with byte fallback and an appended EOS (SigLIP 2's Gemma,
SigLIP's T5), SentencePiece Unigram wrapped in <s> ... </s> with pad id 1 (MetaCLIP 2's XLM-V,
XLM-RoBERTa's) and SentencePiece Unigram with </s> appended and pad id 0 (mT5's).

The real files live on the Hugging Face hub, which this machine cannot reach: the tokenizers here
(tests/configs/tokenizers, `make.py`) are trained locally, of the same kinds, and loaded by both sides
exactly as an export loads the real ones."""

from __future__ import annotations

import numpy as np
import pytest

from clip_triton.contract import with_language
from clip_triton.tokenizer import HFTextTokenizer, TextError, cut_to_bucket, text_tokenizer

from .helpers import ROOT
from .test_tokenizer import corpus

CONFIGS = ROOT / "tests" / "configs"
KINDS = {
    "gemma-like": "clip-triton-tiny-siglip2.json",
    "xlmv-like": "clip-triton-tiny-metaclip2.json",  # XLM-RoBERTa's kind too (clip-triton-tiny-xlmr.json)
    "t5-like": "clip-triton-tiny-mt5.json",  # mT5's: Unigram, no start token, </s> appended, pad 0
    "nllb-like": "clip-triton-tiny-nllb.json",  # NLLB's: [language code] text </s>, pad 1
}
# One language per script of the corpus (tests/test_tokenizer.py corpus), and a few more.
LANGUAGES = (
    "fra_Latn", "deu_Latn", "rus_Cyrl", "ell_Grek", "arb_Arab", "heb_Hebr", "hin_Deva", "tha_Thai",
    "zho_Hans", "zho_Hant", "kor_Hang", "jpn_Jpan", "amh_Ethi", "eng_Latn",
)  # fmt: skip


def _build(kind: str, tmp_path_factory):
    """(open_clip's tokenizer, ours, contract) for one kind: ours runs the tokenizer.json that open_clip's
    tokenizer saves, as an export does."""
    import open_clip

    from clip_triton.export.adapter import contract_from_open_clip, register_model_config
    from clip_triton.export.weights import resolve_hf_tokenizer
    from clip_triton.progress import Progress

    name = register_model_config(str(CONFIGS / KINDS[kind]))
    contract, reference = resolve_hf_tokenizer(contract_from_open_clip(name, None), None, Progress("t", enabled=False))
    folder = tmp_path_factory.mktemp(kind)
    reference.save_pretrained(folder)
    assert reference is not None and isinstance(open_clip.get_tokenizer(name), type(reference))
    return reference, text_tokenizer(contract.tokenizer, folder), contract


@pytest.fixture(scope="module", params=sorted(KINDS))
def pair(request, tmp_path_factory):
    return _build(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def nllb(tmp_path_factory):
    return _build("nllb-like", tmp_path_factory)


def test_corpus_parity_with_open_clip(pair):
    reference, ours, contract = pair
    texts = corpus(3000, seed=11)
    expected = reference(texts).numpy()
    got = ours(texts)
    spec = contract.tokenizer
    assert (
        isinstance(ours, HFTextTokenizer) and got.dtype == np.int32 and got.shape == (len(texts), spec.context_length)
    )
    mismatched = [texts[i] for i in np.flatnonzero((expected != got).any(axis=1))]
    assert not mismatched, f"{len(mismatched)} texts differ from open_clip, e.g. {mismatched[:3]!r}"
    # The corpus exercises truncation (the end token kept in the last place) and padding with the pad id.
    assert (got[:, -1] == spec.eot_token_id).sum() > 50
    assert (got == spec.pad_token_id).any(axis=1).sum() > 1000


def test_special_ids_are_read_from_the_tokenizer(pair):
    _, ours, contract = pair
    spec = contract.tokenizer
    if spec.hf_name.endswith(("gemma-like", "t5-like")):  # Gemma/T5: no start token, EOS appended, pad 0
        assert (spec.sot_token_id, spec.eot_token_id, spec.pad_token_id) == (-1, 1, 0)
    elif spec.hf_name.endswith("nllb-like"):  # NLLB: the language code first (no fixed start token), pad 1
        assert (spec.sot_token_id, spec.eot_token_id, spec.pad_token_id) == (-1, 2, 1)
        assert len(spec.languages) == 202 and spec.default_language == "eng_Latn"
    else:  # XLM-V, XLM-R: <s> text </s>, pad 1
        assert (spec.sot_token_id, spec.eot_token_id, spec.pad_token_id) == (0, 2, 1)
    row = ours.ids("a photo of a cat")
    if spec.sot_token_id >= 0:
        assert row[0] == spec.sot_token_id
    elif spec.languages:  # the default language's code
        assert row[0] == ours.language_ids[spec.default_language]
    else:  # no start token: the text's first word (never a special id, so never the refusal mark)
        assert row[0] not in (spec.pad_token_id, spec.eot_token_id)
    assert spec.eot_token_id in row and row[-1] == spec.pad_token_id


def test_bad_text_is_refused_per_item(pair):
    _, ours, _ = pair
    with pytest.raises(TextError, match="empty text"):
        ours.ids("   ")
    with pytest.raises(TextError, match="over the limit"):
        ours.ids("x" * (ours.max_chars + 1))


def test_eos_pooled_texts_cut_to_buckets_after_their_end_token(pair):
    """MetaCLIP 2's tower is causal and pools at EOS: a request is cut after its longest text's EOS
    (pad id 1 is not mistaken for it); SigLIP's bidirectional tower is never cut."""
    _, ours, contract = pair
    spec = contract.tokenizer
    rows = ours(["a cat", "a photo of a dog"])
    cut = cut_to_bucket(rows, spec)
    if spec.dynamic:
        assert cut.shape[1] == spec.bucket(int(np.flatnonzero(rows[1] == spec.eot_token_id)[-1]) + 1)
        assert (cut == spec.eot_token_id).sum() == 2
    else:
        assert cut.shape == rows.shape


def test_text_tokenizer_without_its_file_says_where_it_belongs(pair, tmp_path):
    _, _, contract = pair
    with pytest.raises(FileNotFoundError, match="tokenizer.json not found"):
        text_tokenizer(contract.tokenizer, tmp_path)


def test_each_language_code_is_tokenized_as_nllb_does(nllb):
    """A text names its language with a ``>>code<<`` prefix; the row equals transformers' NLLB tokenizer
    with that ``src_lang`` (``[code] text </s>``, truncated with both kept), on the whole corpus for one
    language per script and on a few texts for every one of the 202 codes."""
    reference, ours, contract = nllb
    hf = reference.tokenizer
    texts = corpus(600, seed=5)
    codes = {code: texts for code in LANGUAGES} | {
        code: texts[:5] for code in contract.tokenizer.languages if code not in LANGUAGES
    }
    assert len(codes) == 202
    try:
        for code, batch in codes.items():
            hf.src_lang = code
            expected = reference(batch).numpy()
            got = ours([with_language(text, code) for text in batch])
            assert (got[:, 0] == hf.convert_tokens_to_ids(code)).all(), code
            mismatched = [batch[i] for i in np.flatnonzero((expected != got).any(axis=1))]
            assert not mismatched, f"{code}: {len(mismatched)} texts differ, e.g. {mismatched[:2]!r}"
    finally:
        hf.src_lang = contract.tokenizer.default_language
    # No prefix: the default language, as open_clip tokenizes every text.
    assert (ours(texts) == reference(texts).numpy()).all()


def test_open_clip_loses_the_language_it_is_given(nllb):
    """open_clip's ``HFTokenizer.set_language`` sets the NLLB tokenizer's special tokens, but the
    tokenizer's own ``__call__`` switches back to ``src_lang`` first (transformers'
    ``_switch_to_input_mode``): every text is tokenized as English whatever language is set. The server
    does what set_language means to do (the test above). If open_clip fixes it, this fails: revisit."""
    reference, ours, _ = nllb
    texts = ["un chat", "eine Katze auf dem Sofa"]
    english = reference(texts).numpy()
    reference.set_language("fra_Latn")
    try:
        assert (reference(texts).numpy() == english).all()
    finally:
        reference.set_language("eng_Latn")
    assert (ours([with_language(t, "fra_Latn") for t in texts])[:, 1:] == english[:, 1:]).all()
    assert (ours([with_language(t, "fra_Latn") for t in texts])[:, 0] != english[:, 0]).all()


def test_unknown_language_codes_are_refused_with_the_list(nllb):
    _, ours, contract = nllb
    for text in (">>fr<< un chat", ">>fra_latn<< un chat", ">><< un chat", ">>xx_Yyyy<<"):
        with pytest.raises(TextError, match="unknown language code") as info:
            ours.ids(text)
        assert "eng_Latn" in str(info.value) and "zul_Latn" in str(info.value) and "202" in str(info.value)
    with pytest.raises(TextError, match="empty text"):  # a code and no text
        ours.ids(">>fra_Latn<<   ")
    # spacing after the prefix does not matter; a prefix later in the text is text
    assert (ours.ids(">>fra_Latn<<un chat") == ours.ids(">>fra_Latn<<   un chat")).all()
    assert ours.ids("un >>fra_Latn<< chat")[0] == ours.language_ids[contract.tokenizer.default_language]


def test_a_prefix_is_plain_text_for_a_model_without_languages(pair):
    """Only a tokenizer with languages (NLLB's) reads the mark; for every other it is text, as open_clip
    tokenizes it."""
    reference, ours, contract = pair
    text = ">>fra_Latn<< un chat"
    if contract.tokenizer.languages:
        assert ours.ids(text)[0] == ours.language_ids["fra_Latn"]
        assert (ours.ids(text)[1:] == reference(["un chat"]).numpy()[0, 1:]).all()
    else:
        assert (ours([text]) == reference([text]).numpy()).all()
