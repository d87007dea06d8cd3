"""An HF-format CLIP ViT-B/32 with random weights, built locally for infinity-emb (used by bench/peers.py).

    PEERS_VENV/bin/python bench/peer_infinity.py --out DIR [--seed 0]

No hub: the config is written here (ViT-B/32 at 224 px, a 12-layer 512-wide text tower with 77
positions, projection 512, as open_clip's ViT-B-32) and the tokenizer files (``vocab.json``,
``merges.txt``) are made from the BPE vocabulary clip-triton ships (the same one OpenAI's CLIP and
open_clip use). ``config.max_length`` and the tokenizer's ``model_max_length`` are 77: infinity
truncates texts at ``config.max_length``, transformers' generic default of 20 unless set, and would
do less work than the others (bench/peers.py probes every system for it).
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the contract (stdlib only) from the checkout: the peers' venv lacks clip-triton

from clip_triton.contract import TokenizerSpec

# clip_triton.tokenizer.VOCAB_FILE: that module needs ftfy, which the peers' venv lacks (a test keeps them equal).
VOCAB = ROOT / "clip_triton" / "assets" / "bpe_simple_vocab_16e6.txt.gz"


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (what CLIP's BPE vocabulary is written in)."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars, extra = printable[:], 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars)))


def tokenizer_files(out: Path) -> None:
    with gzip.open(VOCAB) as handle:
        merges = handle.read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    pairs = [tuple(line.split()) for line in merges]
    vocab = list(bytes_to_unicode().values())
    vocab += [v + "</w>" for v in vocab] + ["".join(pair) for pair in pairs] + ["<|startoftext|>", "<|endoftext|>"]
    (out / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(vocab)}, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(pair) for pair in pairs) + "\n")


def build(out: Path, seed: int) -> None:
    import torch
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPProcessor,
        CLIPTextConfig,
        CLIPTokenizerFast,
        CLIPVisionConfig,
    )

    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    tok = TokenizerSpec()  # CLIP's BPE: vocabulary size, special ids and context, as open_clip's ViT-B-32
    text = CLIPTextConfig(
        vocab_size=tok.vocab_size,
        hidden_size=512,
        intermediate_size=2048,
        num_hidden_layers=12,
        num_attention_heads=8,
        max_position_embeddings=tok.context_length,
        bos_token_id=tok.sot_token_id,
        eos_token_id=tok.eot_token_id,
        pad_token_id=tok.eot_token_id,
    )
    vision = CLIPVisionConfig(
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        image_size=224,
        patch_size=32,
    )
    config = CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=512)
    # infinity truncates texts at config.max_length, transformers' generic generation default of 20
    # unless set: 77, the context, so it encodes what the others encode.
    config.max_length = config.text_config.max_length = tok.context_length
    CLIPModel(config).eval().save_pretrained(out)
    tokenizer_files(out)
    tokenizer = CLIPTokenizerFast(
        vocab_file=str(out / "vocab.json"), merges_file=str(out / "merges.txt"), model_max_length=tok.context_length
    )
    images = CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})
    CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    build(Path(args.out), args.seed)


if __name__ == "__main__":
    main()
