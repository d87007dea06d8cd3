"""CLIP's byte-level BPE tokenizer, token-for-token equal to open_clip's ``SimpleTokenizer``.

No torch: the server's ``tokenizer`` model and the client import this. Text is cleaned as open_clip
does (ftfy, HTML unescaping twice, whitespace collapsing, lower-casing), split with the same regular
expression, byte-encoded and merged with the BPE ranks shipped with open_clip
(``assets/bpe_simple_vocab_16e6.txt.gz``). Sequences longer than the context are truncated and
their last position set to the end-of-text token, as open_clip does.
"""

from __future__ import annotations

import gzip
import heapq
import html
import string
from functools import lru_cache
from importlib import resources

import ftfy
import numpy as np
import regex

from .contract import TokenizerSpec, split_language

VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
_N_MERGES = 49152 - 256 - 2
_SPECIAL = ("<start_of_text>", "<end_of_text>")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


# Longest text (characters) one item may have: the server's tokenizer model, the repository and the
# gateway share it (a longer text is refused for that item before any work).
DEFAULT_MAX_TEXT_CHARS = 65536
# Only context_length ids are kept, so only a prefix of a text is cleaned and encoded: whole lines (ftfy
# fixes each line on its own, so the first lines clean alike alone or in the whole text), from a window
# that grows until it yields the ids kept. ftfy costs ~27 us per line whatever its length: a text whose
# kept ids need more lines than this is refused (64 KB of "\x80\n" took 0.9 s; the cap holds it to ~55 ms).
MAX_TEXT_LINES = 2048
_FIRST_WINDOW_PER_ID = 8  # characters per id kept in the first window (English: ~4); it grows x4


class TextError(ValueError):
    """A text item that cannot be served; the message says why."""


@lru_cache(maxsize=1)
def _byte_alphabet() -> dict[int, str]:
    """Map every byte to a printable unicode character (GPT-2/CLIP byte-level BPE alphabet)."""
    # Printable bytes map to themselves and come first (their order is the vocabulary's order);
    # the others map to code points from 256 upwards.
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {byte: chr(byte) for byte in printable}
    others = [byte for byte in range(256) if byte not in table]
    table.update({byte: chr(256 + n) for n, byte in enumerate(others)})
    return table


@lru_cache(maxsize=1)
def _load_vocab() -> tuple[dict[str, int], dict[tuple[str, str], int]]:
    raw = resources.files("clip_triton").joinpath("assets", VOCAB_FILE).read_bytes()
    lines = gzip.decompress(raw).decode("utf-8").split("\n")[1 : _N_MERGES + 1]
    merges = [(first, second) for first, second in (line.split() for line in lines)]
    alphabet = list(_byte_alphabet().values())
    tokens = alphabet + [symbol + "</w>" for symbol in alphabet] + ["".join(pair) for pair in merges]
    tokens.extend(_SPECIAL)
    encoder = {token: index for index, token in enumerate(tokens)}
    ranks = {pair: rank for rank, pair in enumerate(merges)}
    return encoder, ranks


def _basic_clean(text: str) -> str:
    return html.unescape(html.unescape(ftfy.fix_text(text))).strip()


def _blank(line: str) -> bool:
    """A line ftfy turns into whitespace alone, so cleaning can skip it (NEL, U+0085, is whitespace that
    ftfy turns into an ellipsis)."""
    return (not line or line.isspace()) and "\x85" not in line


def cleaned_prefixes(kind: str, text: str, ids: int):
    """``(cleaned, whole)`` for growing prefixes of ``text`` cut after a line break: first about
    ``_FIRST_WINDOW_PER_ID * ids`` characters, then four times more, until the whole text. Cleaning a
    prefix of whole lines gives a prefix of the whole text's cleaning (ftfy fixes line by line, its only
    text-wide choice, HTML unescaping after a ``<``, carries forward only; the HTML unescaping and
    whitespace collapse that follow are local), so its first ids are the whole text's. Blank lines are
    left out before ftfy sees them (they clean to whitespace, which collapses anyway). Raises
    :class:`TextError` past :data:`MAX_TEXT_LINES` other lines."""
    window = _FIRST_WINDOW_PER_ID * (ids + 2)
    while True:
        cut = len(text) if window >= len(text) else (text.find("\n", window) + 1 or len(text))
        *lines, last = text[:cut].split("\n")
        lines = [line for line in lines if not _blank(line)]
        if len(lines) > MAX_TEXT_LINES:
            raise TextError(f"text has over {MAX_TEXT_LINES} line breaks before its first {ids} tokens")
        yield _clean(kind, "".join(line + "\n" for line in lines) + last), cut >= len(text)
        window *= 4


def _clean(kind: str, text: str) -> str:
    text = _basic_clean(text)
    if kind == "lower":
        return " ".join(text.split()).lower()
    if kind == "whitespace":
        return " ".join(text.split())
    if kind == "canonicalize":
        text = text.replace("_", " ").translate(_PUNCTUATION).lower()
        return " ".join(text.split())
    raise ValueError(f"unknown clean function {kind!r}")


# A long word is merged from a prefix of this many byte symbols per id still needed. Tokens are at most
# 32 symbols; BPE's merges are local, so a prefix this much longer than the ids it yields merges to
# the same first ids as the whole word (tests/test_tokenizer.py checks it against open_clip).
_PREFIX_PER_ID = 96


# Words up to this many symbols (nearly all of them) merge faster with open_clip's own quadratic loop
# than with the heap's bookkeeping; both give the same merges.
_SHORT_WORD = 24


def _merge_short(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """open_clip's loop: merge every occurrence of the lowest-ranked pair, left to right, and repeat."""
    while len(symbols) > 1:
        best, best_rank = None, None
        for pair in zip(symbols, symbols[1:]):
            rank = ranks.get(pair)
            if rank is not None and (best_rank is None or rank < best_rank):
                best, best_rank = pair, rank
        if best is None:
            break
        merged, i = [], 0
        while i < len(symbols):
            if i < len(symbols) - 1 and symbols[i] == best[0] and symbols[i + 1] == best[1]:
                merged.append(best[0] + best[1])
                i += 2
            else:
                merged.append(symbols[i])
                i += 1
        symbols = merged
    return symbols


def _merge(word: str, ranks: dict[tuple[str, str], int], end_of_word: bool = True) -> list[str]:
    """open_clip's BPE, in O(n log n) rather than O(n^2) for long words.

    open_clip repeatedly takes the lowest-ranked adjacent pair and merges every occurrence of it, left
    to right, before looking again. Here the candidate pairs sit in a heap keyed by (rank, position);
    all occurrences of the lowest rank are merged as one round, in position order, before the pairs
    that round created are considered: the same merges in the same order.
    """
    symbols = list(word)
    if end_of_word:
        symbols[-1] += "</w>"
    n = len(symbols)
    if n <= _SHORT_WORD:
        return _merge_short(symbols, ranks)
    left = list(range(-1, n - 1))
    right = [*range(1, n), -1]
    alive = [True] * n
    heap = [(ranks[(symbols[i], symbols[i + 1])], i) for i in range(n - 1) if (symbols[i], symbols[i + 1]) in ranks]
    heapq.heapify(heap)

    def push(i: int) -> None:
        j = right[i]
        if j != -1:
            rank = ranks.get((symbols[i], symbols[j]))
            if rank is not None:
                heapq.heappush(heap, (rank, i))

    while heap:
        rank = heap[0][0]
        round_positions = []
        while heap and heap[0][0] == rank:
            round_positions.append(heapq.heappop(heap)[1])
        created = []
        for i in sorted(set(round_positions)):
            j = right[i] if alive[i] else -1
            if j == -1 or ranks.get((symbols[i], symbols[j])) != rank:
                continue  # stale: this pair was merged away or changed earlier in the round
            symbols[i] += symbols[j]
            alive[j] = False
            right[i] = right[j]
            if right[j] != -1:
                left[right[j]] = i
            created.append(i)
        for i in created:  # alive: a later merge of the round absorbs only nodes right of its own
            if left[i] != -1:
                push(left[i])
            push(i)
    out, i = [], 0
    while i != -1:
        out.append(symbols[i])
        i = right[i]
    return out


class ClipTokenizer:
    """Tokenize strings to ``int32`` ids of shape ``[N, context_length]``."""

    def __init__(self, spec: TokenizerSpec | None = None, max_chars: int = DEFAULT_MAX_TEXT_CHARS):
        self.spec = spec = spec or TokenizerSpec()
        self.max_chars = max_chars
        self.encoder, self.ranks = _load_vocab()
        self.sot = self.encoder[_SPECIAL[0]]
        self.eot = self.encoder[_SPECIAL[1]]
        if (self.sot, self.eot) != (spec.sot_token_id, spec.eot_token_id):
            raise ValueError("the contract's special token ids do not match the BPE vocabulary")
        self._alphabet = _byte_alphabet()
        self._words: dict[str, list[int]] = {}
        self._pattern = regex.compile(
            "|".join(_SPECIAL) + r"""|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
            regex.IGNORECASE,
        )

    def _bpe(self, word: str) -> list[int]:
        """Ids of one pre-tokenized word after byte encoding and greedy lowest-rank merging."""
        cached = self._words.get(word)
        if cached is not None:
            return cached
        ids = [self.encoder[word]] if word in _SPECIAL else [self.encoder[s] for s in _merge(word, self.ranks)]
        if len(self._words) < 200_000 and len(word) <= 64:
            self._words[word] = ids
        return ids

    def encode(self, text: str, limit: int | None = None) -> list[int]:
        """BPE ids of ``text`` without start/end tokens (open_clip's ``SimpleTokenizer.encode``).

        With ``limit``, stop once ``limit`` ids are known: words after that are not merged at all, and
        a long word is merged from a prefix that holds its first ids many times over (BPE merges are
        local: what lies far past the ids that are kept does not change them).
        """
        if limit is None:
            return self._encode_clean(_clean(self.spec.clean, text), None)
        for cleaned, whole in cleaned_prefixes(self.spec.clean, text, limit):
            ids = self._encode_clean(cleaned, limit)
            if whole or len(ids) >= limit:
                return ids
        raise AssertionError("unreachable: the last prefix is the whole text")

    def _encode_clean(self, cleaned: str, limit: int | None) -> list[int]:
        ids: list[int] = []
        for match in self._pattern.finditer(cleaned):
            word = "".join(self._alphabet[b] for b in match.group().encode("utf-8"))
            if limit is not None:
                need = limit - len(ids)
                if need <= 0:
                    break
                if len(word) > _PREFIX_PER_ID * (need + 2):
                    ids.extend(self._bpe_prefix(word, need))
                    continue
            ids.extend(self._bpe(word))
        return ids if limit is None else ids[:limit]

    def _bpe_prefix(self, word: str, need: int) -> list[int]:
        """The first ``need`` ids of a long word, merging only a prefix of it (``word`` has no ``</w>``
        here: the prefix does not end the word)."""
        prefix = word[: _PREFIX_PER_ID * (need + 2)]
        return [self.encoder[s] for s in _merge(prefix, self.ranks, end_of_word=False)[:need]]

    def check(self, text: str) -> None:
        """Raise :class:`TextError` for text that is refused rather than tokenized."""
        if not text.strip():
            raise TextError("empty text")
        if len(text) > self.max_chars:
            raise TextError(f"text is {len(text)} characters, over the limit of {self.max_chars}")

    def ids(self, text: str) -> np.ndarray:
        """One row of ``context_length`` int32 ids, truncated as open_clip does."""
        self.check(text)
        length = self.spec.context_length
        # Only length - 1 ids can be kept; one more says whether the text was truncated.
        tokens = [self.sot, *self.encode(text, limit=length - 1), self.eot]
        if len(tokens) > length:
            tokens = tokens[:length]
            tokens[-1] = self.eot
        row = np.zeros(length, dtype=np.int32)
        row[: len(tokens)] = tokens
        return row

    def __call__(self, texts: str | list[str]) -> np.ndarray:
        if isinstance(texts, str):
            texts = [texts]
        return (
            np.stack([self.ids(text) for text in texts]) if texts else np.zeros((0, self.spec.context_length), np.int32)
        )


class HFTextTokenizer:
    """A Hugging Face tokenizer (SigLIP's Gemma/T5 SentencePiece, MetaCLIP 2's XLM-V) run as open_clip's
    ``HFTokenizer`` runs it, without torch or transformers: open_clip's cleaning, then the
    ``tokenizer.json`` the export saved from the tokenizer open_clip loaded (its normaliser,
    pre-tokeniser, model and special-token template), truncated to the context with the template's
    tokens kept and padded with the pad id, as ``tokenizer(texts, max_length=L,
    padding="max_length", truncation=True)`` does (tests/test_hf_tokenizer.py: token for token)."""

    def __init__(self, spec: TokenizerSpec, path, max_chars: int = DEFAULT_MAX_TEXT_CHARS):
        from tokenizers import Tokenizer  # noqa: PLC0415 (only models with a HF tokenizer need it)

        if not spec.resolved:
            raise ValueError("the contract's tokenizer ids are unresolved: export the model to read them")
        self.spec, self.max_chars = spec, max_chars
        self.backend = Tokenizer.from_file(str(path))
        self.backend.no_padding()
        self.backend.enable_truncation(max_length=spec.context_length)
        # NLLB: the saved template is ``[default code] $A </s>`` (checked at export); a text naming another
        # language gets that code's id in the first place, all else equal (tests/test_hf_tokenizer.py).
        self.language_ids = {code: self.backend.token_to_id(code) for code in spec.languages}
        missing = sorted(code for code, i in self.language_ids.items() if i is None)
        if missing:
            raise ValueError(f"{path} lacks the language tokens {missing[:5]} the contract names")

    def check(self, text: str) -> None:
        ClipTokenizer.check(self, text)  # type: ignore[arg-type]  # the same limits: max_chars, blank text

    def language(self, text: str) -> tuple[int | None, str]:
        """(the id of the language code a text names, or None for the default; the text without it).
        An unknown code refuses the text with the codes there are."""
        if not self.language_ids:
            return None, text
        code, rest = split_language(text)
        if code is None:
            return None, text
        if code not in self.language_ids:
            raise TextError(
                f"unknown language code {code!r} (a text starts with >>code<< to name its language); "
                f"this model knows {len(self.language_ids)}: {', '.join(sorted(self.language_ids))}"
            )
        return self.language_ids[code], rest

    def ids(self, text: str) -> np.ndarray:
        if len(text) > self.max_chars:
            self.check(text)
        language, text = self.language(text)
        self.check(text)
        for cleaned, whole in cleaned_prefixes(self.spec.clean, text, self.spec.context_length):
            encoding = self.backend.encode(cleaned)
            if whole or encoding.overflowing:  # truncated: the prefix already fills the context
                break
        tokens = encoding.ids
        row = np.full(self.spec.context_length, self.spec.pad_token_id, dtype=np.int32)
        row[: len(tokens)] = tokens
        if language is not None:
            row[0] = language
        return row

    __call__ = ClipTokenizer.__call__  # rows of self.ids, stacked


def text_tokenizer(
    spec: TokenizerSpec, folder=None, max_chars: int = DEFAULT_MAX_TEXT_CHARS
) -> ClipTokenizer | HFTextTokenizer:
    """The tokenizer a contract names: CLIP's BPE (shipped here), or the Hugging Face tokenizer whose
    ``tokenizer.json`` lies in ``folder`` (an export's ``tokenizer/``, or the server model's version folder)."""
    if spec.kind == "clip-bpe":
        return ClipTokenizer(spec, max_chars=max_chars)
    from pathlib import Path  # noqa: PLC0415

    from .contract import HF_TOKENIZER_FILE  # noqa: PLC0415

    path = Path(folder or ".") / HF_TOKENIZER_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the export copies the Hugging Face tokenizer there")
    return HFTextTokenizer(spec, path, max_chars=max_chars)


def refused_row(spec: TokenizerSpec) -> np.ndarray:
    """The token row the tokenizer model sends for a refused text: padding from the first id, which
    the text graph answers with a NaN row (clip_triton/export/graphs.py ``refusable``) and no accepted text has."""
    return np.full(spec.context_length, spec.pad_token_id, dtype=np.int32)


def is_refused(ids: np.ndarray, spec: TokenizerSpec) -> np.ndarray | bool:
    """Whether a token row (or each row of ``[N, L]`` ids) carries the refusal mark of
    :func:`refused_row`: the padding id first, which no tokenized text has."""
    return ids[..., 0] == spec.pad_token_id


def _through_last_eot(ids: np.ndarray, eot: int) -> np.ndarray:
    """Per row of ``[N, L]`` ids: tokens up to and including its last EOT (all ``L`` for a row without
    one, truncated by hand)."""
    hits = ids == eot
    last = ids.shape[1] - 1 - np.argmax(hits[:, ::-1], axis=1)
    return np.where(hits.any(axis=1), last + 1, ids.shape[1])


def needed_length(ids: np.ndarray, eot: int) -> int:
    """Tokens the rows of ``ids`` need: up to and including each row's last EOT, the longest row's."""
    return int(_through_last_eot(ids, eot).max()) if ids.size else 0


def row_lengths(ids: np.ndarray, spec: TokenizerSpec) -> np.ndarray:
    """Tokens each row of ``[N, L]`` ids needs on its own: up to and including its last EOT (all ``L``
    for a row without one), 0 for a refused row (:func:`refused_row`), which needs no encoder at all."""
    if not ids.size:
        return np.zeros(len(ids), dtype=np.int64)
    return np.where(is_refused(ids, spec), 0, _through_last_eot(ids, spec.eot_token_id))


def cut_to_bucket(ids: np.ndarray, spec: TokenizerSpec) -> np.ndarray:
    """``[N, context_length]`` ids cut to ``[N, L]``, L the shortest of the contract's lengths that
    holds every row's EOT: the causal, EOT-pooled text tower then embeds them exactly as whole rows.
    Refused rows (:func:`refused_row`, padding from the first id) need nothing: the graph answers
    them NaN at any length, so they never lengthen the request."""
    if not spec.dynamic:
        return ids
    live = ids[~is_refused(ids, spec)] if ids.ndim == 2 and ids.shape[1] else ids
    return np.ascontiguousarray(ids[:, : spec.bucket(needed_length(live, spec.eot_token_id))])


def decode_utf8(data: bytes) -> str:
    """Decode one text item sent as bytes; raise :class:`TextError` on invalid UTF-8."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise TextError(f"text is not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
