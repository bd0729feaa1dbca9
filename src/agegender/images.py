"""The one image loader: bytes or a file -> BGR uint8, used by validation, preprocessing,
evaluation, the CLI and the service, so every entry point gives the model the same pixels.

Every refusal is an ImageError that names the problem and, for a size, the setting it is over.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from agegender.faces import to_bgr

IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "BMP")
# MPO (multi-picture JPEG, written by many cameras) is a JPEG whose first picture is the photo.
JPEG_CONTAINERS = ("JPEG", "MPO")


class ImageError(ValueError):
    """An input that is not a usable image; `status` is the HTTP status a service answers with."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class ImageLimits:
    """Refusal thresholds, with the names of the settings they come from (each refusal names one)."""

    max_bytes: int
    max_pixels: int
    max_bytes_name: str = "agegender.images.FILE_LIMITS.max_bytes"
    max_pixels_name: str = "agegender.images.FILE_LIMITS.max_pixels"


# PIL will not open more pixels than this (2 x Image.MAX_IMAGE_PIXELS): no limit of ours may be higher.
MAX_PIXEL_LIMIT = 150_000_000
# Files on disk are the project's own data: the limits only stop a decompression bomb.
FILE_LIMITS = ImageLimits(max_bytes=2**30, max_pixels=MAX_PIXEL_LIMIT)


def read_image(path: Path, limits: ImageLimits = FILE_LIMITS) -> np.ndarray:
    """An image file as BGR uint8, decoded exactly as an upload of the same bytes would be."""
    return decode_image(Path(path).read_bytes(), limits)


def decode_image(data: bytes, limits: ImageLimits) -> np.ndarray:
    """Image bytes (JPEG/MPO, PNG, WebP, BMP; gray, RGBA, CMYK, 16-bit) -> BGR uint8, EXIF rotation applied."""
    return load_image(open_image(data, limits))


def open_image(data: bytes, limits: ImageLimits) -> Image.Image:
    """The image's header, read and checked against the limits; no pixel is decoded yet.

    So a decompression bomb (a few KB that claim 30000x30000 pixels) costs no memory, and a
    request's images can be checked together before any of them is decoded.
    """
    if not data:
        raise ImageError("empty upload: 0 bytes")
    if len(data) > limits.max_bytes:
        raise ImageError(
            f"upload is {len(data) / 2**20:.1f} MB, over {limits.max_bytes_name} = {limits.max_bytes / 2**20:g} MB",
            413,
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:
        # PIL refuses over 179 megapixels, above every limit of ours (MAX_PIXEL_LIMIT), so it is over ours too.
        raise ImageError(
            f"image is too large: its header claims more than {limits.max_pixels_name} = "
            f"{limits.max_pixels / 1e6:g} megapixels",
            status=413,
        ) from None
    except (OSError, ValueError, SyntaxError):
        if sniffed := sniff_format(data):
            raise ImageError(f"image is truncated or corrupt: a {sniffed} header with unreadable data") from None
        raise ImageError(f"not an image: the bytes are none of {', '.join(IMAGE_FORMATS)}", status=415) from None
    if image.format not in IMAGE_FORMATS and image.format not in JPEG_CONTAINERS:
        raise ImageError(f"image format {image.format} is not supported; send one of {', '.join(IMAGE_FORMATS)}", 415)
    width, height = image.size
    if width * height > limits.max_pixels:
        raise ImageError(
            f"image is too large: {width}x{height} ({width * height / 1e6:.1f} megapixels), "
            f"over {limits.max_pixels_name} = {limits.max_pixels / 1e6:g} megapixels",
            status=413,
        )
    return image


def load_image(image: Image.Image) -> np.ndarray:
    """The pixels of an image from `open_image`, upright (phones store photos sideways), as BGR uint8."""
    try:
        image.load()
        return pil_to_bgr(ImageOps.exif_transpose(image))
    except (OSError, ValueError, SyntaxError) as err:
        raise ImageError(f"image is truncated or corrupt ({image.format}): {err}") from None


def sniff_format(data: bytes) -> str | None:
    """The format named by the leading magic bytes, to tell a damaged image from something else."""
    signatures = {b"\xff\xd8\xff": "JPEG", b"\x89PNG\r\n\x1a\n": "PNG", b"BM": "BMP"}
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return next((name for magic, name in signatures.items() if data.startswith(magic)), None)


def pil_to_bgr(image) -> np.ndarray:
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit gray: keep the depth so to_bgr scales it instead of clipping at 255.
        return to_bgr(np.asarray(image, dtype=np.int64).clip(0, 65535).astype(np.uint16))
    if image.mode not in ("RGB", "L"):
        image = image.convert("RGBA" if "A" in image.mode or "transparency" in image.info else "RGB")
    return to_bgr(np.asarray(image), rgb=True)
