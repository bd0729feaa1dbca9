"""Ingest, validate and preprocess all of ../shared/datasets/utkface-part1; write images/s per step.

Run: .venv/bin/python benchmarks/data_pipeline.py
Writes benchmarks/results/data_pipeline.json. Validation and preprocessing (face detection,
crop, split, cache) are each timed with 1 and 2 workers in the same run, so their ratios
are comparable on this shared machine.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
import time
from pathlib import Path

import great_expectations  # noqa: F401  (imported up front so its ~5 s import is not timed)

from agegender.config import DemoParams, PreprocessParams, ValidateParams
from agegender.data.ingest import ingest
from agegender.preprocess import prepare_dataset
from agegender.validation import validate_dataset

ROOT = Path(__file__).resolve().parents[1]
UTKFACE = ROOT.parent / "shared" / "datasets" / "utkface-part1"
RESULTS = ROOT / "benchmarks" / "results" / "data_pipeline.json"


def timed(step, *args, **kwargs):
    start = time.perf_counter()
    result = step(*args, **kwargs)
    return result, time.perf_counter() - start


def main() -> None:
    images = sum(1 for _ in UTKFACE.iterdir())
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp) / "data"
        ingested, ingest_s = timed(ingest, str(UTKFACE), data_dir, append=False, demo=DemoParams())
        validation = {}
        for workers in (1, 2):
            params = ValidateParams(workers=workers)
            report, seconds = timed(validate_dataset, data_dir, Path(tmp) / f"validation-{workers}", params)
            validation[workers] = {"seconds": round(seconds, 2), "images_per_s": round(report.rows_total / seconds, 1)}
        preprocessing = {}
        for workers in (1, 2):
            stats, seconds = timed(
                prepare_dataset,
                Path(tmp) / "validation-2" / "manifest.csv",
                data_dir,
                Path(tmp) / f"prepared-{workers}",
                PreprocessParams(workers=workers),
                ValidateParams().age_buckets,
            )
            preprocessing[workers] = {"seconds": round(seconds, 2), "images_per_s": round(stats["rows"] / seconds, 1)}
    result = {
        "dataset": str(UTKFACE.relative_to(ROOT.parent)),
        "source_images": images,
        "ingest": {
            "images_added": ingested.added,
            "skipped_duplicates": ingested.skipped_duplicates,
            "seconds": round(ingest_s, 2),
            "images_per_s": round(images / ingest_s, 1),
        },
        "validate": {
            "rows_total": report.rows_total,
            "rows_valid": report.rows_valid,
            "quarantined": report.quarantined,
            "by_workers": validation,
            "speedup_2_over_1_workers": round(validation[1]["seconds"] / validation[2]["seconds"], 2),
        },
        "preprocess": {
            "rows": stats["rows"],
            "detector": PreprocessParams().detector,
            "detector_hit_rate": stats["detector_hit_rate"],
            "by_workers": preprocessing,
            "speedup_2_over_1_workers": round(preprocessing[1]["seconds"] / preprocessing[2]["seconds"], 2),
        },
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "load_average": os.getloadavg()},
        "note": "validation times include Great Expectations' context, checkpoints and Data Docs",
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
