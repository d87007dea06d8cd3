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
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from .contract import PreprocessSpec

DEFAULT_MAX_PIXELS = 50_000_000  # decoded pixels (width * height) per image
DEFAULT_MAX_BYTES = 32 * 1024 * 1024  # encoded bytes per image

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


class ImageError(ValueError):
    """An image that cannot be served; the message says why and what is accepted."""


@dataclass(frozen=True)
class ImageLimits:
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_bytes: int = DEFAULT_MAX_BYTES


def decode_image(data: bytes, limits: ImageLimits = ImageLimits()) -> Image.Image:
    """Decode encoded image bytes into a loaded PIL image (first frame of animations).

    Raises :class:`ImageError` for empty, oversized, undecodable or truncated input. The pixel
    limit is checked from the header, before any pixel is decoded (decompression bombs).
    """
    if not data:
        raise ImageError("empty image (0 bytes)")
    if len(data) > limits.max_bytes:
        raise ImageError(f"image is {len(data)} bytes, over the limit of {limits.max_bytes} bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
            width, height = img.size
            if width < 1 or height < 1:
                raise ImageError(f"image has no pixels ({width}x{height})")
            if width * height > limits.max_pixels:
                raise ImageError(
                    f"image is {width}x{height} = {width * height} pixels, over the limit of {limits.max_pixels} pixels"
                )
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
