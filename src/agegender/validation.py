"""Validate the raw dataset with Great Expectations and quarantine the bad rows.

Images are decoded once, in parallel, into per-row facts (exists, decodes, channels,
shorter side, content hash); Great Expectations then checks labels and facts row by
row, and the valid rows table by table. Its results, not hand-written checks, decide
what is quarantined and whether the stage fails; its Data Docs render the report.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from rich.progress import track

from agegender import paths
from agegender.config import Params, ValidateParams
from agegender.files import atomic_dir, file_md5, write_json
from agegender.images import FILE_LIMITS, ImageError, decode_image
from agegender.labels import age_bucket_names, bucket_ages

MANIFEST_COLUMNS = ["file", "age", "gender", "race", "source"]


@dataclass(frozen=True)
class ValidationReport:
    success: bool
    rows_total: int
    rows_valid: int
    quarantined: list[dict]
    failures: list[str]
    out_dir: Path

    @property
    def summary(self) -> str:
        lines = [
            f"{self.rows_valid} of {self.rows_total} rows valid, {len(self.quarantined)} quarantined; "
            f"report in {self.out_dir / paths.VALIDATION_SUMMARY}, "
            f"Data Docs at {self.out_dir / paths.DATA_DOCS}/index.html"
        ]
        lines += [f"  quarantined {entry['file']}: {entry['reason']}" for entry in self.quarantined[:10]]
        if len(self.quarantined) > 10:
            lines.append(f"  ... and {len(self.quarantined) - 10} more in {paths.VALIDATION_SUMMARY}")
        return "\n".join(lines)


class ValidationFailed(ValueError):
    """The dataset failed validation; its report was written all the same, and says why."""

    def __init__(self, report: ValidationReport) -> None:
        super().__init__("validation failed:\n  " + "\n  ".join(report.failures))
        self.report = report


def run_validate_stage(root: Path, params: Params) -> ValidationReport:
    """The validate stage: data/ -> artifacts/validation; raises ValidationFailed when the data fails."""
    report = validate_dataset(root / paths.DATA, root / paths.VALIDATION, params.validate_)
    if not report.success:
        raise ValidationFailed(report)
    return report


def validate_dataset(data_dir: Path, out_dir: Path, params: ValidateParams) -> ValidationReport:
    """Check data_dir/labels.csv and its images; write manifest, summary and Data Docs to out_dir."""
    labels = read_labels(data_dir / paths.LABELS)
    rows = labels.join(inspect_images(data_dir, labels["file"].tolist(), params.workers))
    rows["age_num"] = pd.to_numeric(rows["age"].where(rows["age"].str.fullmatch(r"\d+", na=False)), errors="coerce")
    rows["duplicate_of"] = first_copy_of(rows)

    with atomic_dir(out_dir) as staging:
        context = make_context(staging / paths.DATA_DOCS)
        row_result = run_checkpoint(context, "rows", row_expectations(params), rows)
        quarantined = quarantine_reasons(row_result, rows)
        valid = rows[~rows["file"].isin({q["file"] for q in quarantined})].copy()
        valid["gender_num"] = pd.to_numeric(valid["gender"])
        valid["age_bucket"] = bucket_ages(valid["age_num"].astype(int), params.age_buckets)
        table_result = run_checkpoint(context, "table", table_expectations(params), valid)

        failures = [describe_failure(r) for r in table_result.results if not r.success]
        bad_fraction = len(quarantined) / max(len(rows), 1)
        if bad_fraction > params.max_bad_fraction:
            failures.insert(
                0,
                f"{len(quarantined)} of {len(rows)} rows quarantined ({bad_fraction:.1%}), "
                f"more than validate.max_bad_fraction={params.max_bad_fraction:.1%}",
            )
        report = ValidationReport(
            success=not failures,
            rows_total=len(rows),
            rows_valid=len(valid),
            quarantined=quarantined,
            failures=failures,
            out_dir=out_dir,
        )
        valid[MANIFEST_COLUMNS].to_csv(staging / paths.MANIFEST, index=False)
        write_summary(staging / paths.VALIDATION_SUMMARY, report, [row_result, table_result])
    return report


def read_labels(path: Path) -> pd.DataFrame:
    """labels.csv with every column as text, so malformed values reach the expectations as they are."""
    if not path.exists():
        raise FileNotFoundError(f"{path}: not found; ingest a dataset first (agegender data ingest SOURCE)")
    labels = pd.read_csv(path, dtype=str, keep_default_na=False)
    for column in ("age", "gender"):
        labels[column] = labels[column].replace("", None)
    missing = [c for c in MANIFEST_COLUMNS if c not in labels.columns]
    if missing:
        raise ValueError(f"{path}: missing column(s) {', '.join(missing)}")
    return labels


def inspect_images(data_dir: Path, files: list[str], workers: int) -> pd.DataFrame:
    """Decode every image once, in parallel threads (PIL releases the GIL while decoding)."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        facts = pool.map(lambda f: inspect_image(data_dir / f), files, chunksize=64)
        return pd.DataFrame(list(track(facts, total=len(files), description="Decoding images", transient=True)))


def inspect_image(path: Path) -> dict:
    """Facts about one image file; None where a fact cannot be known (missing or undecodable)."""
    facts = {"exists": path.is_file(), "decodes": None, "channels": None, "min_side": None, "content_hash": None}
    if not facts["exists"]:
        return facts
    data = path.read_bytes()
    facts["content_hash"] = file_md5(path)
    try:
        image = decode_image(data, FILE_LIMITS)  # the loader preprocessing and serving use
    except ImageError:
        facts["decodes"] = False
        return facts
    facts["decodes"] = True
    facts["channels"] = image.shape[2]
    facts["min_side"] = min(image.shape[:2])
    return facts


def first_copy_of(rows: pd.DataFrame) -> pd.Series:
    """For each later copy of the same content, the file of the first copy; None otherwise."""
    first = rows.dropna(subset=["content_hash"]).drop_duplicates("content_hash").set_index("content_hash")["file"]
    duplicate = rows["content_hash"].notna() & rows.duplicated("content_hash")
    return rows["content_hash"].map(first).where(duplicate, None)


def row_expectations(params: ValidateParams) -> list:
    import great_expectations.expectations as gxe

    def meta(reason: str) -> dict:
        return {"reason": reason}

    return [
        gxe.ExpectColumnValuesToNotBeNull(
            column="age", meta=meta("age label missing (file name not in the UTKFace convention, or empty cell)")
        ),
        gxe.ExpectColumnValuesToNotBeNull(column="gender", meta=meta("gender label missing")),
        gxe.ExpectColumnValuesToMatchRegex(column="age", regex=r"^\d+$", meta=meta("age is not an integer")),
        gxe.ExpectColumnValuesToBeBetween(
            column="age_num", min_value=0, max_value=116, meta=meta("age outside 0..116")
        ),
        gxe.ExpectColumnValuesToBeInSet(column="gender", value_set=["0", "1"], meta=meta("gender is not 0 or 1")),
        gxe.ExpectColumnValuesToMatchRegex(column="race", regex=r"^[0-4]?$", meta=meta("race is not 0..4 or empty")),
        gxe.ExpectColumnValuesToBeInSet(column="exists", value_set=[True], meta=meta("image file missing")),
        gxe.ExpectColumnValuesToBeInSet(
            column="decodes", value_set=[True], meta=meta("image does not decode (corrupt, truncated or not an image)")
        ),
        gxe.ExpectColumnValuesToBeInSet(
            column="channels", value_set=[3], meta=meta("image has no 3 channels after load")
        ),
        gxe.ExpectColumnValuesToBeBetween(
            column="min_side",
            min_value=params.min_side,
            meta=meta(f"shorter side under validate.min_side={params.min_side} px"),
        ),
        gxe.ExpectColumnValuesToBeNull(column="duplicate_of", meta=meta("same content as an earlier image")),
    ]


def table_expectations(params: ValidateParams) -> list:
    import great_expectations.expectations as gxe

    low, high = params.gender_share
    return [
        gxe.ExpectTableRowCountToBeBetween(min_value=params.min_rows, meta={"reason": "validate.min_rows"}),
        gxe.ExpectColumnMeanToBeBetween(
            column="gender_num", min_value=low, max_value=high, meta={"reason": "validate.gender_share"}
        ),
        gxe.ExpectColumnDistinctValuesToContainSet(
            column="age_bucket", value_set=age_bucket_names(params.age_buckets), meta={"reason": "validate.age_buckets"}
        ),
    ]


def make_context(docs_dir: Path):
    """An in-memory GX context whose only Data Docs site is docs_dir."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    context.add_data_docs_site(
        site_name="validation",
        site_config={
            "class_name": "SiteBuilder",
            "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(docs_dir.resolve())},
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
        },
    )
    return context


def run_checkpoint(context, name: str, expectations: list, frame: pd.DataFrame):
    """Validate frame against a suite of expectations through a checkpoint that updates Data Docs."""
    import great_expectations as gx

    batch = context.data_sources.add_pandas(name).add_dataframe_asset(name).add_batch_definition_whole_dataframe(name)
    suite = context.suites.add(gx.ExpectationSuite(name=name, expectations=expectations))
    definition = context.validation_definitions.add(gx.ValidationDefinition(name=name, data=batch, suite=suite))
    checkpoint = context.checkpoints.add(
        gx.Checkpoint(
            name=name,
            validation_definitions=[definition],
            actions=[gx.checkpoint.UpdateDataDocsAction(name="data_docs")],
            result_format={"result_format": "COMPLETE", "unexpected_index_column_names": ["file"]},
        )
    )
    result = checkpoint.run(batch_parameters={"dataframe": frame})
    return next(iter(result.run_results.values()))


def quarantine_reasons(result, rows: pd.DataFrame) -> list[dict]:
    """One {file, reason} per failing row, joining every failed row-level expectation's reason."""
    reasons: dict[str, list[str]] = {}
    for expectation in result.results:
        if expectation.success:
            continue
        config = expectation.expectation_config
        column = config.kwargs["column"]
        for hit in expectation.result.get("unexpected_index_list") or []:
            value = hit.get(column)
            shown = "" if pd.isna(value) else f" ({column}={value!r})"
            reasons.setdefault(hit["file"], []).append(config.meta["reason"] + shown)
    return [{"file": f, "reason": "; ".join(reasons[f])} for f in rows["file"] if f in reasons]


def describe_failure(expectation) -> str:
    config = expectation.expectation_config
    observed = expectation.result.get("observed_value")
    return f"{config.type} failed ({config.meta.get('reason')}): observed {observed!r}, expected {json_safe(config.kwargs)}"


def write_summary(path: Path, report: ValidationReport, results: list) -> None:
    summary = {
        "success": report.success,
        "rows_total": report.rows_total,
        "rows_valid": report.rows_valid,
        "quarantined_count": len(report.quarantined),
        "quarantined_fraction": round(len(report.quarantined) / max(report.rows_total, 1), 6),
        "quarantined": report.quarantined,
        "failures": report.failures,
        "expectations": [
            {
                "suite": result.suite_name,
                "expectation": r.expectation_config.type,
                "kwargs": json_safe(r.expectation_config.kwargs),
                "success": r.success,
                "unexpected_count": r.result.get("unexpected_count"),
                "observed_value": json_safe(r.result.get("observed_value")),
            }
            for result in results
            for r in result.results
        ],
    }
    write_json(path, summary)


def json_safe(value):
    return json.loads(json.dumps(value, default=str))
