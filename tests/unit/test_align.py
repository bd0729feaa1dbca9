"""crop_face(align=True): the crop is turned so the eyes (the box's first two landmarks) are level."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest

from agegender.config import ModelSpec, PreprocessParams
from agegender.faces import BlazeFaceDetector, Box, crop_face
from agegender.images import read_image
from agegender.inference import ModelInfo, Predictor
from agegender.preprocess import crop_all
from tests.conftest import utkface_files
from tests.unit.test_same_input import RecordingModel


def dots(angle_deg: float) -> tuple[np.ndarray, Box]:
    """A grey image with a white and a black dot as eyes, 60 px apart at angle_deg, and its box."""
    img = np.full((300, 300, 3), 127, np.uint8)
    cx, cy, half = 150.0, 150.0, 30.0  # the eyes' midpoint at the box centre, the turn's centre
    dx, dy = half * math.cos(math.radians(angle_deg)), half * math.sin(math.radians(angle_deg))
    eyes = ((cx - dx, cy - dy), (cx + dx, cy + dy))
    cv2.circle(img, (round(eyes[0][0]), round(eyes[0][1])), 5, (255, 255, 255), -1)
    cv2.circle(img, (round(eyes[1][0]), round(eyes[1][1])), 5, (0, 0, 0), -1)
    return img, Box(100, 100, 100, 100, 1.0, eyes)


def centroid(crop: np.ndarray, value: int) -> tuple[float, float]:
    ys, xs = np.nonzero(np.all(crop == value, axis=2) if value in (0, 255) else crop[:, :, 0] == value)
    return float(xs.mean()), float(ys.mean())


@pytest.mark.parametrize("angle", [-25.0, -8.0, 12.0, 30.0])
def test_tilted_eyes_come_out_level_and_in_place(angle: float) -> None:
    img, box = dots(angle)
    crop = crop_face(img, box, margin=0.0, size=100, align=True)
    (wx, wy), (bx, by) = centroid(crop, 255), centroid(crop, 0)
    assert abs(wy - by) < 1.5 and abs((wy + by) / 2 - 49.5) < 1.5  # level, at the centre's height
    assert wx < bx and abs((wx + bx) / 2 - 49.5) < 1.5 and abs(bx - wx - 60) < 2  # order, centre, distance kept
    assert (crop[[0, -1]][:, [0, -1]] == 127).all()  # corners filled from the image, not left black


def test_level_eyes_and_boxes_without_landmarks_crop_unturned() -> None:
    img, box = dots(0.0)
    assert np.array_equal(
        crop_face(img, box, margin=0.2, size=64, align=True), crop_face(img, box, margin=0.2, size=64)
    )
    bare = Box(box.x, box.y, box.w, box.h)
    tilted, _ = dots(20.0)
    assert np.array_equal(
        crop_face(tilted, bare, margin=0.0, size=64, align=True), crop_face(tilted, bare, margin=0.0, size=64)
    )


def eye_angle(detector: BlazeFaceDetector, image: np.ndarray) -> float:
    (ax, ay), (bx, by) = detector.detect(image)[0].landmarks[:2]
    return math.degrees(math.atan2(by - ay, bx - ax))


def test_a_turned_real_face_comes_out_upright() -> None:
    """BlazeFace's eye keypoints on a real chip turned by 20 degrees undo the turn."""
    detector = BlazeFaceDetector()
    chip = cv2.imread(str(utkface_files(1, offset=5)[0]))
    canvas = cv2.copyMakeBorder(chip, 100, 100, 100, 100, cv2.BORDER_REPLICATE)
    turned = cv2.warpAffine(canvas, cv2.getRotationMatrix2D((199.5, 199.5), 20.0, 1.0), (400, 400))
    box = detector.detect(turned)[0]
    tilt = eye_angle(detector, canvas)
    assert eye_angle(detector, crop_face(turned, box, margin=0.5, size=200)) - tilt < -10.0  # turned, unaligned
    assert abs(eye_angle(detector, crop_face(turned, box, margin=0.5, size=200, align=True))) < 5.0


@pytest.mark.parametrize("detector", ["blazeface", "mtcnn"])
def test_training_and_serving_crops_are_aligned_alike(detector: str) -> None:
    """preprocess.align reaches preprocessing, the saved spec, predict_chips and predict_images."""
    params = PreprocessParams(workers=1, detector=detector, align=True)
    files = utkface_files(4, offset=2)
    trained, fell_back = crop_all(files, params)
    assert not fell_back.any()
    unaligned, _ = crop_all(files, params.model_copy(update={"align": False}))
    assert not np.array_equal(trained, unaligned)  # real faces are never exactly level
    spec = ModelSpec(
        image_size=params.image_size,
        margin=params.margin,
        align=params.align,
        detector=detector,
        backbone="compact",
        age_head="dldl",
        data_version="test",
        trained_on="real",
    )
    spec = ModelSpec.model_validate_json(spec.model_dump_json())  # as saved beside the weights
    model = RecordingModel()
    predictor = Predictor(model, spec, ModelInfo(name="test", version=None, data_version="test", uri="test"))
    predictor.predict_chips([read_image(path) for path in files])
    np.testing.assert_array_equal(model.inputs[-1], trained.astype(np.float32))
    for path, crop in zip(files, trained, strict=True):
        predictor.predict_images([read_image(path)])
        assert any(np.array_equal(served, crop.astype(np.float32)) for served in model.inputs[-1]), path.name


def test_specs_saved_before_alignment_load_unaligned() -> None:
    old = '{"image_size": 64, "margin": 0.0, "detector": "mtcnn", "backbone": "compact", "age_head": "dldl",'
    assert ModelSpec.model_validate_json(old + '"data_version": "x", "trained_on": "real"}').align is False
