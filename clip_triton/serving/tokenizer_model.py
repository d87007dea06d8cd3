"""Triton python model ``tokenizer``: UTF-8 text -> int32 token ids, equal to open_clip's tokenizer,
cut to the shortest of the contract's sequence-length buckets that holds the request's longest text."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..contract import INPUT_IDS, STATUS_OUTPUT, TEXT_INPUT, TOKENS_OUTPUT
from ..tokenizer import TextError, cut_to_bucket, decode_utf8, is_refused, refused_row, text_tokenizer
from .common import Answer, answer_items, contract_from, end_with_server, parameters, respond


class TritonPythonModel:
    def initialize(self, args):
        end_with_server()
        params = parameters(args)
        contract = contract_from(params)
        self.spec = contract.tokenizer
        # A Hugging Face tokenizer's tokenizer.json lies in this model's version folder (`clip-triton repo`).
        folder = Path(args["model_repository"]) / str(args["model_version"])
        self.tokenizer = text_tokenizer(contract.tokenizer, folder, max_chars=int(params["max_text_chars"]))
        # A refused item's row: padding from the first id, which the text graph answers with NaN
        # (contract.REFUSED_PIXEL's comment); no text the tokenizer accepts starts with it.
        self.blank = refused_row(self.spec)

    def ids(self, item: bytes) -> np.ndarray:
        row = self.tokenizer.ids(decode_utf8(item))
        if is_refused(row, self.spec):  # e.g. SigLIP (no start token, EOT = padding) given only spaces
            raise TextError("text has no tokens")
        return row

    def answer(self, values: list[bytes]) -> Answer:
        answer = answer_items(values, self.ids, (TextError,), self.blank)
        if answer.rows is not None:
            # Counted before the cut, as the model encodes them: start/end tokens, no padding (a
            # refused row is padding: 0). The gateway's `usage` reads these (contract TOKENS_OUTPUT).
            counts = (answer.rows != self.spec.pad_token_id).sum(axis=1, dtype=np.int32).reshape(-1, 1)
            answer.extras[TOKENS_OUTPUT] = counts
            answer.rows = cut_to_bucket(answer.rows, self.spec)
        return answer

    def execute(self, requests):
        return respond(requests, TEXT_INPUT, INPUT_IDS, STATUS_OUTPUT, self.answer)
