"""Image decoding and open_clip's inference transform with PIL and numpy only (no torch).

Mirrors ``open_clip.transform.image_transform(..., is_train=False)`` step by step:
``Resize(shortest side, bicubic)`` (torchvision's PIL path: ``int()`` truncation of the long side,
skipped when the size already matches, PIL's always-antialiased filter), ``CenterCrop`` (offsets
rounded as torchvision does), ``convert("RGB")`` *after* resizing, ``ToTensor`` (``/255`` in float32)
and ``Normalize`` (float32). The last two are folded into a per-channel lookup table that holds the
very float32 values torch computes.
"""

from __future__ import annotations

import io
import time
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from .contract import REFUSED_PIXEL, PreprocessSpec

DEFAULT_MAX_PIXELS = 50_000_000  # decoded pixels (width * height) per image
DEFAULT_MAX_BYTES = 32 * 1024 * 1024  # encoded bytes per image
# Each side on its own, too: JPEG's and GIF's own maximum. A 1 x 50,000,000 PNG (97 KB) is within the
# pixel limit yet costs 2 s and 430 MB to decode; extreme aspect ratios below it stay served.
DEFAULT_MAX_SIDE = 65_535
# Progressive JPEG: every scan re-walks the whole coefficient buffer, so 20,000 tiny scans in 613 KB
# cost 23 s of CPU. Encoders write about 10 (libjpeg's progressive script), mozjpeg's search a few more.
MAX_JPEG_SCANS = 100
# Decoding is charged CPU time (this thread's), checked between blocks of the encoded input: a budget of
# DECODE_CPU_BASE_S plus DECODE_CPU_S_PER_MB per MB of image, over which the item fails on its own.
# A 24 MP photo (~8 MB) decodes in ~0.3 s here, so the budget is generous for real images and bounds
# anything built to make the decoder loop.
DECODE_CPU_BASE_S = 0.5
DECODE_CPU_S_PER_MB = 1.0
DECODE_BLOCK = 16 * 1024  # encoded bytes per decoder call: the budget's granularity

_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}
_SUPPORT = {Image.Resampling.BICUBIC: 2.0, Image.Resampling.BILINEAR: 1.0}  # filter radius, in pixels
# The formats README lists, by PIL's names (JPEG's opener also reads MPO, the multi-picture JPEG of
# phone cameras). Everything else PIL could decode (ICNS, PCX, SGI, TGA, DDS, XBM, JPEG 2000, QOI,
# ICO, PSD, ...) is refused.
ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
ACCEPTED = "JPEG, PNG, WebP, GIF, BMP, TIFF"
# Resizing the whole image and then cropping costs the full resized size: a 20000x1 PNG (99 bytes)
# would be resized to 4,480,000x224 pixels (1.2 GiB) first. Up to this many times the output's area
# (aspect ratios up to 64:1 for a square crop, ~10 MB) the full resize runs, bit-exact with open_clip.
# Past it only the region the crop keeps is resized: the same filter at the same scale, within a few
# grey levels of open_clip (PIL's box coordinates round differently), at the output's cost.
MAX_INTERMEDIATE_FACTOR = 64
Image.init()  # register every plugin, so that each accepted format (WebP, TIFF) can be named


def refused_pixels(shape: tuple[int, ...], dtype: str) -> np.ndarray:
    """The pixel row the preprocess model sends for a refused image: every value REFUSED_PIXEL, which
    the vision graph answers with a NaN row (clip_triton/export/graphs.py ``refusable``)."""
    return np.full(shape, REFUSED_PIXEL, dtype=dtype)


class ImageError(ValueError):
    """An image that cannot be served; the message says why and what is accepted."""


@dataclass(frozen=True)
class ImageLimits:
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_bytes: int = DEFAULT_MAX_BYTES
    max_side: int = DEFAULT_MAX_SIDE
    max_jpeg_scans: int = MAX_JPEG_SCANS
    decode_cpu_base_s: float = DECODE_CPU_BASE_S
    decode_cpu_s_per_mb: float = DECODE_CPU_S_PER_MB

    def decode_budget_s(self, size: int) -> float:
        return self.decode_cpu_base_s + self.decode_cpu_s_per_mb * size / 1e6


class _Budgeted(io.BytesIO):
    """Encoded bytes that charge the reading thread's CPU time: a read past the budget raises, so a
    decoder fed block by block stops within one block of it."""

    def __init__(self, data: bytes, budget_s: float, clock=time.thread_time):
        super().__init__(data)
        self.clock, self.budget_s = clock, budget_s
        self.deadline = clock() + budget_s

    def read(self, size: int | None = -1) -> bytes:
        if self.clock() > self.deadline:
            raise ImageError(
                f"decoding took over its CPU budget of {self.budget_s:.2f} s for {len(self.getbuffer())} bytes"
            )
        return super().read(size)


def jpeg_scans(data: bytes) -> int:
    """Start-of-scan markers in a JPEG. Entropy-coded data stuffs every 0xFF byte (0xFF00), so a marker
    pair FF DA only begins a scan (or one in an embedded thumbnail): an exact count, or a slight over-count."""
    return data.count(b"\xff\xda")


def decode_image(data: bytes, limits: ImageLimits = ImageLimits()) -> Image.Image:
    """Decode encoded image bytes into a loaded PIL image (first frame of animations).

    Raises :class:`ImageError` for empty, oversized, undecodable or truncated input. Size, sides and
    (JPEG) scan count are checked from the header and bytes, before any pixel is decoded; the decode
    itself runs on a CPU budget (:class:`ImageLimits`).
    """
    if not data:
        raise ImageError("empty image (0 bytes)")
    if len(data) > limits.max_bytes:
        raise ImageError(f"image is {len(data)} bytes, over the limit of {limits.max_bytes} bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(_Budgeted(data, limits.decode_budget_s(len(data))), formats=ACCEPTED_FORMATS)
            width, height = img.size
            if width < 1 or height < 1:
                raise ImageError(f"image has no pixels ({width}x{height})")
            if max(width, height) > limits.max_side:
                raise ImageError(f"image is {width}x{height}, a side over the limit of {limits.max_side} pixels")
            if width * height > limits.max_pixels:
                raise ImageError(
                    f"image is {width}x{height} = {width * height} pixels, over the limit of {limits.max_pixels} pixels"
                )
            if img.format == "JPEG" and (scans := jpeg_scans(data)) > limits.max_jpeg_scans:
                raise ImageError(f"JPEG has {scans} scans, over the limit of {limits.max_jpeg_scans}")
            img.decodermaxblock = DECODE_BLOCK
            img.load()
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError(f"not a decodable image in an accepted format ({ACCEPTED})") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # Pillow's own guard (MAX_IMAGE_PIXELS) fired while reading the header.
        raise ImageError(
            f"image rejected as a decompression bomb, over the limit of {limits.max_pixels} pixels ({exc})"
        ) from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageError(f"corrupt or truncated image: {exc}") from None
    return img


class Preprocessor:
    """open_clip's eval transform for one :class:`PreprocessSpec`, returning ``[3, H, W]`` arrays."""

    def __init__(self, spec: PreprocessSpec, dtype: str = "float32", limits: ImageLimits = ImageLimits()):
        self.spec = spec
        self.dtype = np.dtype(dtype)
        self.limits = limits
        self._resample = _RESAMPLE[spec.interpolation]
        values = np.arange(256, dtype=np.float32) / np.float32(255)
        mean = np.asarray(spec.mean, dtype=np.float32)
        std = np.asarray(spec.std, dtype=np.float32)
        # lut[c, v] = (v / 255 - mean[c]) / std[c], in float32 as torch computes it.
        self._lut = ((values[None, :] - mean[:, None]) / std[:, None]).astype(np.float32)

    def resize_crop(self, img: Image.Image) -> Image.Image:
        """Resize and crop in the image's own mode, as torchvision does on PIL images."""
        out_h, out_w = self.spec.image_size
        width, height = img.size
        if self.spec.resize_mode == "squash":
            if (height, width) != (out_h, out_w):
                img = img.resize((out_w, out_h), self._resample)
            return img
        if out_h == out_w:
            short, long = (width, height) if width <= height else (height, width)
            new_short, new_long = out_h, int(out_h * long / short)
            new_w, new_h = (new_short, new_long) if width <= height else (new_long, new_short)
        else:  # open_clip's ResizeKeepRatio for non-square targets
            ratio = max(out_h / height, out_w / width)
            new_w, new_h = round(width * ratio), round(height * ratio)
        top = int(round((new_h - out_h) / 2.0))
        left = int(round((new_w - out_w) / 2.0))
        if new_w * new_h > MAX_INTERMEDIATE_FACTOR * out_w * out_h:
            return self._resize_region(img, (new_w, new_h), (left, top, left + out_w, top + out_h))
        if (new_h, new_w) != (height, width):
            img = img.resize((new_w, new_h), self._resample)
        return img.crop((left, top, left + out_w, top + out_h))

    def _resize_region(self, img: Image.Image, size: tuple[int, int], crop: tuple[int, int, int, int]) -> Image.Image:
        """``img.resize(size).crop(crop)``, computing only the cropped region (a few grey levels apart).

        PIL resizes in two passes, horizontal then vertical, rounding to 8 bits in between. The same
        passes run here on what the crop needs: the source rows under the vertical filter, resized
        horizontally over the kept columns only (PIL's ``box``: same scale, same taps), then
        vertically over the kept rows.
        """
        width, height = img.size
        (new_w, new_h), (left, top, right, bottom) = size, crop
        sx, sy = width / new_w, height / new_h
        # Source rows the vertical pass reads: the filter reaches `support` output-scale pixels.
        reach = _SUPPORT[self._resample] * max(sy, 1.0) + 2
        y0 = max(0, int(top * sy - reach))
        y1 = min(height, int(bottom * sy + reach) + 1)
        rows = img.crop((0, y0, width, y1))
        if new_w != width or left or right != width:
            rows = rows.resize((right - left, y1 - y0), self._resample, box=(left * sx, 0, right * sx, y1 - y0))
        if new_h == height:
            return rows.crop((0, top - y0, right - left, bottom - y0))
        return rows.resize(
            (right - left, bottom - top), self._resample, box=(0, top * sy - y0, right - left, bottom * sy - y0)
        )

    def from_pil(self, img: Image.Image) -> np.ndarray:
        rgb = np.asarray(self.resize_crop(img).convert("RGB"))
        out = np.empty((3,) + rgb.shape[:2], dtype=np.float32)
        for channel in range(3):
            np.take(self._lut[channel], rgb[:, :, channel], out=out[channel])
        return out if self.dtype == np.float32 else out.astype(self.dtype)

    def from_bytes(self, data: bytes) -> np.ndarray:
        return self.from_pil(decode_image(data, self.limits))
