"""The stratified split and the crop cache."""

import json

import numpy as np
import pandas as pd
import pytest

from agegender.config import PreprocessParams, SplitFractions
from agegender.labels import bucket_ages
from agegender.preprocess import crop_all, load_split, prepare_dataset, split_stratified
from tests.conftest import utkface_files

BUCKETS = [0, 10, 20, 30, 45, 60, 117]
PARAMS = PreprocessParams(image_size=48, split=SplitFractions(train=0.7, val=0.15, test=0.15), seed=3)


def fake_rows(n: int = 2000, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {"file": [f"images/{i}.jpg" for i in range(n)], "age": rng.integers(0, 100, n), "gender": rng.integers(0, 2, n)}
    )


def test_split_fractions_and_no_leakage():
    rows = fake_rows()
    rows["split"] = split_stratified(rows, PARAMS, BUCKETS)
    counts = rows["split"].value_counts(normalize=True)
    assert counts["train"] == pytest.approx(0.7, abs=0.01)
    assert counts["val"] == pytest.approx(0.15, abs=0.01)
    assert counts["test"] == pytest.approx(0.15, abs=0.01)
    files = [set(rows.loc[rows["split"] == s, "file"]) for s in ("train", "val", "test")]
    assert not (files[0] & files[1] or files[0] & files[2] or files[1] & files[2])
    assert sum(len(f) for f in files) == len(rows)


def test_split_is_stratified_by_gender_and_age_bucket():
    rows = fake_rows()
    rows["split"] = split_stratified(rows, PARAMS, BUCKETS)
    rows["stratum"] = rows["gender"].astype(str) + pd.Series(bucket_ages(rows["age"], BUCKETS))
    overall = rows["stratum"].value_counts(normalize=True)
    for split in ("train", "val", "test"):
        share = rows.loc[rows["split"] == split, "stratum"].value_counts(normalize=True)
        assert (share - overall).abs().max() < 0.02


def test_split_is_deterministic_and_seeded():
    rows = fake_rows()
    first = split_stratified(rows, PARAMS, BUCKETS)
    assert (first == split_stratified(rows, PARAMS, BUCKETS)).all()
    assert (first != split_stratified(rows, PARAMS.model_copy(update={"seed": 4}), BUCKETS)).any()


def test_rare_strata_do_not_break_the_split():
    rows = fake_rows(300)
    rows.loc[0, "age"] = 110  # a stratum with a single member
    assert set(split_stratified(rows, PARAMS, BUCKETS)) == {"train", "val", "test"}


def test_crops_and_cache_on_real_chips(tmp_path):
    chips = utkface_files(60)
    crops, fallback = crop_all(chips, PARAMS)
    assert crops.shape == (60, 48, 48, 3) and crops.dtype == np.uint8
    assert fallback.mean() < 0.5  # the detector finds most faces on real chips

    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    lines = ["file,age,gender,race,source"]
    for path in chips:
        (data / "images" / path.name).write_bytes(path.read_bytes())
        age, gender, race = path.name.split("_")[:3]
        lines.append(f"images/{path.name},{age},{gender},{race},test")
    (tmp_path / "manifest.csv").write_text("\n".join(lines) + "\n")
    stats = prepare_dataset(tmp_path / "manifest.csv", data, tmp_path / "prepared", PARAMS, BUCKETS)
    assert sum(s["count"] for s in stats["splits"].values()) == 60
    assert json.loads((tmp_path / "prepared/stats.json").read_text()) == stats
    train = load_split(tmp_path / "prepared", "train")
    assert train["images"].shape[1:] == (48, 48, 3) and len(train["age"]) == stats["splits"]["train"]["count"]
