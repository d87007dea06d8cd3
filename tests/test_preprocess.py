"""Server-side preprocessing equals open_clip's transform (PIL + torchvision) on real photographs."""

import io

import numpy as np
import pytest
from PIL import Image

from clip_triton.contract import ModelContract, PreprocessSpec
from clip_triton.export.adapter import contract_from_open_clip
from clip_triton.preprocess import ImageError, ImageLimits, Preprocessor, decode_image

TOLERANCE = 1e-5  # max abs difference allowed per pixel value (observed: 0.0)


@pytest.fixture(scope="module")
def spec() -> PreprocessSpec:
    return ModelContract.default().preprocess


@pytest.fixture(scope="module")
def reference(spec):
    import open_clip

    transform = open_clip.image_transform(
        spec.image_size,
        is_train=False,
        mean=spec.mean,
        std=spec.std,
        interpolation=spec.interpolation,
        resize_mode=spec.resize_mode,
    )
    return lambda data: transform(Image.open(io.BytesIO(data))).numpy()


def encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def variants(photo: Image.Image) -> dict[str, bytes]:
    """One photograph in every accepted container and pixel mode."""
    gray16 = np.asarray(photo.convert("L"), dtype=np.uint16) * 257
    rgba = photo.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(photo.size))
    return {
        "jpeg": encode(photo, "JPEG", quality=92),
        "png": encode(photo, "PNG"),
        "webp": encode(photo, "WEBP", quality=90),
        "gif_palette": encode(photo.convert("P", palette=Image.Palette.ADAPTIVE), "GIF"),
        "bmp": encode(photo, "BMP"),
        "tiff": encode(photo, "TIFF"),
        "grayscale_jpeg": encode(photo.convert("L"), "JPEG"),
        "grayscale_alpha_png": encode(photo.convert("LA"), "PNG"),
        "rgba_png": encode(rgba, "PNG"),
        "palette_png": encode(photo.convert("P"), "PNG"),
        "cmyk_jpeg": encode(photo.convert("CMYK"), "JPEG"),
        "cmyk_tiff": encode(photo.convert("CMYK"), "TIFF"),
        "bilevel_png": encode(photo.convert("1"), "PNG"),
        "gray16_png": encode(Image.fromarray(gray16), "PNG"),
        "portrait_crop": encode(photo.crop((0, 0, photo.width // 3, photo.height)), "PNG"),
        "tiny_upscaled": encode(photo.resize((7, 5)), "PNG"),
        "one_pixel": encode(photo.resize((1, 1)), "PNG"),
        "wide_panorama": encode(photo.resize((photo.width * 3, photo.height // 2)), "JPEG"),
    }


@pytest.mark.parametrize("name", ["cat", "coffee", "astronaut", "rocket"])
def test_real_photographs_match_open_clip(spec, reference, photos, name):
    data = photos[name]
    ours = Preprocessor(spec).from_bytes(data)
    expected = reference(data)
    assert ours.shape == expected.shape == (3, 224, 224) and ours.dtype == np.float32
    assert np.abs(ours - expected).max() <= TOLERANCE


def test_every_format_and_mode_matches_open_clip(spec, reference, photos):
    photo = Image.open(io.BytesIO(photos["coffee"]))
    pre = Preprocessor(spec)
    diffs = {}
    for name, data in variants(photo).items():
        mode = Image.open(io.BytesIO(data)).mode
        diffs[f"{name} ({mode})"] = float(np.abs(pre.from_bytes(data) - reference(data)).max())
    assert max(diffs.values()) <= TOLERANCE, diffs
    modes = " ".join(diffs)
    for mode in ("(P)", "(L)", "(LA)", "(RGBA)", "(CMYK)", "(1)", "(I;16)"):
        assert mode in modes  # each pixel mode was really exercised


def test_animated_gif_uses_first_frame(spec, reference, photos):
    photo = Image.open(io.BytesIO(photos["cat"])).convert("RGB")
    frames = [photo, photo.rotate(90), photo.rotate(180)]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    assert Image.open(io.BytesIO(data)).n_frames == 3
    assert np.abs(Preprocessor(spec).from_bytes(data) - reference(data)).max() <= TOLERANCE


def test_fp16_output_is_the_rounded_fp32_result(spec, photos):
    fp32 = Preprocessor(spec).from_bytes(photos["rocket"])
    fp16 = Preprocessor(spec, dtype="float16").from_bytes(photos["rocket"])
    assert fp16.dtype == np.float16 and np.array_equal(fp16, fp32.astype(np.float16))


def test_squash_resize_mode_matches_open_clip(photos):
    import open_clip

    spec = PreprocessSpec(image_size=(64, 64), resize_mode="squash", interpolation="bilinear")
    transform = open_clip.image_transform(64, is_train=False, resize_mode="squash", interpolation="bilinear")
    data = photos["astronaut"]
    expected = transform(Image.open(io.BytesIO(data))).numpy()
    assert np.abs(Preprocessor(spec).from_bytes(data) - expected).max() <= TOLERANCE


@pytest.mark.parametrize(
    "model, tag",
    [
        ("PE-Core-bigG-14-448", "meta"),  # squash, bilinear, mean/std 0.5, 448 px
        ("MobileCLIP2-S2", "dfndr2b"),  # shortest side, bilinear, mean 0 / std 1, 256 px
        ("MobileCLIP2-L-14", "dfndr2b"),  # OpenAI mean/std, bicubic
        ("EVA02-E-14-plus", "laion2b_s9b_b144k"),
    ],
)
def test_each_family_transform_matches_open_clip(photos, model, tag):
    """The contract read from open_clip's configs for each family (no weights) drives our preprocessor;
    open_clip's own transform for that model and tag is the reference, on every sample photo."""
    import open_clip

    spec = contract_from_open_clip(model, tag).preprocess
    cfg = open_clip.get_pretrained_cfg(model, tag)
    size = open_clip.get_model_config(model)["vision_cfg"]["image_size"]
    transform = open_clip.image_transform(
        size,
        is_train=False,
        mean=cfg["mean"],
        std=cfg["std"],
        interpolation=cfg["interpolation"],
        resize_mode=cfg["resize_mode"],
    )
    assert spec.image_size == (size, size) and spec.mean == tuple(cfg["mean"])
    for data in photos.values():
        expected = transform(Image.open(io.BytesIO(data))).numpy()
        assert np.abs(Preprocessor(spec).from_bytes(data) - expected).max() <= TOLERANCE


@pytest.mark.parametrize(
    "data, fragment",
    [
        (b"", "empty image"),
        (b"this is not an image at all", "not a decodable image"),
        (b"<svg xmlns='http://www.w3.org/2000/svg'/>", "not a decodable image"),
        (b"<html><body>hi</body></html>", "not a decodable image"),
    ],
)
def test_bad_bytes(data, fragment):
    with pytest.raises(ImageError, match=fragment):
        decode_image(data)


def test_truncated_image(photos):
    with pytest.raises(ImageError, match="corrupt or truncated"):
        decode_image(photos["cat"][: len(photos["cat"]) // 2])


def test_corrupt_image(photos):
    data = bytearray(encode(Image.open(io.BytesIO(photos["cat"])), "PNG"))
    data[100:400] = b"\x00" * 300  # damage the compressed stream (CRC mismatch)
    with pytest.raises(ImageError, match="corrupt or truncated"):
        decode_image(bytes(data))


def test_decompression_bomb_refused_before_decoding():
    bomb = encode(Image.new("1", (15_000, 15_000)), "PNG")  # 225 megapixels in a few kB
    assert len(bomb) < 100_000
    with pytest.raises(ImageError, match="over the limit of 50000000 pixels"):
        decode_image(bomb)
    with pytest.raises(ImageError, match="over the limit of 100 pixels"):
        decode_image(encode(Image.new("RGB", (20, 20)), "PNG"), ImageLimits(max_pixels=100))


def test_byte_limit():
    with pytest.raises(ImageError, match="over the limit of 10 bytes"):
        decode_image(b"x" * 11, ImageLimits(max_bytes=10))


# Issue 27, rows 2 and 6: decoders on a budget. Each case failed before (decoded, at its cost).


def test_a_side_over_the_limit_is_refused_from_the_header():
    """A 1 x 50,000,000 PNG (97 KB) is within the pixel limit but cost 2 s and 430 MB to decode."""
    tall = encode(Image.new("1", (1, 70_000)), "PNG")
    with pytest.raises(ImageError, match="a side over the limit of 65535"):
        decode_image(tall)
    assert decode_image(encode(Image.new("L", (1, 60_000)), "PNG")).size == (1, 60_000)  # extreme, served


def _progressive(photos) -> bytes:
    buffer = io.BytesIO()
    Image.open(io.BytesIO(photos["cat"])).save(buffer, format="JPEG", progressive=True, quality=90)
    return buffer.getvalue()


def test_a_jpeg_with_too_many_scans_is_refused_before_decoding(photos):
    """20,000 tiny scans in 613 KB took 23 s of CPU: the scan count is read off the bytes first."""
    from clip_triton.preprocess import MAX_JPEG_SCANS, jpeg_scans

    data = _progressive(photos)
    assert 2 <= jpeg_scans(data) <= 20  # a real progressive JPEG: about 10
    assert decode_image(data).size == Image.open(io.BytesIO(data)).size
    start = data.rindex(b"\xff\xda")  # the last scan, repeated until the count is over the limit
    hostile = data[:start] + data[start:-2] * (MAX_JPEG_SCANS + 1) + data[-2:]
    with pytest.raises(ImageError, match=f"scans, over the limit of {MAX_JPEG_SCANS}"):
        decode_image(hostile)


def test_decoding_stops_at_its_cpu_budget(photos):
    """The decoder is fed block by block from a reader that charges this thread's CPU time: past the
    budget the item fails with the reason, and nothing else (a fake clock stands for a slow decode)."""
    from clip_triton import preprocess as P

    data = encode(Image.open(io.BytesIO(photos["cat"])).resize((1600, 1600)), "PNG")
    assert len(data) > 4 * P.DECODE_BLOCK  # several blocks, so the budget is checked mid-decode
    ticks = iter(range(10_000))
    real = P._Budgeted

    class Slow(real):
        def __init__(self, data, budget_s):
            super().__init__(data, budget_s, clock=lambda: float(next(ticks)))  # one second per read

    P._Budgeted = Slow
    try:
        with pytest.raises(ImageError, match="CPU budget of"):
            decode_image(data)
    finally:
        P._Budgeted = real
    assert decode_image(data).size == (1600, 1600)  # the real clock: well within the budget
    limits = ImageLimits()
    assert limits.decode_budget_s(2_000_000) == pytest.approx(2.5)  # 0.5 s + 1 s per MB
