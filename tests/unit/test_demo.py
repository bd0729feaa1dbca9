"""The procedural demo faces: deterministic, well labelled, and carrying age/gender signal."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest

from agegender.data.demo import generate_demo


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_same_arguments_give_byte_identical_files(tmp_path: Path) -> None:
    first = generate_demo(tmp_path / "a", count=12, seed=3, image_size=64)
    second = generate_demo(tmp_path / "b", count=12, seed=3, image_size=64)
    assert first == second
    assert _files(tmp_path / "a") == _files(tmp_path / "b")


def test_different_seeds_differ(tmp_path: Path) -> None:
    generate_demo(tmp_path / "a", count=6, seed=1, image_size=64)
    generate_demo(tmp_path / "b", count=6, seed=2, image_size=64)
    assert set(_files(tmp_path / "a").values()).isdisjoint(_files(tmp_path / "b").values())


@pytest.mark.parametrize("size", [48, 65])
def test_rows_match_files_and_labels_are_in_range(tmp_path: Path, size: int) -> None:
    rows = generate_demo(tmp_path, count=40, seed=0, image_size=size)
    assert len(rows) == 40
    assert sorted(r["file"] for r in rows) == sorted(_files(tmp_path))
    for row in rows:
        assert set(row) == {"file", "age", "gender", "race"}
        assert "/" not in row["file"] and "\\" not in row["file"] and row["file"].endswith(".jpg")
        assert 1 <= row["age"] <= 90 and row["gender"] in (0, 1) and 0 <= row["race"] <= 4
        img = cv2.imread(str(tmp_path / row["file"]))
        assert img is not None and img.shape == (size, size, 3)
    assert 5 <= sum(r["gender"] for r in rows) <= 35


def _ridge(x: np.ndarray, y: np.ndarray, alpha: float = 1.0) -> Callable[[np.ndarray], np.ndarray]:
    """Closed-form ridge regression; numpy only, as importing sklearn costs seconds."""
    mean_x, mean_y = x.mean(axis=0), y.mean()
    xc = x - mean_x
    w = np.linalg.solve(xc.T @ xc + alpha * np.eye(x.shape[1]), xc.T @ (y - mean_y))
    return lambda z: (z - mean_x) @ w + mean_y


def test_age_and_gender_are_learnable_by_a_linear_model(tmp_path: Path) -> None:
    """Guards against the visible cues vanishing. Measured on seeds 0-7 and 11: age MAE
    8.5-9.7 vs 21.6-24.1 for predicting the mean; gender accuracy 0.81-0.90."""
    rows = generate_demo(tmp_path, count=400, seed=11, image_size=64)
    thumbs = [
        cv2.resize(
            cv2.imread(str(tmp_path / r["file"]), cv2.IMREAD_GRAYSCALE),
            (16, 16),
            interpolation=cv2.INTER_AREA,
        )
        for r in rows
    ]
    x = np.stack(thumbs).reshape(len(rows), -1) / 255.0
    age = np.array([r["age"] for r in rows], dtype=float)
    gender = np.array([r["gender"] for r in rows])
    train, test = slice(0, 200), slice(200, 400)

    mae = np.abs(_ridge(x[train], age[train])(x[test]) - age[test]).mean()
    baseline = np.abs(age[train].mean() - age[test]).mean()
    assert mae < 0.6 * baseline, (mae, baseline)

    # Regressing +-1 and thresholding at 0 is a linear classifier, good enough here.
    score = _ridge(x[train], gender[train] * 2.0 - 1.0)(x[test])
    accuracy = ((score > 0) == gender[test]).mean()
    assert accuracy > 0.7, accuracy
