"""Preprocess: detect and crop every valid face, split stratified, cache the crops.

Writes artifacts/prepared/{train,val,test}.npz (uint8 crops + labels), split.csv (which
file went where, and whether the detector found the face) and stats.json.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from rich.progress import track
from sklearn.model_selection import train_test_split

from agegender import paths
from agegender.config import Params, PreprocessParams, ScaleParams
from agegender.faces import Detector, DetectorPool, crop_chip
from agegender.files import atomic_dir, write_json
from agegender.images import FILE_LIMITS, ImageError, decode_image
from agegender.labels import bucket_ages

LOCAL = ScaleParams()  # no Dask scheduler: this machine's threads


@dataclass(frozen=True)
class PreprocessResult:
    """What the preprocess stage wrote to artifacts/prepared (stats.json holds the details)."""

    rows: int
    split_counts: dict[str, int]
    detector_hit_rate: float
    fallback_count: int
    images_per_s: float

    @property
    def summary(self) -> str:
        counts = ", ".join(f"{split} {count}" for split, count in self.split_counts.items())
        return (
            f"{self.rows} faces ({counts}); detector hit rate {self.detector_hit_rate:.1%}, "
            f"{self.fallback_count} centred fallback crops; {self.images_per_s} images/s; written to {paths.PREPARED}/"
        )


def run_preprocess_stage(root: Path, params: Params) -> PreprocessResult:
    """The preprocess stage: the validated manifest's faces -> crops, split and stats in artifacts/prepared."""
    stats = prepare_dataset(
        root / paths.VALIDATION / paths.MANIFEST,
        root / paths.DATA,
        root / paths.PREPARED,
        params.preprocess,
        params.validate_.age_buckets,
        params.scale,
    )
    return PreprocessResult(
        rows=stats["rows"],
        split_counts={split: info["count"] for split, info in stats["splits"].items()},
        detector_hit_rate=stats["detector_hit_rate"],
        fallback_count=stats["fallback_count"],
        images_per_s=stats["images_per_s"],
    )


def prepare_dataset(
    manifest: Path,
    data_dir: Path,
    out_dir: Path,
    params: PreprocessParams,
    age_buckets: list[int],
    scale: ScaleParams = LOCAL,
) -> dict:
    """Crop, split and cache the rows of the validated manifest; returns the stats written.

    The crops come from this machine's threads or, with scale.dask_scheduler, from a Dask
    cluster's workers: the same crops either way (the split depends on the labels alone).
    """
    rows = pd.read_csv(manifest, dtype={"race": "Int64"})
    if rows.empty:
        raise ValueError(f"{manifest}: no valid rows to preprocess")
    start = time.perf_counter()
    files = [data_dir / f for f in rows["file"]]
    if scale.dask_scheduler is None:
        crops, fallback = crop_all(files, params)
    else:
        from agegender.cluster import crop_on_cluster

        crops, fallback = crop_on_cluster(scale.dask_scheduler, files, params, scale.shard_images)
    seconds = time.perf_counter() - start
    rows["fallback"] = fallback
    rows["split"] = split_stratified(rows, params, age_buckets)

    with atomic_dir(out_dir) as staging:
        for split in paths.SPLITS:
            save_split(staging / paths.split_arrays(split), crops, rows, split)
        rows[["file", "split", "age", "gender", "race", "fallback"]].to_csv(staging / paths.SPLIT_TABLE, index=False)
        stats = split_stats(rows, age_buckets, seconds)
        stats["sources"] = sorted(rows["source"].astype(str).unique())
        write_json(staging / paths.PREPARED_STATS, stats)
    return stats


def crop_all(files: list[Path], params: PreprocessParams) -> tuple[np.ndarray, np.ndarray]:
    """Decode, detect and crop in parallel threads; returns the crops and which ones fell back."""

    def crop_one(detector: Detector, path: Path) -> tuple[np.ndarray, bool]:
        return crop_image(detector, str(path), path.read_bytes(), params)

    with DetectorPool(params.detector, params.workers) as pool:
        results = list(track(pool.map(crop_one, files), total=len(files), description="Detecting and cropping faces"))
    crops = np.stack([crop for crop, _ in results])
    return crops, np.array([used for _, used in results])


def crop_image(detector: Detector, name: str, data: bytes, params: PreprocessParams) -> tuple[np.ndarray, bool]:
    """One image file's bytes -> its crop and whether it fell back; the same on a thread or a Dask worker."""
    try:
        image = decode_image(data, FILE_LIMITS)
    except ImageError as err:
        raise ValueError(f"{name}: {err} (was validation skipped?)") from None
    return crop_chip(detector, image, margin=params.margin, size=params.image_size, align=params.align)


def split_stratified(rows: pd.DataFrame, params: PreprocessParams, age_buckets: list[int]) -> np.ndarray:
    """train/val/test labels, stratified by gender and age bucket; strata too small to split are pooled."""
    strata = rows["gender"].astype(str) + "_" + pd.Series(bucket_ages(rows["age"], age_buckets), index=rows.index)
    counts = strata.map(strata.value_counts())
    strata = strata.where(counts >= 10, "rare")
    index = np.arange(len(rows))
    fractions = params.split
    rest, test = train_test_split(index, test_size=fractions.test, stratify=strata, random_state=params.seed)
    train, val = train_test_split(
        rest,
        test_size=fractions.val / (fractions.train + fractions.val),
        stratify=strata.iloc[rest],
        random_state=params.seed,
    )
    labels = np.empty(len(rows), dtype=object)
    labels[train], labels[val], labels[test] = "train", "val", "test"
    return labels


def save_split(path: Path, crops: np.ndarray, rows: pd.DataFrame, split: str) -> None:
    mask = (rows["split"] == split).to_numpy()
    np.savez(
        path,
        images=crops[mask],
        age=rows.loc[mask, "age"].to_numpy(np.float32),
        gender=rows.loc[mask, "gender"].to_numpy(np.float32),
        race=rows.loc[mask, "race"].fillna(-1).to_numpy(np.int8),
        files=rows.loc[mask, "file"].to_numpy(str),
    )


def load_split(prepared_dir: Path, split: str) -> dict[str, np.ndarray]:
    """One cached split as arrays: images (N, S, S, 3) uint8 BGR, age, gender, race, files."""
    path = prepared_dir / paths.split_arrays(split)
    if not path.exists():
        raise FileNotFoundError(f"{path}: not found; run `agegender preprocess` (or `dvc repro preprocess`) first")
    with np.load(path) as data:
        return {key: data[key] for key in data.files}


def split_stats(rows: pd.DataFrame, age_buckets: list[int], seconds: float) -> dict:
    buckets = pd.Series(bucket_ages(rows["age"], age_buckets), index=rows.index)
    per_split = {}
    for split in paths.SPLITS:
        part = rows["split"] == split
        per_split[split] = {
            "count": int(part.sum()),
            "female_share": round(float(rows.loc[part, "gender"].mean()), 4) if part.any() else None,
            "per_age_bucket": {str(k): int(v) for k, v in buckets[part].value_counts().sort_index().items()},
        }
    return {
        "rows": len(rows),
        "detector_hit_rate": round(1.0 - float(rows["fallback"].mean()), 4),
        "fallback_count": int(rows["fallback"].sum()),
        "images_per_s": round(len(rows) / seconds, 1),
        "splits": per_split,
    }
