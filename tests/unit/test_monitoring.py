"""Crop statistics, served-input records (written in batches, read back by window) and the drift decision."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from agegender.config import DriftParams
from agegender.drift import FEATURES, check_drift, report_html
from agegender.drift_flow import window_bounds
from agegender.monitoring import RecordWriter, crop_stats, faces_table, image_record, read_records

MODEL = {"version": "3", "data_version": "abc"}


def record(age: float = 30.0, faces: int = 1) -> dict:
    observed = {"brightness": 120.0, "contrast": 40.0, "sharpness": 900.0, "female": 0.3}
    face = {"box": [10, 20, 50, 60], "detection_score": 0.99, "age": age, "observed": observed}
    return image_record(request="r1", route="predict", width=640, height=480, faces=[face] * faces, model=MODEL)


def test_crop_stats_measure_brightness_contrast_and_sharpness():
    flat = np.full((1, 32, 32, 3), 200, np.uint8)
    checks = np.kron(np.indices((8, 8)).sum(axis=0) % 2, np.ones((4, 4)))[None, :, :, None] * 255
    checks = np.repeat(checks, 3, axis=3).astype(np.uint8)
    stats = crop_stats(np.concatenate([flat, checks]))
    np.testing.assert_allclose(stats["brightness"], [200, 127.5], atol=0.1)
    assert stats["contrast"][0] == pytest.approx(0, abs=1e-3) and stats["contrast"][1] == pytest.approx(127.5, 0.01)
    assert stats["sharpness"][0] == pytest.approx(0, abs=1e-3) and stats["sharpness"][1] > 1000
    assert all(len(v) == 0 for v in crop_stats(np.zeros((0, 32, 32, 3), np.uint8)).values())


def test_a_record_keeps_statistics_and_predictions_never_pixels():
    rec = record(faces=2)
    assert rec["model_version"] == "3" and (rec["width"], rec["height"]) == (640, 480)
    assert rec["faces"][0] == {
        "side": 60,
        "score": 0.99,
        "age": 30.0,
        "brightness": 120.0,
        "contrast": 40.0,
        "sharpness": 900.0,
        "female": 0.3,
    }
    table = faces_table([rec, record(faces=0)])
    assert len(table) == 2 and list(table["model_version"]) == ["3", "3"]


def test_records_are_written_in_batches_and_read_back_by_window(tmp_path: Path):
    writer = RecordWriter(str(tmp_path / "records"), batch_records=3, flush_seconds=3600)
    before = datetime.now(UTC)
    for age in range(7):
        writer.add(record(age=age))
    deadline = time.monotonic() + 10
    while len(list((tmp_path / "records").rglob("*.jsonl"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    files = sorted((tmp_path / "records").rglob("*.jsonl"))
    assert len(files) == 2, "two full batches of 3; the 7th waits"
    writer.close()
    files = sorted((tmp_path / "records").rglob("*.jsonl"))
    assert [len(f.read_text().splitlines()) for f in files] == [3, 3, 1]
    assert not list((tmp_path / "records").rglob("*.tmp")) and not (tmp_path / "records" / "uploads").exists()
    after = datetime.now(UTC)
    assert [r["faces"][0]["age"] for r in read_records(str(tmp_path / "records"), since=before, until=after)] == [
        *range(7)
    ]
    assert read_records(str(tmp_path / "records"), since=after, until=after + timedelta(hours=1)) == []
    elsewhere = timezone(timedelta(hours=-5))  # the same window, written in another time zone
    again = read_records(
        str(tmp_path / "records"), since=before.astimezone(elsewhere), until=after.astimezone(elsewhere)
    )
    assert len(again) == 7


def test_a_batch_is_written_after_flush_seconds_and_uploads_only_when_asked(tmp_path: Path):
    writer = RecordWriter(f"file://{tmp_path}", batch_records=1000, flush_seconds=0.2)
    writer.add(record(), upload=b"\xff\xd8\xffjpeg bytes")
    time.sleep(1)
    (written,) = tmp_path.rglob("*.jsonl")
    stored = json.loads(written.read_text())["upload"]
    assert (tmp_path / stored).read_bytes() == b"\xff\xd8\xffjpeg bytes"
    writer.close()


def test_a_storage_failure_drops_the_batch_and_serving_goes_on(tmp_path: Path):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the folder should be")
    dropped = []
    writer = RecordWriter(str(blocker / "records"), batch_records=2, flush_seconds=60, on_drop=dropped.append)
    writer.add(record())
    writer.add(record())
    writer.close()
    assert dropped == [2]


def test_records_go_to_any_fsspec_url():
    writer = RecordWriter("memory://monitoring/records", batch_records=1, flush_seconds=60)
    writer.add(record())
    writer.close()
    now = datetime.now(UTC)
    assert len(read_records("memory://monitoring/records", since=now - timedelta(minutes=1), until=now)) == 1


def faces(rng: np.random.Generator, n: int, shift: float = 0.0) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "brightness": rng.normal(128 + 20 * shift, 30, n),
            "contrast": rng.normal(45, 12, n),
            "sharpness": rng.lognormal(7 + shift, 0.5, n),
            "age": rng.normal(30 + 15 * shift, 12, n),
            "female": rng.beta(2, 2 - shift, n),
        }
    )


SETTINGS = DriftParams()


@pytest.mark.parametrize("n", [200, 100_000])
def test_the_same_distribution_does_not_drift_and_a_shifted_one_does(n):
    rng = np.random.default_rng(0)
    reference = faces(rng, 5000)
    same = check_drift(reference, faces(rng, n), SETTINGS, model="m v1", start="a", end="b")
    assert same.enough and not same.drifted and same.drifted_features == [], same.summary
    shifted = check_drift(reference, faces(rng, n, shift=1.0), SETTINGS, model="m v1", start="a", end="b")
    assert shifted.drifted and len(shifted.drifted_features) >= 3 and shifted.summary.startswith("DRIFT")


def test_a_tiny_difference_in_a_huge_window_is_not_drift():
    """p-values alone would flag it (p << 0.01); the KS statistic is below monitor.drift.min_statistic."""
    rng = np.random.default_rng(1)
    reference, window = faces(rng, 100_000), faces(rng, 100_000, shift=0.05)
    report = check_drift(reference, window, SETTINGS, model="m v1", start="a", end="b")
    assert min(f.p_value for f in report.features) < 1e-6 and not report.drifted


def test_too_few_faces_is_no_decision_and_a_bad_reference_is_named():
    rng = np.random.default_rng(2)
    report = check_drift(faces(rng, 500), faces(rng, 20, shift=1), SETTINGS, model="m v1", start="a", end="b")
    assert not report.enough and not report.drifted and "No decision" in report.summary
    assert "min_faces = 100" in report.summary and "<table>" in report_html(report, faces(rng, 5), faces(rng, 5))
    with pytest.raises(ValueError, match=r"lacks the columns \['female'\]"):
        check_drift(faces(rng, 50).drop(columns="female"), faces(rng, 50), SETTINGS, model="m", start="a", end="b")


def test_the_html_report_holds_the_decision_table_and_histograms():
    rng = np.random.default_rng(3)
    reference, window = faces(rng, 300), faces(rng, 300, shift=1)
    report = check_drift(reference, window, SETTINGS, model="m v1", start="a", end="b")
    page = report_html(report, reference, window)
    assert "Drift check: DRIFT" in page and page.count("<tr class=drift>") == len(report.drifted_features)
    assert "data:image/png;base64," in page and all(name in page for name in FEATURES)
    assert report.as_dict()["drifted"] is True and "| feature |" in report.markdown()


@pytest.mark.parametrize(
    "end",
    ["2026-03-01T12:00:00", "2026-03-01T12:00:00+00:00", "2026-03-01T07:00:00-05:00"],
)
def test_a_window_ends_at_a_utc_time_whatever_zone_it_is_given_in(end):
    since, until = window_bounds(2.0, end)
    assert until == datetime(2026, 3, 1, 12, tzinfo=UTC) and since == datetime(2026, 3, 1, 10, tzinfo=UTC)
    assert until.utcoffset() == timedelta(0)
