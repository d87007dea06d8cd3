"""What the user gives, as the bytes a request carries: image paths, bytes, PIL images and http(s) URLs
(fetched with a time and size limit), and texts. A bad item becomes that item's error, never the job's."""

from __future__ import annotations

import io
import os
import urllib.request
from collections.abc import Iterable
from pathlib import Path

MAX_URL_BYTES = 20 * 1024 * 1024


def prepare_images(images: Iterable, url_timeout: float) -> list[bytes | Exception]:
    prepared: list[bytes | Exception] = []
    for item in images:
        try:
            prepared.append(image_bytes(item, url_timeout))
        except (OSError, ValueError, TypeError) as exc:
            prepared.append(exc)
    return prepared


def text_bytes(text) -> bytes:
    if not isinstance(text, str):
        raise TypeError(f"not a string: {text!r:.80}")
    return text.encode("utf-8")


def prepare_texts(texts: Iterable[str]) -> list[bytes | Exception]:
    prepared: list[bytes | Exception] = []
    for text in texts:
        try:
            prepared.append(text_bytes(text))
        except TypeError as exc:
            prepared.append(exc)
    return prepared


def fetch_url(url: str, timeout: float = 10.0, max_bytes: int = MAX_URL_BYTES) -> bytes:
    """Download an http(s) image with a time and size limit."""
    if not url.lower().startswith(("http://", "https://")):
        raise ValueError(f"not an http(s) URL: {url[:80]}")
    request = urllib.request.Request(url, headers={"User-Agent": "clip-triton"})  # noqa: S310 (http(s) checked above)
    with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310
        length = response.headers.get("Content-Length")
        if length and int(length) > max_bytes:
            raise ValueError(f"{url} is {length} bytes, over the {max_bytes} byte limit")
        data = response.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ValueError(f"{url} is over the {max_bytes} byte limit")
    return data


def image_bytes(item, url_timeout: float = 10.0) -> bytes:
    """Encoded bytes for a path, bytes, PIL image or http(s) URL."""
    if isinstance(item, (bytes, bytearray, memoryview)):
        return bytes(item)
    if isinstance(item, (str, os.PathLike)):
        text = os.fspath(item)
        if text.lower().startswith(("http://", "https://")):
            return fetch_url(text, timeout=url_timeout)
        return Path(text).read_bytes()
    if hasattr(item, "save") and hasattr(item, "mode"):  # PIL image: lossless PNG keeps its pixels
        buffer = io.BytesIO()
        item.save(buffer, format="PNG")
        return buffer.getvalue()
    raise TypeError(f"unsupported image item of type {type(item).__name__}")
