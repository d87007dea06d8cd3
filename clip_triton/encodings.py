"""Compact encodings of L2-normalised embeddings: what the gateway's and the client's
``embedding_type`` return, and what ``clip-triton embed`` stores. numpy only.

The names are Cohere's and sentence-transformers' (``float``, ``int8``, ``uint8``, ``binary``,
``ubinary``) plus ``float16``; each is defined here, once:

=========  ===============================================================  ==============
type       element of the encoded row                                        bytes (D=1280)
=========  ===============================================================  ==============
float      the float32 value                                                 5120
float16    the value rounded to IEEE half precision                          2560
int8       ``clip(round(x * S), -127, 127)``, ``S = 127 * sqrt(D) / 8``      1280
uint8      the int8 value + 128 (subtract 128 before a dot product)          1280
binary     8 signs per byte (bit 1 where ``x > 0``, first dimension in the   160
           high bit, ``np.packbits``), the byte - 128 as int8 (Cohere's)
ubinary    the same bytes as uint8 (Cohere's ``ubinary``)                    160
=========  ===============================================================  ==============

int8 needs no calibration data: one fixed scale per dimension count (8 is ``INT8_RANGE_RMS`` in the
contract), for every model, so every client of a deployment (and every shard of a job) encodes alike. Recall@10 of each type against float32 exact
search is measured by ``python bench/encodings.py`` (docs/storage.md).
"""

from __future__ import annotations

import base64
import math

import numpy as np

from .contract import DEFAULT_EMBEDDING_TYPE, EMBEDDING_TYPES, INT8_RANGE_RMS
from .errors import ClipTritonError

INTEGER_TYPES = ("int8", "uint8", "binary", "ubinary")  # JSON numbers of these are integers


def check_type(name: str | None) -> str:
    """``name`` if it is an embedding type (None: the default), else a ClipTritonError listing them."""
    if name is None:
        return DEFAULT_EMBEDDING_TYPE
    if name not in EMBEDDING_TYPES:
        raise ClipTritonError(
            f"embedding type {name!r} is not one of {', '.join(EMBEDDING_TYPES)}", "pick one of those names"
        )
    return name


def dtype(name: str) -> np.dtype:
    """The numpy dtype of an encoded row (little-endian where it matters)."""
    return np.dtype(EMBEDDING_TYPES[check_type(name)][0])


def width(name: str, dim: int) -> int:
    """Elements in an encoded row of a ``dim``-dimensional embedding."""
    per = EMBEDDING_TYPES[check_type(name)][1]
    return math.ceil(dim / per)


def int8_scale(dim: int) -> float:
    """``S`` of the int8 encoding: ``x * S`` maps ``[-R, R]``, ``R = INT8_RANGE_RMS / sqrt(dim)``, to ``[-127, 127]``."""
    return 127.0 * math.sqrt(dim) / INT8_RANGE_RMS


def encode(vectors: np.ndarray, name: str) -> np.ndarray:
    """``(N, D)`` float embeddings in the encoding ``name``: ``(N, width(name, D))`` of ``dtype(name)``."""
    name = check_type(name)
    x = np.asarray(vectors, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"expected an (N, D) array, got shape {x.shape}")
    if name == "float":
        return x.astype("<f4", copy=False)
    if name == "float16":
        return x.astype("<f2")
    if name in ("int8", "uint8"):
        q = np.clip(np.rint(x * int8_scale(x.shape[1])), -127, 127).astype(np.int16)
        return (q + 128).astype(np.uint8) if name == "uint8" else q.astype(np.int8)
    packed = np.packbits(x > 0, axis=1)  # ubinary; first dimension in the high bit
    return (packed.astype(np.int16) - 128).astype(np.int8) if name == "binary" else packed


def decode(encoded: np.ndarray, name: str, dim: int) -> np.ndarray:
    """The float32 vectors an encoding stands for (int8: ``q / S``; binary: ``±1/sqrt(D)``, unit length)."""
    name = check_type(name)
    e = np.asarray(encoded)
    if name in ("float", "float16"):
        return e.astype(np.float32)
    if name in ("int8", "uint8"):
        q = e.astype(np.float32) - (128.0 if name == "uint8" else 0.0)
        return q / np.float32(int8_scale(dim))
    packed = (e.astype(np.int16) + 128).astype(np.uint8) if name == "binary" else e.astype(np.uint8)
    bits = np.unpackbits(packed, axis=1)[:, :dim]
    return (bits.astype(np.float32) * 2 - 1) / np.float32(math.sqrt(dim))


def scores(queries: np.ndarray, rows: np.ndarray, name: str) -> np.ndarray:
    """Similarity of each encoded query to each encoded row, as a store of that type computes it:
    float dot products; int8/uint8 exact integer dot products (uint8 less its 128 offset); binary and
    ubinary ``bits - 2 * hamming`` (the dot product of the ±1 signs). Higher is closer."""
    name = check_type(name)
    if name in ("float", "float16"):
        return np.asarray(queries, np.float32) @ np.asarray(rows, np.float32).T
    if name in ("int8", "uint8"):
        offset = 128 if name == "uint8" else 0
        q = np.asarray(queries).astype(np.float64) - offset
        r = np.asarray(rows).astype(np.float64) - offset
        return np.rint(q @ r.T).astype(np.int64)  # float64 BLAS: exact for these sums (< 2**53)
    q = np.asarray(queries)
    r = np.asarray(rows)
    if name == "binary":
        q, r = (q.astype(np.int16) + 128).astype(np.uint8), (r.astype(np.int16) + 128).astype(np.uint8)
    popcount = np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1).sum(1).astype(np.int32)
    bits = q.shape[1] * 8
    out = np.empty((len(q), len(r)), dtype=np.int32)
    for i, row in enumerate(q):  # one query at a time: (rows, bytes) of XOR, never (Q, rows, bytes)
        out[i] = bits - 2 * popcount[np.bitwise_xor(r, row)].sum(axis=1)
    return out


def to_base64(row: np.ndarray) -> str:
    """One encoded row's bytes (little-endian), base64: OpenAI's ``encoding_format="base64"``."""
    return base64.b64encode(np.ascontiguousarray(row).tobytes()).decode()


def from_base64(text: str, name: str) -> np.ndarray:
    """The encoded row a :func:`to_base64` string holds."""
    return np.frombuffer(base64.b64decode(text), dtype=dtype(name))


def to_json(row: np.ndarray, name: str) -> np.ndarray:
    """One encoded row for the gateway's JSON renderer (orjson, NumPy arrays as JSON numbers):
    integers for the integer types; floats as the shortest decimal that reads back as the same
    float32 (float16) value, as OpenAI's API writes them. Read them as that type for the exact row."""
    return np.ascontiguousarray(row, dtype=dtype(name))
