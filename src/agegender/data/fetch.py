"""Get the dataset into data/: ingest a source under DVC, or fetch the version data.dvc names.

The CLI (`agegender data ingest|fetch`) and the Prefect flow both call these.
"""

from __future__ import annotations

from pathlib import Path

from agegender.config import DemoParams, IngestParams
from agegender.data.ingest import DEFAULT_CHECKS, ingest
from agegender.data.versioning import VersioningError, data_version, pull_dataset, push_dataset, track_dataset

DATA_DIR = "data"


def ingest_tracked(
    root: Path,
    source: str,
    *,
    append: bool,
    demo: DemoParams,
    replace: bool = False,
    sha256: str | None = None,
    checks: IngestParams = DEFAULT_CHECKS,
) -> dict:
    """Ingest source into root/data, `dvc add` it and push it to the default remote if one is set.

    A failed ingest or `dvc add` raises and leaves data/, data.dvc, the DVC cache and the remote
    as they were; a failed push is reported in the result (the dataset is tracked locally and
    can be pushed later).
    """
    data_dir = root / DATA_DIR
    if source != "demo" and "://" not in source and not Path(source).expanduser().is_absolute():
        source = str((root / source).resolve()) if (root / source).exists() else source
    report = ingest(
        source,
        data_dir,
        append=append,
        demo=demo,
        replace=replace,
        sha256=sha256,
        checks=checks,
        track=lambda: track_dataset(root, data_dir),
    )
    result = {
        "how": f"ingest {source}" + (" (append)" if append else ""),
        "added": report.added,
        "skipped_duplicates": report.skipped_duplicates,
        "total": report.total,
        "data_version": data_version(root / "data.dvc"),
        "demo": source == "demo",
        "remote": None,
        "push_error": None,
    }
    try:
        result["remote"] = push_dataset(root, data_dir)
    except VersioningError as err:
        result["push_error"] = str(err)
    return result


def fetch_dataset(root: Path, source: str, demo: DemoParams, checks: IngestParams = DEFAULT_CHECKS) -> dict:
    """The version data.dvc names, from the DVC cache or remote; if no copy exists, ingest source."""
    if pull_dataset(root, root / DATA_DIR):
        return {"how": "dvc pull", "data_version": data_version(root / "data.dvc")}
    return ingest_tracked(root, source, append=False, demo=demo, checks=checks)
