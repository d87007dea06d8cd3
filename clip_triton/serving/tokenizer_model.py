"""Triton python model ``tokenizer``: UTF-8 text -> int32 token ids, equal to open_clip's tokenizer."""

from __future__ import annotations

from ..contract import INPUT_IDS, STATUS_OUTPUT, TEXT_INPUT
from ..tokenizer import ClipTokenizer, TextError, decode_utf8
from .common import contract_from, parameters, per_item


class TritonPythonModel:
    def initialize(self, args):
        params = parameters(args)
        contract = contract_from(params)
        self.tokenizer = ClipTokenizer(contract.tokenizer, max_chars=int(params["max_text_chars"]))
        self.blank = self.tokenizer.ids("x") * 0  # a refused item's row: all padding
        self.blank[:2] = (self.tokenizer.sot, self.tokenizer.eot)

    def execute(self, requests):
        return per_item(
            requests,
            TEXT_INPUT,
            INPUT_IDS,
            lambda item: self.tokenizer.ids(decode_utf8(item)),
            (TextError,),
            STATUS_OUTPUT,
            self.blank,
        )
