"""The server's tokenizer equals open_clip's, token for token, on a varied corpus."""

import html
import random
from dataclasses import replace

import numpy as np
import pytest

from clip_triton import contract as C
from clip_triton.contract import ModelContract
from clip_triton.tokenizer import ClipTokenizer, TextError, decode_utf8

WORDS = [
    "cat",
    "dog",
    "photo",
    "of",
    "a",
    "the",
    "an",
    "astronaut",
    "rocket",
    "coffee",
    "tree",
    "car",
    "bicycle",
    "bird",
    "painting",
    "sketch",
    "close-up",
    "night",
    "city",
    "river",
    "mountain",
    "neural",
    "network",
    "diagram",
    "cake",
    "pizza",
]
SCRIPTS = [
    "café",
    "naïve",
    "Straße",
    "smörgåsbord",
    "Ελληνικά",
    "русский",
    "العربية",
    "עברית",
    "हिन्दी",
    "ภาษาไทย",
    "東京タワー",
    "北京烤鸭",
    "한국어",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "ｆｕｌｌｗｉｄｔｈ",
    "ﬁ ligature",
    "Ⅻ",
    "①②③",
]
EMOJI = ["🐱", "🐶", "🚀", "☕", "👩‍🚀", "👍🏽", "🇯🇵", "❤️", "🧑‍🤝‍🧑", "✨"]
ENTITIES = ["&amp;", "&lt;b&gt;", "&quot;", "&#39;", "&#x27;", "&nbsp;", "&amp;amp;", "&eacute;", "&copy;", "&#128049;"]
PUNCT = [
    "'s",
    "'re",
    "’s",
    "...",
    "!!!",
    "?!",
    "--",
    "(",
    ")",
    "[x]",
    "#tag",
    "@user",
    "$99.99",
    "50%",
    "3.14",
    "1,000",
    "e-mail",
    "C++",
    "<end_of_text>",
    "<START_OF_TEXT>",
    "\t",
    "\n",
    "\u00a0",
    "\u200b",
    "  ",
]


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


def long_words(seed: int = 11) -> list[str]:
    """Single words far longer than a context, from text-like and adversarial alphabets."""
    rng = random.Random(seed)
    letters = "etaoinshrdlucmfwypvbgkjqxz"
    samples = []
    for length in (80, 300, 777, 1500, 2500, 4000):
        samples.append("".join(rng.choice(letters[:8]) for _ in range(length)))  # frequent letters: many merges
        samples.append("".join(rng.choice(WORDS)[:-1] for _ in range(length // 4))[:length])  # glued words
        samples.append("a" * length)  # one repeated symbol: overlapping pairs everywhere
        samples.append("ab" * (length // 2))
        samples.append("".join(rng.choice("東京タワー北京烤鸭한국어") for _ in range(length // 3)))  # multi-byte
    samples.append("prefix " + "supercalifragilistic" * 150 + " suffix")
    samples.append(" ".join(rng.choice(WORDS) for _ in range(3000)))  # many words: the rest is never merged
    return samples


def test_truncating_texts_match_open_clip_exactly(tokenizers):
    """Encoding stops once the context is full and merges only a prefix of a long word; what is kept
    is token for token open_clip's, which merges everything."""
    reference, ours = tokenizers
    texts = long_words()
    expected = reference(texts).numpy()
    got = ours(texts)
    mismatched = [i for i in range(len(texts)) if not np.array_equal(expected[i], got[i])]
    assert not mismatched, [texts[i][:40] for i in mismatched]


def test_the_merge_order_is_open_clips_on_whole_words(tokenizers):
    """The heap-based merge equals open_clip's quadratic loop on every word of the corpus and on long ones."""
    reference, ours = tokenizers
    for word in [w for text in corpus(2000, seed=3) for w in text.split()] + long_words(5)[:12]:
        assert ours.encode(word) == reference.encode(word), word[:40]


def test_a_huge_word_costs_little():
    """One 65,535-character word took ~90 s (BPE over the whole word, quadratic); only what is kept
    is merged now. The bound here is generous: it guards against the quadratic path, not a machine."""
    import time

    tokenizer = ClipTokenizer(ModelContract.default().tokenizer)
    for word in ("x" * 65_535, "".join(random.Random(1).choice("etaoinsh") for _ in range(65_535))):
        started = time.process_time()
        row = tokenizer.ids(word)
        assert time.process_time() - started < 10
        assert row[0] == tokenizer.sot and row[-1] == tokenizer.eot and (row != 0).all()


def test_the_heap_merge_equals_the_loop_on_short_words_too(tokenizers, monkeypatch):
    """Short words take open_clip's loop (faster there); the heap, which long words take, must give the
    same merges on every word: forced through the heap here."""
    import clip_triton.tokenizer as T

    reference, _ = tokenizers
    monkeypatch.setattr(T, "_SHORT_WORD", 0)
    heap_only = ClipTokenizer(ModelContract.default().tokenizer)
    for word in [w for text in corpus(2000, seed=4) for w in text.split()]:
        assert heap_only.encode(word) == reference.encode(word), word


def test_rows_are_cut_to_the_shortest_bucket_that_holds_every_eot():
    from clip_triton.contract import TokenizerSpec
    from clip_triton.tokenizer import ClipTokenizer, cut_to_bucket, needed_length

    spec = TokenizerSpec(buckets=(8, 16, 32))
    tok = ClipTokenizer(spec)
    short, seven = tok(["cat"]), tok(["one two three four five"])  # 3 and 7 tokens with SOT/EOT
    assert needed_length(short, spec.eot_token_id) == 3 and needed_length(seven, spec.eot_token_id) == 7
    assert cut_to_bucket(short, spec).shape == (1, 8)
    assert cut_to_bucket(tok(["word " * 7]), spec).shape == (1, 16)  # 9 tokens
    both = tok(["cat", "word " * 20])  # 22 tokens: the longest row decides
    assert cut_to_bucket(both, spec).shape == (2, 32)
    assert (cut_to_bucket(both, spec) == both[:, :32]).all()
    assert cut_to_bucket(tok(["word " * 80]), spec).shape == (1, 77)  # truncated: EOT at 76
    # An <end_of_text> inside the text: the cut keeps up to the last EOT (the pooled one is the first).
    inner = tok(["<end_of_text> " + "word " * 10])
    assert cut_to_bucket(inner, spec).shape == (1, 16)
    # A row without any EOT (hand-made ids) needs its whole length; a static spec never cuts.
    assert needed_length(np.full((1, 77), 5, np.int32), spec.eot_token_id) == 77
    assert cut_to_bucket(short, TokenizerSpec()).shape == (1, 77)


# Issue 27, row 5: only a prefix of whole lines is cleaned and encoded.
MULTILINE = [
    "\x80\n" * 32_767,  # the row's text: 0.9 s each (ftfy ~27 us per line), 13 s for 15 in one request
    "a photo &amp; a <b>cat</b>\n" * 2_000,  # `<` turns ftfy's HTML unescaping off from its line on
    "&amp;amp;\n" * 40 + "<p>x</p>\n" + "&lt;\n" * 3_000,
    "Ã©tÃ©\n" * 500 + "Ã\n" + "é\n" * 500,  # mojibake fixed line by line
    "word\r\n" * 3_000 + "\u2028" * 10,
    "\n" * 500 + "a cat" + "\n" * 5_000,
    " ".join(["lorem ipsum dolor"] * 3_000),  # one long line: processed whole (linear)
    "\u00a0\n" * 1_000 + "late words " * 50,
]


@pytest.mark.parametrize("text", MULTILINE, ids=range(len(MULTILINE)))
def test_a_bounded_prefix_of_lines_tokenizes_as_open_clip_does(tokenizers, text):
    import time

    ref, mine = tokenizers
    started = time.process_time()
    ours = mine(text)[0]
    spent = time.process_time() - started
    assert np.array_equal(ours, ref([text])[0].numpy())
    assert spent < 0.25, f"{spent:.3f} s"  # measured: ~0.01 s for the first (0.9 s before)


def test_a_text_whose_tokens_lie_past_the_line_cap_is_refused_cheaply(tokenizers):
    import time

    from clip_triton.tokenizer import MAX_TEXT_LINES

    _, mine = tokenizers
    started = time.process_time()
    with pytest.raises(TextError, match=f"over {MAX_TEXT_LINES} line breaks before its first"):
        mine.ids("\x00\n" * 30_000 + "a cat")  # lines ftfy empties: no token until the end
    assert time.process_time() - started < 0.5
    assert mine.ids("\x00\n" * 1_000 + "a cat")[1] != mine.spec.eot_token_id  # under the cap: served


def test_the_tokenizer_model_sends_each_text_at_its_own_bucket():
    """The server-side split (issue 33): the rows of every request the batcher hands the tokenizer
    model are grouped by the bucket each needs on its own (its EOT inside), each group cut to its
    longest row rounded up to LENGTH_STEP, at most the bucket (a 62-token caption runs at 64, not 77);
    a refused row goes nowhere; the places lead every embedding back to its request and row."""
    from clip_triton.serving.tokenizer_model import split_by_bucket
    from clip_triton.tokenizer import ClipTokenizer, cut_to_bucket, refused_row, row_lengths

    spec = ModelContract.default().tokenizer
    tokenizer = ClipTokenizer(spec)
    short, mid, long = "a cat", "a photo of a cat sitting on a red sofa in the sun", "a long caption " * 20
    first = cut_to_bucket(np.stack([tokenizer.ids(short), tokenizer.ids(long), refused_row(spec)]), spec)
    second = cut_to_bucket(np.stack([tokenizer.ids(mid), tokenizer.ids(short)]), spec)
    assert first.shape[1] == 77 and second.shape[1] == 16
    assert row_lengths(first, spec).tolist() == [4, 62, 0]
    groups = split_by_bucket([first, None, second], spec)
    assert [(ids.shape, places) for ids, places in groups] == [
        ((2, 8), [(0, 0), (2, 1)]),
        ((1, 16), [(2, 0)]),
        ((1, 64), [(0, 1)]),
    ]
    caption = cut_to_bucket(np.stack([tokenizer.ids("a long caption " * 24), tokenizer.ids(long)]), spec)
    assert row_lengths(caption, spec).tolist() == [74, 62]
    ((ids, places),) = split_by_bucket([caption], spec)
    assert ids.shape == (2, 77) and places == [(0, 0), (0, 1)]  # 74 rounds up to 80: the bucket caps it
    for ids, places in groups:
        for got, (request, row) in zip(ids, places):
            source = (first, None, second)[request][row]
            assert (got == source[: len(got)]).all() and spec.eot_token_id in got
    static = ModelContract.default().with_(tokenizer=replace(spec, buckets=()))
    ((ids, places),) = split_by_bucket([cut_to_bucket(first, static.tokenizer)], static.tokenizer)
    assert ids.shape == (2, 77) and places == [(0, 0), (0, 1)]


def test_a_repository_written_before_the_split_keeps_its_ensemble_path(monkeypatch):
    """A tokenizer config without the ``encoder`` parameter (a repository written before the tokenizer
    called the encoder itself) answers ids, STATUS and TOKENS as before; its ensemble sends the ids on."""
    import asyncio

    from clip_triton.serving import tokenizer_model

    seen = []
    monkeypatch.setattr(tokenizer_model, "respond", lambda *args: seen.append(args) or ["answered"])
    model = tokenizer_model.TritonPythonModel.__new__(tokenizer_model.TritonPythonModel)
    model.encoder = ""
    assert asyncio.run(model.execute(["request"])) == ["answered"]
    (args,) = seen
    assert args[:4] == (["request"], C.TEXT_INPUT, C.INPUT_IDS, C.STATUS_OUTPUT) and args[4] == model.answer
