"""Regenerate the tiny Hugging Face tokenizers the tests use in place of SigLIP's and MetaCLIP 2's
(their real files are on the Hugging Face hub, which this machine cannot reach). Each has the same
*kind* as the real one, trained on the test corpus with the `tokenizers` library:

- ``gemma-like``: SentencePiece-style BPE with byte fallback, ``▁`` for spaces, <pad>=0 <eos>=1
  <bos>=2 <unk>=3, EOS appended (as SigLIP 2's Gemma tokenizer; SigLIP 1's T5 tokenizer appends
  EOS the same way);
- ``xlmv-like``: SentencePiece Unigram with Metaspace, <s>=0 <pad>=1 </s>=2 <unk>=3, wrapped as
  ``<s> text </s>`` (as MetaCLIP 2's XLM-V tokenizer, and XLM-RoBERTa's);
- ``t5-like``: SentencePiece Unigram with Metaspace, <pad>=0 </s>=1 <unk>=2, no start token, EOS
  appended (as mT5's tokenizer);
- ``nllb-like``: transformers' own ``NllbTokenizer`` over a SentencePiece-style BPE trained here (<s>=0
  <pad>=1 </s>=2 <unk>=3, the 202 FLORES-200 language codes and <mask> after the pieces), so open_clip
  loads it as it loads NLLB-CLIP's: ``[eng_Latn] text </s>``, another code through ``src_lang``.

Run: python tests/configs/tokenizers/make.py (writes the folders beside this file).
"""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent
CORPUS = [
    "a photo of a {}.",
    "a blurry photo of the {}.",
    "a drawing of a {}, in black and white",
    "itap of my {}!",
    "Ünïcödé text with emoji 🐱 and 日本語 and Ελληνικά",
    "a bright photo of the large {}",
]
WORDS = [
    "cat",
    "dog",
    "rocket",
    "astronaut",
    "coffee",
    "cup",
    "horse",
    "car",
    "tree",
    "house",
    "mountain",
    "river",
    "city",
    "street",
    "bird",
    "fish",
]


def corpus() -> list[str]:
    return [template.format(word) for template in CORPUS for word in WORDS] * 4


def gemma_like(out: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, normalizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    special = ["<pad>", "<eos>", "<bos>", "<unk>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=special + byte_tokens, show_progress=False)
    tok.train_from_iterator(corpus(), trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="$A <eos>", pair="$A <eos> $B <eos>", special_tokens=[("<eos>", tok.token_to_id("<eos>"))]
    )
    PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>", unk_token="<unk>"
    ).save_pretrained(out)


def _unigram(special: list[str]):
    """A SentencePiece-style Unigram tokenizer (Metaspace for spaces) trained on the corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=400, special_tokens=special, unk_token="<unk>", show_progress=False)
    tok.train_from_iterator(corpus(), trainer)
    return tok


def xlmv_like(out: Path) -> None:
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    tok = _unigram(["<s>", "<pad>", "</s>", "<unk>"])
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>",
        pair="<s> $A </s> </s> $B </s>",
        special_tokens=[("<s>", tok.token_to_id("<s>")), ("</s>", tok.token_to_id("</s>"))],
    )
    PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    ).save_pretrained(out)


def t5_like(out: Path) -> None:
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    tok = _unigram(["<pad>", "</s>", "<unk>"])
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", tok.token_to_id("</s>"))]
    )
    PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    ).save_pretrained(out)


def nllb_like(out: Path) -> None:
    import json

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import NllbTokenizer

    tok = Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    trainer = trainers.BpeTrainer(vocab_size=500, special_tokens=["<s>", "<pad>", "</s>", "<unk>"], show_progress=False)
    tok.train_from_iterator(corpus(), trainer)
    model = json.loads(tok.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    NllbTokenizer(vocab=model["vocab"], merges=merges).save_pretrained(out)


if __name__ == "__main__":
    gemma_like(HERE / "gemma-like")
    xlmv_like(HERE / "xlmv-like")
    t5_like(HERE / "t5-like")
    nllb_like(HERE / "nllb-like")
    for name in ("gemma-like", "xlmv-like", "t5-like", "nllb-like"):
        print(name, sorted(p.name for p in (HERE / name).iterdir()))
