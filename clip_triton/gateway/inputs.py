"""The gateway's input rules: which item is an image, data URLs, text validity, and the JSON budget.

Pure functions over what a request carries (no I/O, no FastAPI): the routes and the admission
middleware call them, and the fast tests drive them directly.
"""

from __future__ import annotations

import base64
import binascii

from ..contract import TEXT, VISION
from .schemas import item_error

MAX_DATA_URL_HEADER = 1024  # "data:image/<type>[;params];base64" ends before this many characters
# Parsing JSON costs memory per value, not per byte: 8.4 MB of `[{},{},...]` became 2.8 M dicts
# (+420 MB, 0.95 s) before the item count could refuse it. Before any parsing the body's values are
# counted from its commas and opening brackets (an over-count: those inside strings count too), and a
# body with more than JSON_VALUES_FREE + one per JSON_BYTES_PER_VALUE bytes is refused. Parsing then
# costs at most ~72 bytes per value: under 10 MB for a 1 MB body, ~5 bytes per byte beyond. Prose
# has a comma every ~60 characters; image data URLs have none.
JSON_VALUES_FREE = 65_536
JSON_BYTES_PER_VALUE = 16


def json_values_problem(body: bytes) -> str | None:
    """Why a JSON body holds too many values to parse within the memory budget, or None (C-speed
    counts over the bytes, no parsing)."""
    values = body.count(b",") + body.count(b"{") + body.count(b"[")
    allowed = JSON_VALUES_FREE + len(body) // JSON_BYTES_PER_VALUE
    if values <= allowed:
        return None
    return (
        f"request body holds up to {values} JSON values (commas and brackets, strings included) in {len(body)} "
        f"bytes, over the limit of {allowed} ({JSON_VALUES_FREE} + one per {JSON_BYTES_PER_VALUE} bytes); "
        "send fewer items per request"
    )


def decode_data_url(value: str) -> bytes:
    """The bytes of a ``data:<type>[;param...];base64,<data>`` URL. Parsed in linear time, with no
    regular expression over user input (a backtracking pattern spent 5.6 s of the event loop on
    ``data:image/png`` and 16 Mi semicolons): the header must end within its first
    ``MAX_DATA_URL_HEADER`` characters."""
    comma = value.find(",", 0, MAX_DATA_URL_HEADER)
    header = value[:comma] if comma > 0 else ""
    params = header[5:].split(";") if header[:5].lower() == "data:" else []
    if len(params) < 2 or params[-1].lower() != "base64":
        raise ValueError("malformed data URL: expected data:image/<type>;base64,<data>")
    if not params[0].lower().startswith("image/"):
        raise ValueError(f"data URL is {params[0][:64] or 'untyped'}, not an image (expected data:image/...)")
    try:
        return base64.b64decode(value[comma + 1 :], validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("data URL holds invalid base64") from None


def is_image_reference(value: str) -> bool:
    """A plain string item is an image when it is a ``data:image/`` URL (any other ``data:`` text is
    text: "data: the quick brown fox") or an ``http(s)://`` URL (NV-CLIP's convention); anything else
    is text. A caption that is a URL is sent as ``{"type": "text", "text": ...}`` instead."""
    lowered = value[:16].lower()
    return lowered.startswith(("data:image/", "http://", "https://"))


def is_data_url(value: str) -> bool:
    return value[:5].lower() == "data:"


def classify_item(item, index: int, name: str = "input") -> tuple[str, str]:
    """("text" | "image", value) of one input item: a string (the rule of :func:`is_image_reference`),
    or a typed object ``{"type": "text", "text": ...}`` / ``{"type": "image_url", "image_url": URL or
    {"url": URL}}`` that says which it is (OpenAI's content-part shape)."""
    if isinstance(item, str):
        return (VISION.kind if is_image_reference(item) else TEXT.kind), item
    kind = item.get("type")
    if kind == "text" and isinstance(item.get("text"), str):  # OpenAI's part type, not ours
        return TEXT.kind, item["text"]
    if kind == "image_url":
        url = item.get("image_url")
        url = url.get("url") if isinstance(url, dict) else url
        if isinstance(url, str) and is_image_reference(url):
            return VISION.kind, url
        raise item_error(index, "image_url must be a data:image/...;base64, URL or an http(s) URL", name)
    raise item_error(
        index, 'a typed item is {"type": "text", "text": ...} or {"type": "image_url", "image_url": {"url": ...}}', name
    )


def utf8_error(value: str) -> str | None:
    """Why a string from JSON cannot be sent on (a lone surrogate such as "\\ud800"), or None."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        return f"not valid Unicode text (unpaired surrogate at character {exc.start})"
    return None
