"""Validation through Great Expectations: each bad row is quarantined with its reason."""

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from agegender.config import ValidateParams
from agegender.labels import age_bucket_names, bucket_ages
from agegender.validation import validate_dataset
from tests.conftest import utkface_files

PARAMS = ValidateParams(
    min_side=48, min_rows=10, gender_share=(0.1, 0.9), age_buckets=[0, 30, 117], max_bad_fraction=0.5
)


def make_dataset(tmp_path: Path) -> Path:
    """12 good real chips plus one row for each kind of bad input."""
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    rows = []
    for path in utkface_files(12):
        shutil.copyfile(path, data / "images" / path.name)
        age, gender, race = path.name.split("_")[:3]
        rows.append(f"images/{path.name},{age},{gender},{race},test")
    good = data / "images" / utkface_files(12)[0].name
    raw = good.read_bytes()
    (data / "images" / "truncated.jpg").write_bytes(raw[: len(raw) // 2])
    (data / "images" / "text.jpg").write_bytes(b"this is not an image")
    (data / "images" / "copy.jpg").write_bytes(raw)
    cv2.imwrite(str(data / "images" / "tiny.png"), np.zeros((20, 40, 3), np.uint8))
    cv2.imwrite(str(data / "images" / "gray.png"), np.full((64, 64), 128, np.uint8))
    shutil.copyfile(utkface_files(1, offset=7)[0], data / "images" / "labels_bad.jpg")
    rows += [
        "images/truncated.jpg,30,1,0,test",
        "images/text.jpg,30,1,0,test",
        "images/copy.jpg,30,1,0,test",
        "images/tiny.png,30,1,0,test",
        "images/gray.png,30,1,,test",
        "images/missing.jpg,30,1,0,test",
        "images/labels_bad.jpg,200,3,7,test",
    ]
    (data / "labels.csv").write_text("file,age,gender,race,source\n" + "\n".join(rows) + "\n")
    return data


def test_bad_rows_are_quarantined_with_reasons(tmp_path):
    report = validate_dataset(make_dataset(tmp_path), tmp_path / "out", PARAMS)
    reasons = {q["file"]: q["reason"] for q in report.quarantined}
    assert set(reasons) == {
        "images/truncated.jpg",
        "images/text.jpg",
        "images/copy.jpg",
        "images/tiny.png",
        "images/missing.jpg",
        "images/labels_bad.jpg",
    }
    assert "does not decode" in reasons["images/truncated.jpg"]
    assert "does not decode" in reasons["images/text.jpg"]
    assert "same content as an earlier image" in reasons["images/copy.jpg"]
    assert "shorter side under validate.min_side=48" in reasons["images/tiny.png"]
    assert "image file missing" in reasons["images/missing.jpg"]
    assert all(
        text in reasons["images/labels_bad.jpg"]
        for text in ("age outside 0..116", "gender is not 0 or 1", "race is not 0..4")
    )
    assert report.success and report.rows_valid == 13  # 12 chips + the grayscale image (3 channels once loaded)

    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["rows_total"] == 19 and summary["rows_valid"] == 13 and summary["success"] is True
    assert {q["file"] for q in summary["quarantined"]} == set(reasons)
    assert any(e["expectation"] == "expect_column_values_to_be_between" for e in summary["expectations"])
    manifest = (tmp_path / "out" / "manifest.csv").read_text()
    assert "truncated.jpg" not in manifest and "gray.png" in manifest
    assert (tmp_path / "out" / "data_docs" / "index.html").exists()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"max_bad_fraction": 0.1}, "more than validate.max_bad_fraction=10.0%"),
        ({"min_rows": 50}, "expect_table_row_count_to_be_between failed (validate.min_rows)"),
        ({"gender_share": (0.9, 1.0)}, "expect_column_mean_to_be_between failed (validate.gender_share)"),
        ({"age_buckets": [0, 1, 2, 117]}, "expect_column_distinct_values_to_contain_set failed (validate.age_buckets)"),
    ],
)
def test_stage_fails_with_a_message(tmp_path, change, message):
    report = validate_dataset(make_dataset(tmp_path), tmp_path / "out", PARAMS.model_copy(update=change))
    assert not report.success
    assert any(message in failure for failure in report.failures), report.failures


def test_age_buckets():
    assert age_bucket_names([0, 10, 117]) == ["0-9", "10-116"]
    assert bucket_ages([0, 9, 10, 116, 130], [0, 10, 117]) == ["0-9", "0-9", "10-116", "10-116", "10-116"]
