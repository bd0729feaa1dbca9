"""Test scenes: real UTKFace chips pasted onto larger backgrounds at known positions.

Used by the service benchmark and the service tests, so "several faces per image, where
they are known" means the same thing in both.
"""

from __future__ import annotations

import cv2
import numpy as np


def background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A smooth colour gradient with noise: no faces, some texture for the detector to reject."""
    top, bottom = rng.integers(30, 225, 3), rng.integers(30, 225, 3)
    ramp = np.linspace(0.0, 1.0, height)[:, None, None]
    image = (top * (1 - ramp) + bottom * ramp).repeat(width, axis=1)
    image += rng.normal(0, 8, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def compose(
    chips: list[np.ndarray], rng: np.random.Generator, *, side: int = 160, gap: int = 40
) -> tuple[np.ndarray, list[tuple[int, int, int, int]]]:
    """One row of chips, each resized to side x side, on a background; returns the image and each chip's box."""
    width = gap + len(chips) * (side + gap)
    height = side + 2 * gap
    image = background(rng, height, width)
    boxes = []
    for index, chip in enumerate(chips):
        x = gap + index * (side + gap) + int(rng.integers(-gap // 3, gap // 3 + 1))
        y = gap + int(rng.integers(-gap // 2, gap // 2 + 1))
        image[y : y + side, x : x + side] = cv2.resize(chip, (side, side), interpolation=cv2.INTER_AREA)
        boxes.append((x, y, side, side))
    return image, boxes


def match_faces(found: list[dict], boxes: list[tuple[int, int, int, int]]) -> list[dict | None]:
    """For each known chip box, the detected face whose centre lies inside it (the most confident), or None."""
    matches = []
    for x, y, w, h in boxes:
        inside = [
            f
            for f in found
            if x <= f["box"][0] + f["box"][2] / 2 <= x + w and y <= f["box"][1] + f["box"][3] / 2 <= y + h
        ]
        matches.append(max(inside, key=lambda f: f["detection_score"]) if inside else None)
    return matches
