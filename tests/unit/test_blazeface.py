"""BlazeFaceDetector on real UTKFace chips and on a scene of pasted chips; its config option."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np
import pytest
from benchmarks.scenes import compose
from pydantic import ValidationError

from agegender.config import PreprocessParams
from agegender.faces import BLAZEFACE_CHIP_BOX, BlazeFaceDetector, crop_chip, detect_or_fallback, make_detector
from tests.conftest import utkface_files


@pytest.fixture(scope="module")
def detector() -> BlazeFaceDetector:
    return BlazeFaceDetector()


@pytest.fixture(scope="module")
def chips() -> list[np.ndarray]:
    return [cv2.imread(str(path)) for path in utkface_files(12)]


def test_finds_the_face_of_real_chips(detector: BlazeFaceDetector, chips: list[np.ndarray]) -> None:
    found = [detector.detect(chip) for chip in chips]
    assert sum(bool(boxes) for boxes in found) >= 11, [len(b) for b in found]
    for boxes in filter(None, found):
        top = boxes[0]
        assert 0.5 <= top.score <= 1.0
        assert abs(top.x + top.w / 2 - 100) < 40 and abs(top.y + top.h / 2 - 100) < 40  # turned faces sit aside
        assert top.w >= 120  # the chip's face, not an eye
        assert len(top.landmarks) == 6
        (rx, ry), (lx, ly), _nose, (_mx, my) = top.landmarks[:4]
        assert rx < lx  # the person's right eye is on the image's left
        assert max(ry, ly) < my  # eyes above the mouth


def test_finds_each_face_pasted_into_a_scene(detector: BlazeFaceDetector, chips: list[np.ndarray]) -> None:
    scene, pasted = compose(chips[:3], np.random.default_rng(1))
    boxes = detector.detect(scene)
    assert len(boxes) == 3, boxes
    for x, y, w, h in pasted:
        inside = [b for b in boxes if x <= b.x + b.w / 2 <= x + w and y <= b.y + b.h / 2 <= y + h]
        assert len(inside) == 1 and inside[0].w >= 0.5 * w


def test_finds_small_faces_in_a_photo_through_tiles(detector: BlazeFaceDetector, chips: list[np.ndarray]) -> None:
    """80 px faces on 640x480: a few pixels in one 128 px look at the whole photo; the tiles find them."""
    photo = np.clip(np.random.default_rng(2).normal(110, 25, (480, 640, 3)), 0, 255).astype(np.uint8)
    pasted = [(40, 60), (300, 330), (520, 200)]
    for chip, (x, y) in zip(chips[3:6], pasted, strict=True):
        photo[y : y + 80, x : x + 80] = cv2.resize(chip, (80, 80), interpolation=cv2.INTER_AREA)
    boxes = detector.detect(photo)
    for x, y in pasted:
        assert any(x <= b.x + b.w / 2 <= x + 80 and y <= b.y + b.h / 2 <= y + 80 for b in boxes), (x, y, boxes)


def test_a_chip_and_the_same_face_in_a_scene_crop_alike(detector: BlazeFaceDetector, chips: list[np.ndarray]) -> None:
    """Training crops chips, serving crops faces in photos: the second look boxes both alike."""
    for chip in chips[:6]:
        scene = np.full((240, 600, 3), 90, np.uint8)
        scene[40:200, 220:380] = cv2.resize(chip, (160, 160), interpolation=cv2.INTER_AREA)
        on_chip, in_scene = detector.detect(chip)[0], detector.detect(scene)[0]
        k = 160 / 200  # chip pixels -> scene pixels
        cx, cy = on_chip.x + on_chip.w / 2, on_chip.y + on_chip.h / 2
        assert abs(220 + cx * k - (in_scene.x + in_scene.w / 2)) < 8
        assert abs(40 + cy * k - (in_scene.y + in_scene.h / 2)) < 8
        assert abs(on_chip.w * k / in_scene.w - 1) < 0.12


def test_large_blank_and_tiny_images(detector: BlazeFaceDetector, chips: list[np.ndarray]) -> None:
    canvas = np.full((3000, 4000, 3), 127, np.uint8)
    assert detector.detect(canvas) == []
    assert detector.detect(np.zeros((1, 1), np.uint8)) == []
    canvas[1000:2200, 2500:3700] = cv2.resize(chips[0], (1200, 1200))
    top = detector.detect(canvas)[0]  # found after the downscale, in original pixels
    assert 2500 <= top.x + top.w / 2 <= 3700 and 1000 <= top.y + top.h / 2 <= 2200


def test_falls_back_to_its_own_chip_box(detector: BlazeFaceDetector) -> None:
    box, used = detect_or_fallback(detector, np.full((200, 200, 3), 127, np.uint8))
    assert used and abs(box.w / 200 - BLAZEFACE_CHIP_BOX[2]) < 0.01
    crop, used = crop_chip(detector, np.full((200, 200, 3), 127, np.uint8), margin=0.0, size=48)
    assert used and crop.shape == (48, 48, 3)


def test_made_by_name_and_unknown_model_named() -> None:
    assert isinstance(make_detector("blazeface"), BlazeFaceDetector)
    assert make_detector("blazeface", model="full").size == 192
    with pytest.raises(ValueError, match="'short', 'full'"):
        BlazeFaceDetector(model="long")


def test_config_accepts_blazeface_and_names_the_choices() -> None:
    assert PreprocessParams(detector="blazeface").detector == "blazeface"
    with pytest.raises(ValidationError, match="blazeface"):
        PreprocessParams(detector="yolo")


def test_detecting_loads_no_tensorflow() -> None:
    code = (
        "import sys, numpy as np; from agegender.faces import BlazeFaceDetector; "
        "BlazeFaceDetector().detect(np.zeros((64, 64, 3), np.uint8)); sys.exit('tensorflow' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_threads_building_detectors_at_once_load_the_model_one_at_a_time(monkeypatch) -> None:
    """Preprocessing and the service build a detector per thread, and OpenCV's TFLite importer is not
    thread-safe on first use: two loads at once failed with "Unsupported operator type RELU" or crashed."""
    read, loading, most, count = cv2.dnn.readNetFromTFLite, [], [], threading.Lock()

    def spied(path: str):  # the real load, slowed so that overlapping calls would show
        with count:
            loading.append(path)
            most.append(len(loading))
        time.sleep(0.05)
        try:
            return read(path)
        finally:
            with count:
                loading.pop()

    monkeypatch.setattr(cv2.dnn, "readNetFromTFLite", spied)
    barrier = threading.Barrier(4)
    with ThreadPoolExecutor(4) as pool:
        detectors = list(pool.map(lambda _: (barrier.wait(), BlazeFaceDetector())[1], range(4)))
    assert len(most) == 4 and max(most) == 1, most
    assert all(d.detect(np.zeros((64, 64, 3), np.uint8)) == [] for d in detectors)
