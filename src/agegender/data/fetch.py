"""Get the dataset into data/: ingest a source under DVC, or fetch the version data.dvc names.

The CLI (`agegender data ingest|fetch`) and the Prefect flow both call these.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from agegender import paths
from agegender.config import DemoParams, IngestParams
from agegender.data.ingest import DEFAULT_CHECKS, ingest
from agegender.data.versioning import VersioningError, data_version, pull_dataset, push_dataset, track_dataset


@dataclass(frozen=True)
class DatasetResult:
    """How data/ got to its version: `dvc pull`, or an ingest (with its counts and push outcome)."""

    how: str
    data_version: str
    added: int = 0
    skipped_duplicates: int = 0
    total: int = 0
    demo: bool = False
    remote: str | None = None
    push_error: str | None = None

    @property
    def summary(self) -> str:
        if self.how == "dvc pull":
            return f"{paths.DATA}/ is at DVC version {self.data_version} (dvc pull)"
        lines = [
            f"{self.added} images added, {self.skipped_duplicates} skipped (content already present), "
            f"{self.total} in {paths.DATA / paths.LABELS}; DVC version {self.data_version} in {paths.DATA_DVC}"
        ]
        if self.demo:
            lines.append("This is the procedurally drawn DEMO dataset, not real faces.")
        if self.push_error:
            lines.append(f"warning: {self.push_error}; the dataset is tracked locally, run `dvc push` later")
        else:
            lines.append(f"Pushed to DVC remote '{self.remote}'" if self.remote else "No DVC remote set: not pushed")
        return "\n".join(lines)


def ingest_tracked(
    root: Path,
    source: str,
    *,
    append: bool,
    demo: DemoParams,
    replace: bool = False,
    sha256: str | None = None,
    checks: IngestParams = DEFAULT_CHECKS,
) -> DatasetResult:
    """Ingest source into root/data, `dvc add` it and push it to the default remote if one is set.

    A failed ingest or `dvc add` raises and leaves data/, data.dvc, the DVC cache and the remote
    as they were; a failed push is reported in the result (the dataset is tracked locally and
    can be pushed later).
    """
    data_dir = root / paths.DATA
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
    remote, push_error = None, None
    try:
        remote = push_dataset(root, data_dir)
    except VersioningError as err:
        push_error = str(err)
    return DatasetResult(
        how=f"ingest {source}" + (" (append)" if append else ""),
        data_version=data_version(root / paths.DATA_DVC),
        added=report.added,
        skipped_duplicates=report.skipped_duplicates,
        total=report.total,
        demo=source == "demo",
        remote=remote,
        push_error=push_error,
    )


def fetch_dataset(root: Path, source: str, demo: DemoParams, checks: IngestParams = DEFAULT_CHECKS) -> DatasetResult:
    """The version data.dvc names, from the DVC cache or remote; if no copy exists, ingest source."""
    if pull_dataset(root, root / paths.DATA):
        return DatasetResult(how="dvc pull", data_version=data_version(root / paths.DATA_DVC))
    return ingest_tracked(root, source, append=False, demo=demo, checks=checks)
