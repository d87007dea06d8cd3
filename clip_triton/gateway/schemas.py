"""The gateway's wire schemas: request bodies (OpenAI's embeddings shape, and /v1/classify) and the
error body, ``{"error": {"message", "type", "param", "code"}}``."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from ..contract import DEFAULT_EMBEDDING_TYPE, EMBEDDING_TYPES

EmbeddingType = Literal[tuple(EMBEDDING_TYPES)]  # type: ignore[valid-type]


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def item_error(index: int, reason: str, name: str = "input") -> ApiError:
    return ApiError(400, f"{name}[{index}]: {reason}", param=f"{name}[{index}]", code="invalid_item")


class EmbeddingRequest(BaseModel):
    """``POST /v1/embeddings`` (OpenAI's schema): strings, data URLs, image URLs or typed items."""

    input: str | list[str | dict]
    model: str
    encoding_format: Literal["float", "base64"] = "float"
    # Not OpenAI's: a compact encoding of each embedding (clip_triton/encodings.py; Cohere's value names).
    # The official `openai` package sends encoding_format="base64" unless told otherwise and decodes the
    # answer as float32: with a compact type, pass encoding_format explicitly (docs/storage.md).
    embedding_type: EmbeddingType = DEFAULT_EMBEDDING_TYPE
    dimensions: int | None = None
    user: str | None = None
    # Not OpenAI's: the source language of every text for NLLB models (a FLORES-200 code, ``fra_Latn``); a
    # text may name its own with a ``>>fra_Latn<<`` prefix instead (docs/multilingual.md).
    language: str | None = None


class ClassifyRequest(BaseModel):
    """``POST /v1/classify``: images and prompts (and optional templates with ``{}``)."""

    model: str
    images: list[str] = Field(min_length=1)
    prompts: list[str] = Field(min_length=1)
    templates: list[str] | None = None
    language: str | None = None  # as EmbeddingRequest.language: the prompts' source language (NLLB models)
