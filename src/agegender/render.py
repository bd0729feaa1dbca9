"""Overlays: face boxes with "age, gender" labels, drawn on a copy of the image."""

from __future__ import annotations

import cv2
import numpy as np

# BGR: orange for female, blue for male, so the two read apart at a glance.
COLOURS = {"female": (60, 120, 255), "male": (255, 160, 40)}


def face_label(face: dict) -> str:
    return f"{face['age']:.0f}, {face['gender']}"


def draw_faces(image: np.ndarray, faces: list[dict], *, footer: str | None = None) -> np.ndarray:
    """A copy of BGR `image` with each face's box and label; `footer` (e.g. fps) in the top-left corner."""
    out = image.copy()
    # Line and text scale follow the image size so labels stay readable on 200 px and 4000 px images.
    scale = max(min(out.shape[:2]) / 600.0, 0.4)
    thickness = max(int(round(2 * scale)), 1)
    for face in faces:
        x, y, w, h = face["box"]
        colour = COLOURS[face["gender"]]
        cv2.rectangle(out, (x, y), (x + w, y + h), colour, thickness)
        put_label(out, face_label(face), (x, y), colour, scale, thickness)
    if footer:
        put_label(out, footer, (0, 0), (40, 40, 40), scale, thickness, below=True)
    return out


def put_label(image, text, corner, colour, scale, thickness, below: bool = False) -> None:
    """Text on a filled box above the corner (inside the image when there is no room above)."""
    font = cv2.FONT_HERSHEY_SIMPLEX
    (tw, th), baseline = cv2.getTextSize(text, font, scale, thickness)
    x, y = max(corner[0], 0), corner[1]  # a box may stick out of the image; its label may not
    top = max(y, 0) if below or y - th - baseline - 4 < 0 else y - th - baseline - 4
    cv2.rectangle(image, (x, top), (x + tw + 4, top + th + baseline + 4), colour, cv2.FILLED)
    cv2.putText(image, text, (x + 2, top + th + 2), font, scale, (255, 255, 255), thickness, cv2.LINE_AA)


def encode_jpeg(image: np.ndarray, quality: int = 90) -> bytes:
    ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise ValueError(f"could not encode an image of shape {image.shape} as JPEG")
    return buf.tobytes()
