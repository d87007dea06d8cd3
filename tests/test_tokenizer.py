"""The server's tokenizer equals open_clip's, token for token, on a varied corpus."""

import html
import random

import numpy as np
import pytest

from clip_triton.contract import ModelContract
from clip_triton.tokenizer import ClipTokenizer, TextError, decode_utf8

WORDS = ("cat dog photo of a the an astronaut rocket coffee tree car bicycle bird painting sketch "
         "close-up night city river mountain neural network diagram cake pizza").split()
SCRIPTS = ["café", "naïve", "Straße", "smörgåsbord", "Ελληνικά", "русский", "العربية", "עברית", "हिन्दी", "ภาษาไทย",
           "東京タワー", "北京烤鸭", "한국어", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "ｆｕｌｌｗｉｄｔｈ", "ﬁ ligature", "Ⅻ", "①②③"]
EMOJI = ["🐱", "🐶", "🚀", "☕", "👩‍🚀", "👍🏽", "🇯🇵", "❤️", "🧑‍🤝‍🧑", "✨"]
ENTITIES = ["&amp;", "&lt;b&gt;", "&quot;", "&#39;", "&#x27;", "&nbsp;", "&amp;amp;", "&eacute;", "&copy;", "&#128049;"]
PUNCT = ["'s", "'re", "’s", "...", "!!!", "?!", "--", "(", ")", "[x]", "#tag", "@user", "$99.99", "50%", "3.14", "1,000",
         "e-mail", "C++", "<end_of_text>", "<START_OF_TEXT>", "\t", "\n", "\u00a0", "\u200b", "  "]


def mojibake(text: str) -> str:
    try:
        return text.encode("utf-8").decode("cp1252")
    except UnicodeDecodeError:
        return text.encode("utf-8").decode("latin-1")


def corpus(n: int = 10_500, seed: int = 7) -> list[str]:
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES

    rng = random.Random(seed)
    pools = [WORDS, SCRIPTS, EMOJI, ENTITIES, PUNCT]
    out = [template(name) for name, template in zip(IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES * 20)]
    while len(out) < n:
        kind = rng.random()
        parts = [rng.choice(rng.choice(pools)) for _ in range(rng.randint(1, 25))]
        text = rng.choice([" ", "", " ", "\n"]).join(parts)
        if kind < 0.15:
            text = mojibake(text)
        elif kind < 0.25:
            text = html.escape(text)
        elif kind < 0.30:
            text = " ".join(rng.choice(WORDS + SCRIPTS) for _ in range(rng.randint(80, 600)))  # very long
        elif kind < 0.40:
            text = text.upper() if rng.random() < 0.5 else text.title()
        elif kind < 0.45:
            text = "".join(chr(rng.randint(0x20, 0x2FFF)) for _ in range(rng.randint(1, 60)))  # arbitrary BMP
        if text.strip():
            out.append(text)
    return out


@pytest.fixture(scope="module")
def tokenizers():
    import open_clip

    return open_clip.get_tokenizer("ViT-bigG-14"), ClipTokenizer(ModelContract.default().tokenizer)


def test_corpus_parity_with_open_clip(tokenizers):
    reference, ours = tokenizers
    texts = corpus()
    assert len(texts) >= 10_000
    expected = reference(texts).numpy()
    got = ours(texts)
    assert got.dtype == np.int32 and got.shape == (len(texts), 77)
    mismatched = [texts[i] for i in np.flatnonzero((expected != got).any(axis=1))]
    assert not mismatched, f"{len(mismatched)} texts differ from open_clip, e.g. {mismatched[:3]!r}"
    # The corpus really exercises truncation and unicode.
    assert (got[:, -1] == 49407).sum() > 100
    assert any(ord(ch) > 0x3000 for text in texts for ch in text)


def test_truncation_ends_with_eot(tokenizers):
    reference, ours = tokenizers
    text = "a photo of " * 100
    row = ours([text])[0]
    assert row[0] == 49406 and row[-1] == 49407 and (row != 0).all()
    assert (row == reference([text]).numpy()[0]).all()


@pytest.mark.parametrize("bad", ["", "   ", "\n\t "])
def test_empty_text_is_refused(bad):
    with pytest.raises(TextError, match="empty"):
        ClipTokenizer().ids(bad)


def test_huge_text_is_refused():
    with pytest.raises(TextError, match="over the limit"):
        ClipTokenizer(max_chars=1000).ids("x" * 1001)


def test_invalid_utf8_is_refused():
    assert decode_utf8("ok ✓".encode()) == "ok ✓"
    with pytest.raises(TextError, match="not valid UTF-8"):
        decode_utf8(b"\xff\xfe\x00bad")
