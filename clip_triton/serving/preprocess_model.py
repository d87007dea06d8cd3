"""Triton python model ``preprocess``: encoded image bytes -> normalised pixels (open_clip's transform)."""

from __future__ import annotations

from ..contract import IMAGE_INPUT, PIXELS, STATUS_OUTPUT
from ..preprocess import ImageError, ImageLimits, Preprocessor, refused_pixels
from .common import Answer, answer_items, contract_from, end_with_server, parameters, respond


class TritonPythonModel:
    def initialize(self, args):
        end_with_server()
        params = parameters(args)
        contract = contract_from(params)
        limits = ImageLimits(max_pixels=int(params["max_image_pixels"]), max_bytes=int(params["max_image_bytes"]))
        self.preprocessor = Preprocessor(contract.preprocess, dtype=contract.pixel_dtype, limits=limits)
        # A refused item's row, marked so the vision graph answers NaN for it (contract.REFUSED_PIXEL).
        self.blank = refused_pixels(contract.pixels.shape, contract.pixel_dtype)

    def answer(self, values: list[bytes]) -> Answer:
        return answer_items(values, self.preprocessor.from_bytes, (ImageError,), self.blank)

    def execute(self, requests):
        return respond(requests, IMAGE_INPUT, PIXELS, STATUS_OUTPUT, self.answer)
