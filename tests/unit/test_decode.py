"""The one image loader: every supported kind of image decodes, every bad input is refused by name."""

from __future__ import annotations

import io
import zlib
from dataclasses import replace

import cv2
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from agegender.images import FILE_LIMITS, ImageError, ImageLimits, decode_image, open_image, read_image
from agegender.render import draw_faces, encode_jpeg
from tests.conftest import utkface_files

LIMITS = ImageLimits(
    max_bytes=10 * 2**20, max_pixels=40_000_000, max_bytes_name="test.bytes", max_pixels_name="test.pixels"
)


def pil_bytes(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def gradient(mode: str = "RGB", size=(48, 32)) -> Image.Image:
    w, h = size
    rgb = np.zeros((h, w, 3), np.uint8)
    rgb[..., 0] = np.linspace(0, 255, w, dtype=np.uint8)[None, :]
    rgb[..., 1] = np.linspace(0, 255, h, dtype=np.uint8)[:, None]
    rgb[..., 2] = 200
    return Image.fromarray(rgb).convert(mode)


FORMAT_MODES = [(fmt, mode) for fmt in ("JPEG", "PNG", "WEBP", "BMP") for mode in ("RGB", "L", "RGBA", "P")]


# JPEG has no alpha or palette: PIL refuses to write those.
@pytest.mark.parametrize(("fmt", "mode"), [(f, m) for f, m in FORMAT_MODES if not (f == "JPEG" and m in ("RGBA", "P"))])
def test_every_format_and_mode_decodes_to_bgr_uint8(fmt, mode):
    options = {"lossless": True} if fmt == "WEBP" else {}
    image = decode_image(pil_bytes(gradient(mode), fmt, **options), LIMITS)
    assert image.shape == (32, 48, 3) and image.dtype == np.uint8
    if mode in ("RGB", "RGBA") and fmt != "JPEG":
        # PIL gives RGB; the model's convention is OpenCV's BGR.
        assert image[0, -1, 2] == 255 and image[0, 0, 0] == 200


def test_16_bit_png_is_scaled_not_clipped():
    gray = np.full((20, 30), 65535 // 2, np.uint16)
    ok, png = cv2.imencode(".png", gray)
    image = decode_image(png.tobytes(), LIMITS)
    assert image.shape == (20, 30, 3) and abs(int(image[0, 0, 0]) - 127) <= 1


def test_exif_rotation_is_applied():
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees: the stored 48x32 image is shown 32x48
    image = decode_image(pil_bytes(gradient(), "JPEG", exif=exif.tobytes()), LIMITS)
    assert image.shape == (48, 32, 3)


def test_real_utkface_chips_decode_exactly_as_opencv_does():
    """PIL and OpenCV share libjpeg-turbo here: the loader gives the pixels training always had."""
    for path in utkface_files(40):
        assert np.array_equal(read_image(path), cv2.imread(str(path), cv2.IMREAD_COLOR)), path.name


def bomb_png(side: int) -> bytes:
    """A valid PNG header claiming side x side pixels, with a tiny compressed body."""
    raw = zlib.compress(b"\x00" * (side + 1) * 64, 9)  # a few rows; the header is what matters

    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    header = side.to_bytes(4, "big") * 2 + bytes([8, 0, 0, 0, 0])
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", raw) + chunk(b"IEND", b"")


def test_jpeg_variants_decode_as_jpeg():
    """MPO (what many cameras write), progressive and CMYK JPEGs are JPEGs to a client."""
    photo, second = gradient(size=(64, 48)), gradient(size=(64, 48)).rotate(180)
    mpo = pil_bytes(photo, "MPO", save_all=True, append_images=[second])
    assert Image.open(io.BytesIO(mpo)).format == "MPO"
    plain = decode_image(pil_bytes(photo, "JPEG"), LIMITS)
    for data in (mpo, pil_bytes(photo, "JPEG", progressive=True), pil_bytes(photo.convert("CMYK"), "JPEG")):
        image = decode_image(data, LIMITS)
        assert image.shape == plain.shape and np.abs(image.astype(int) - plain.astype(int)).mean() < 3


def test_limits_are_named_as_the_caller_names_them():
    """A refusal names the setting to change, not the image library's own limit."""
    with pytest.raises(ImageError, match=r"more than test\.pixels = 40 megapixels") as err:
        decode_image(bomb_png(30000), LIMITS)
    assert err.value.status == 413 and "178956970" not in str(err.value)
    with pytest.raises(ImageError, match=r"3000x2000 \(6\.0 megapixels\), over test\.pixels = 4 megapixels"):
        decode_image(pil_bytes(gradient(size=(3000, 2000)), "PNG"), replace(LIMITS, max_pixels=4_000_000))
    with pytest.raises(ImageError, match=r"upload is 1\.0 MB, over test\.bytes = 0\.5 MB"):
        decode_image(b"\xff\xd8\xff" + bytes(2**20), replace(LIMITS, max_bytes=2**19))


def test_open_image_reads_the_header_only():
    """A request's images are sized up together before any is decoded."""
    assert open_image(bomb_png(12000), FILE_LIMITS).size == (12000, 12000)
    with pytest.raises(ImageError, match="not an image"):
        open_image(b"hello", LIMITS)
    with pytest.raises(ImageError, match="too large"):
        open_image(bomb_png(30000), LIMITS)


@pytest.mark.parametrize(
    ("data", "kwargs", "status", "words"),
    [
        (b"", {}, 400, "0 bytes"),
        (b"hello, this is not an image", {}, 415, "not an image"),
        (b"GIF89a" + b"\x00" * 100, {}, 415, "not an image"),
        (pil_bytes(gradient(), "GIF"), {}, 415, "GIF is not supported"),
        (pil_bytes(gradient(), "JPEG")[:200], {}, 400, "truncated"),
        (pil_bytes(gradient(), "PNG")[:-30], {}, 400, "truncated"),
        (bomb_png(30000), {}, 413, "too large: its header claims more than test.pixels"),
        (pil_bytes(gradient(size=(2000, 2000)), "PNG"), {"max_pixels": 1_000_000}, 413, "too large: 2000x2000"),
        (b"\xff" * 2000, {"max_bytes": 1000}, 413, "over test.bytes"),
    ],
    ids=[
        "empty",
        "text",
        "fake-gif",
        "gif",
        "truncated-jpeg",
        "truncated-png",
        "bomb",
        "too-many-pixels",
        "too-many-bytes",
    ],
)
def test_bad_input_is_refused_with_a_named_reason(data, kwargs, status, words):
    with pytest.raises(ImageError, match=words) as err:
        decode_image(data, replace(LIMITS, **kwargs))
    assert err.value.status == status


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.binary(max_size=4096),
    cut=st.integers(min_value=0, max_value=2000),
    flips=st.lists(st.integers(0, 2000), max_size=8),
)
def test_fuzzed_bytes_either_decode_or_raise_image_error(data, cut, flips):
    """Random bytes, and real images truncated or with flipped bytes: nothing but ImageError escapes."""
    real = bytearray(pil_bytes(gradient(), "PNG" if cut % 2 else "JPEG"))
    for index in flips:
        real[index % len(real)] ^= 0xFF
    for candidate in (data, bytes(real[: max(cut, 1)]), bytes(real)):
        try:
            image = decode_image(candidate, LIMITS)
        except ImageError:
            continue
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3


def test_draw_faces_leaves_the_input_alone_and_marks_each_box():
    image = np.full((200, 300, 3), 255, np.uint8)
    faces = [
        {"box": [20, 60, 80, 80], "age": 31.4, "gender": "female"},
        {"box": [180, 60, 80, 80], "age": 7.0, "gender": "male"},
    ]
    out = draw_faces(image, faces, footer="12.0 fps")
    assert (image == 255).all(), "the input image must not be drawn on"
    assert (out[100, 20] != 255).any() and (out[100, 180] != 255).any(), "box edges drawn"
    assert (out[100, 60] == 255).all(), "the face inside the box is not painted over"
    jpeg = encode_jpeg(out)
    assert jpeg[:2] == b"\xff\xd8" and cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR).shape == out.shape
