"""Procedurally drawn cartoon faces: the embedded demo dataset (no real people).

Age and gender drive visible features (head proportions, eye size, wrinkles, greying,
hair length, jaw shape, brows, beard) so a small CNN can learn something from them;
pose, lighting, skin tone and background are noise.

Determinism: every image has its own generator seeded with (seed, index), only uniform
draws are used, and all pixel maths after drawing is integer, so the same
(count, seed, image_size) writes byte-identical JPEGs. Faces are drawn at twice the
output size and averaged down 2x2 in integers, which anti-aliases without relying on
OpenCV's CPU-dispatched float resizers.
"""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np

JPEG_QUALITY = 90
_SHIFT = 4  # sub-pixel bits for cv2 drawing, so small features keep their shape
_ANGLES = np.linspace(0.0, 2.0 * math.pi, 49)
# Rounded so a last-bit libm difference between machines cannot move a pixel.
_COS = np.round(np.cos(_ANGLES), 9)
_SIN = np.round(np.sin(_ANGLES), 9)

# BGR base skin tone per race (0 white, 1 black, 2 asian, 3 indian, 4 other).
_SKIN = ((178, 200, 236), (62, 86, 124), (152, 190, 228), (98, 138, 188), (128, 166, 212))
# BGR hair colours: black, dark brown, brown, blond, red. Only race 0 gets the light ones.
_HAIR = ((18, 18, 22), (26, 36, 52), (40, 62, 96), (80, 140, 190), (40, 64, 140))
_GREY = np.array((212, 212, 218))

Color = tuple[int, int, int]


class _Pen:
    """Draws in face-local units (1.0 = canvas side, origin between the eyes)."""

    def __init__(self, img: np.ndarray, cx: float, cy: float, scale: float, deg: int):
        self.img, self.size = img, img.shape[0]
        cos, sin = round(math.cos(math.radians(deg)), 9), round(math.sin(math.radians(deg)), 9)
        self.m = np.array([[cos, -sin], [sin, cos]]) * scale * self.size
        self.origin = np.array([cx, cy]) * self.size
        self.scale, self.deg = scale, deg

    def px(self, pts: np.ndarray) -> np.ndarray:
        p = np.asarray(pts, dtype=np.float64).reshape(-1, 2)
        # Spelled out rather than `@`, which may go through BLAS and its CPU-specific rounding.
        x = p[:, 0] * self.m[0, 0] + p[:, 1] * self.m[0, 1] + self.origin[0]
        y = p[:, 0] * self.m[1, 0] + p[:, 1] * self.m[1, 1] + self.origin[1]
        xy = np.stack([x, y], axis=1)
        return np.round(xy * (1 << _SHIFT)).astype(np.int32)

    def width(self, w: float) -> int:
        return max(1, round(w * self.scale * self.size))

    def poly(self, pts: np.ndarray, color: Color, thick: float = 0.0) -> None:
        p = [self.px(pts)]
        if thick <= 0:
            cv2.fillPoly(self.img, p, color, cv2.LINE_AA, _SHIFT)
        else:
            cv2.polylines(self.img, p, False, color, self.width(thick), cv2.LINE_AA, _SHIFT)

    def ellipse(
        self,
        x: float,
        y: float,
        ax: float,
        ay: float,
        color: Color,
        thick: float = 0.0,
        start: int = 0,
        end: int = 360,
    ) -> None:
        k = self.scale * self.size * (1 << _SHIFT)
        axes = (max(1, round(ax * k)), max(1, round(ay * k)))
        w = -1 if thick <= 0 else self.width(thick)
        c = tuple(int(v) for v in self.px([x, y])[0])
        cv2.ellipse(self.img, c, axes, self.deg, start, end, color, w, cv2.LINE_AA, _SHIFT)


def _shade(color: Color | np.ndarray, f: float, add: Color = (0, 0, 0)) -> Color:
    return tuple(int(min(255, max(0, round(c * f + a)))) for c, a in zip(color, add, strict=True))


def _head_outline(fw: float, top: float, crown_w: float, chin: float, jaw: float) -> np.ndarray:
    """Round cranium above the eye line, superellipse below: higher `jaw` = squarer jaw."""
    pts = []
    for c, s in zip(_COS[:-1], _SIN[:-1], strict=True):
        if s < 0:
            pts.append((crown_w * c, top * s))
        else:  # lower half: |x/fw|^jaw + |y/chin|^jaw = 1
            e = 2.0 / jaw
            pts.append((fw * math.copysign(abs(c) ** e, c), chin * s**e))
    return np.array(pts)


def _draw_face(img: np.ndarray, rng: np.random.Generator, age: int, gender: int, race: int) -> None:
    u = rng.uniform
    size = img.shape[0]
    male = gender == 0
    grow = min(1.0, (age - 1) / 17)  # 0 for a baby, 1 once grown up
    old = float(np.clip((age - 35) / 50, 0, 1))

    # Background: a muted colour with coarse random blotches (exact integer resize).
    tint = rng.integers(70, 220, size=3)
    grid = np.clip(tint + rng.integers(-35, 36, size=(3, 3, 3)), 0, 255).astype(np.uint8)
    img[:] = cv2.resize(grid, (size, size), interpolation=cv2.INTER_LINEAR_EXACT)

    pen = _Pen(
        img,
        0.5 + u(-0.04, 0.04),
        0.44 + u(-0.03, 0.03),
        1.08 * u(0.92, 1.08),
        int(rng.integers(-9, 10)),
    )
    skin = _shade(_SKIN[race], u(0.88, 1.1), tuple(int(v) for v in rng.integers(-8, 9, 3)))
    dark_skin = _shade(skin, 0.72)

    hair_base = np.array(_HAIR[int(rng.integers(0, 5 if race == 0 else 2))], dtype=float)
    grey = float(np.clip((age - 32) / 38 + u(-0.15, 0.15), 0, 1))
    hair = _shade(hair_base * (1 - grey) + _GREY * grey, u(0.85, 1.15))

    # Proportions: babies have a big cranium over a short face; adults a long face.
    fw = 0.235 + 0.02 * male + u(-0.01, 0.01) - 0.01 * grow
    top = 0.33 - 0.05 * grow
    crown_w = fw + 0.035 - 0.02 * grow
    chin = 0.20 + (0.14 + 0.015 * male) * grow + 0.015 * old + u(-0.01, 0.01)
    jaw = 2.0 + (0.9 * male + 0.1) * grow + u(-0.1, 0.1)
    yaw = u(-0.02, 0.02)  # features slide sideways as if the head were slightly turned

    long_hair = age >= 3 and (u() < 0.85 if not male else u() < 0.07)
    hair_end = chin + u(0.05, 0.25) * grow
    if long_hair:
        w = crown_w + 0.05
        back = [(w * c, (top + 0.04) * s) for c, s in zip(_COS[24:49], _SIN[24:49], strict=True)]
        pen.poly(np.array(back + [(w + 0.02, hair_end), (-w - 0.02, hair_end)]), hair)

    clothes = tuple(int(v) for v in rng.integers(20, 235, 3))
    pen.ellipse(0, chin + 0.38, 0.36 + 0.05 * male, 0.24, clothes)
    neck = 0.08 + 0.025 * male
    pen.poly(
        np.array([(-neck, 0.1), (neck, 0.1), (neck, chin + 0.2), (-neck, chin + 0.2)]),
        _shade(skin, 0.85),
    )
    for side in (-1, 1):
        pen.ellipse(side * (fw + 0.005), 0.04, 0.03, 0.055 + 0.01 * grow, _shade(skin, 0.9))
    outline = _head_outline(fw, top, crown_w, chin, jaw)
    pen.poly(outline, skin)

    nose_len = 0.065 + 0.06 * grow + 0.01 * old
    mouth_y = nose_len + 0.045 + 0.02 * grow
    mouth_w = 0.035 + 0.03 * grow + 0.005 * male

    if male and age >= 17 and u() < 0.35:  # beard or stubble
        beard = outline[outline[:, 1] > mouth_y - 0.045]
        color = hair if u() < 0.5 else _shade(np.array(skin) * 0.6 + np.array(hair) * 0.4, 1.0)
        pen.poly(beard, color)

    # Wrinkles deepen and multiply with age.
    wrinkle = _shade(skin, 0.78 - 0.15 * old)
    lw = 0.004 + 0.004 * old
    for i in range(int(np.clip((age - 28) / 11, 0, 5))):
        y = -0.13 - 0.028 * i
        pen.ellipse(yaw, y + 0.05, 0.09 + 0.01 * i, 0.05, wrinkle, lw, 200, 340)
    if age > 32:
        for side in (-1, 1):
            pts = [
                (side * (0.04 + 0.005 * grow) + yaw, nose_len - 0.01),
                (side * (mouth_w + 0.02) + yaw, mouth_y + 0.01 + 0.03 * old),
            ]
            pen.poly(np.array(pts), wrinkle, lw)

    eye_x, eye_w = 0.1, 0.052 - 0.012 * grow
    eye_h = (0.032 - 0.011 * grow) * (1 - 0.3 * old)
    iris = (150, 110, 60) if race == 0 and u() < 0.4 else (30, 45, 70)  # blue or brown
    for side in (-1, 1):
        x = side * eye_x + yaw
        if age > 40:  # crow's feet and bags
            inner, outer = x + side * (eye_w + 0.01), x + side * (eye_w + 0.04)
            for k in (-1, 0, 1):
                pen.poly(np.array([(inner, 0.005 * k), (outer, 0.018 * k)]), wrinkle, lw)
            pen.ellipse(x, eye_h + 0.005, eye_w * 0.8, 0.015 + 0.01 * old, wrinkle, lw, 20, 160)
        pen.ellipse(x, 0, eye_w, eye_h, (235, 240, 240))
        pen.ellipse(x + yaw * 0.5, 0.002, eye_h * 0.95, eye_h * 0.95, iris)
        pen.ellipse(x + yaw * 0.5, 0.002, eye_h * 0.45, eye_h * 0.45, (15, 15, 15))
        pen.ellipse(x, 0, eye_w, eye_h, (25, 25, 30), 0.006 + 0.003 * (not male), 180, 360)
        # Brows: thick and low for men, thin and arched for women.
        brow = _shade(hair_base * (1 - grey * 0.7) + _GREY * grey * 0.7, 0.8)
        by = -eye_h - 0.03 - 0.01 * (not male)
        bw = 0.017 + 0.006 * old if male else 0.008
        bw *= 0.6 + 0.4 * grow
        pen.ellipse(x, by + 0.02, eye_w + 0.012, 0.02 + 0.008 * (not male), brow, bw, 195, 345)

    # Nose: shading down one side, nostrils, wider for adults and men.
    nose_w = 0.022 + 0.014 * grow + 0.005 * male
    pen.poly(np.array([(0.015 + yaw, 0.01), (0.02 + yaw, nose_len * 0.8)]), dark_skin, 0.008)
    pen.ellipse(yaw * 1.5, nose_len, nose_w, 0.016, dark_skin, 0.006, 0, 180)
    for side in (-1, 1):
        pen.ellipse(side * nose_w * 0.55 + yaw * 1.5, nose_len, 0.009, 0.005, _shade(skin, 0.45))

    lip_h = (0.013 + 0.006 * (not male)) * (1 - 0.4 * old)
    lipstick = not male and age >= 16 and u() < 0.5
    lips = _shade(skin, 0.55, (30, 30, 140)) if lipstick else _shade(skin, 0.78, (0, 0, 25))
    smile = u(-0.01, 0.015)
    pen.ellipse(yaw, mouth_y, mouth_w, lip_h, lips)
    pen.poly(
        np.array([(-mouth_w + yaw, mouth_y - smile), (yaw, mouth_y), (mouth_w + yaw, mouth_y - smile)]),
        (40, 35, 60),
        0.006,
    )

    # Hair on top; men recede and may go bald with age.
    if age <= 2:
        hair_line, volume = -0.17, 0.0
    else:
        hair_line = -0.15 - u(0.0, 0.03) - (0.08 * old * u() if male else 0)
        volume = u(0.015, 0.05)
    bald = male and age > 45 and u() < old
    w, h = crown_w + volume, top + volume
    cap = [(w * c, h * s) for c, s in zip(_COS[24:49], _SIN[24:49], strict=True)]
    side_y = 0.02 if long_hair else -0.04
    front = [
        (w, side_y),
        (fw * 0.9, hair_line + 0.06),
        (fw * 0.3, hair_line),
        (-fw * 0.2, hair_line + 0.01),
        (-fw * 0.9, hair_line + 0.05),
        (-w, side_y),
    ]
    if bald:  # a horseshoe of hair round the sides only
        for side in (-1, 1):
            pen.ellipse(side * (crown_w - 0.005), -0.05, 0.022, 0.075, hair)
    else:
        pen.poly(np.array(cap + front), hair)
    if long_hair:
        # Side locks over the cheeks, so long hair shows even in front of the shoulders.
        lock = np.array(
            [
                (w + 0.005, -0.05),
                (w + 0.03, hair_end),
                (fw, hair_end),
                (fw - 0.025, 0.05),
                (fw - 0.02, -0.08),
            ]
        )
        for side in (-1, 1):
            pen.poly(lock * (side, 1), hair)


def _finish(canvas: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Downsample 2x2, add a lighting gradient and sensor noise, all in integers."""
    s = canvas.shape[0] // 2
    c = canvas.astype(np.int32)
    img = (c[0::2, 0::2] + c[1::2, 0::2] + c[0::2, 1::2] + c[1::2, 1::2] + 2) >> 2
    dx, dy = (int(v) for v in rng.integers(-70, 71, 2))
    ramp = np.arange(s, dtype=np.int32) - s // 2
    gain = 256 + (ramp[None, :] * dx + ramp[:, None] * dy) // s + int(rng.integers(-30, 31))
    img = (img * gain[:, :, None]) >> 8
    img += rng.integers(-6, 7, size=img.shape, dtype=np.int32)
    return np.clip(img, 0, 255).astype(np.uint8)


def render_face(rng: np.random.Generator, age: int, gender: int, race: int, image_size: int) -> np.ndarray:
    """One BGR face image of side `image_size`."""
    canvas = np.zeros((2 * image_size, 2 * image_size, 3), np.uint8)
    _draw_face(canvas, rng, age, gender, race)
    return _finish(canvas, rng)


def generate_demo(out_dir: Path, *, count: int, seed: int, image_size: int) -> list[dict]:
    """Write `count` demo face images as JPEG files into out_dir and return one row per image:
    {"file": "<name>.jpg", "age": int, "gender": int, "race": int}."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(count):
        rng = np.random.default_rng([seed % 2**64, i])  # SeedSequence wants non-negative ints
        age, gender, race = (int(rng.integers(lo, hi)) for lo, hi in ((1, 91), (0, 2), (0, 5)))
        img = render_face(rng, age, gender, race, image_size)
        ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
        if not ok:
            raise RuntimeError(f"JPEG encoding failed for demo image {i}")
        name = f"demo_{i:05d}_a{age}_g{gender}_r{race}.jpg"
        (out_dir / name).write_bytes(buf.tobytes())
        rows.append({"file": name, "age": age, "gender": gender, "race": race})
    return rows
