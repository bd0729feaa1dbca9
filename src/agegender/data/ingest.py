"""Ingest a source into the canonical raw dataset: data/images/* + data/labels.csv.

The new dataset is assembled in a staging folder beside data/ and swapped in only
when complete, so a failed ingest leaves the previous dataset (and data.dvc) as it was.
"""

from __future__ import annotations

import csv
import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from rich.progress import track

from agegender.config import DemoParams
from agegender.data import sources
from agegender.data.sources import Item, SourceError

LABEL_COLUMNS = ("file", "age", "gender", "race", "source")
IMAGES = "images"
LABELS = "labels.csv"


@dataclass(frozen=True)
class IngestReport:
    data_dir: Path
    added: int
    skipped_duplicates: int
    total: int


def ingest(
    source: str,
    data_dir: Path,
    *,
    append: bool,
    demo: DemoParams,
    track: Callable[[], object] = lambda: None,
) -> IngestReport:
    """Read `source` and write it (or, with append, add it) to data_dir atomically.

    `track` runs once the new dataset is in place (DVC tracking); if it fails, the
    previous dataset is put back.
    """
    if append and source == "demo":
        raise SourceError("demo: the demo data replaces the dataset; --append is for batches of real images")
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{data_dir.name}-staging-", dir=data_dir.parent))
    try:
        with tempfile.TemporaryDirectory(prefix="agegender-source-") as scratch:
            rows = read_existing(data_dir) if append else []
            known = copy_existing(data_dir, staging, rows)
            new_rows, skipped = add_source(source, staging, Path(scratch), known, demo)
        rows += new_rows
        if not new_rows and not append:
            raise SourceError(f"{source}: nothing to ingest")
        write_labels(staging / LABELS, rows)
        swap_into_place(staging, data_dir, track)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return IngestReport(data_dir=data_dir, added=len(new_rows), skipped_duplicates=skipped, total=len(rows))


def read_existing(data_dir: Path) -> list[dict]:
    labels = data_dir / LABELS
    if not labels.exists():
        return []
    with labels.open(newline="") as handle:
        return list(csv.DictReader(handle))


def copy_existing(data_dir: Path, staging: Path, rows: list[dict]) -> dict[str, str]:
    """Link the current images into staging; returns content hash -> file for dedup."""
    (staging / IMAGES).mkdir()
    known = {}
    for row in rows:
        src = data_dir / row["file"]
        if src.exists():
            link_or_copy(src, staging / row["file"])
            known[file_md5(src)] = row["file"]
    return known


def add_source(
    source: str, staging: Path, scratch: Path, known: dict[str, str], demo: DemoParams
) -> tuple[list[dict], int]:
    """Copy the source's images into staging/images, skipping content already present."""
    if source == "demo":
        return add_demo(staging, demo), 0
    items = read_items(source, scratch)
    rows, skipped = [], 0
    for item in track(items, description=f"Copying {len(items)} images", transient=True):
        if item.path is None:
            rows.append(label_row(f"{IMAGES}/{item.name}", item, source))
            continue
        digest = file_md5(item.path)
        if digest in known:
            skipped += 1
            continue
        file = unique_name(staging, item.name, digest)
        shutil.copyfile(item.path, staging / file)
        known[digest] = file
        rows.append(label_row(file, item, source))
    return rows, skipped


def add_demo(staging: Path, demo: DemoParams) -> list[dict]:
    from agegender.data.demo import generate_demo

    generated = generate_demo(staging / IMAGES, count=demo.count, seed=demo.seed, image_size=demo.image_size)
    return [
        {"file": f"{IMAGES}/{g['file']}", "age": g["age"], "gender": g["gender"], "race": g["race"], "source": "demo"}
        for g in generated
    ]


def read_items(source: str, scratch: Path) -> list[Item]:
    """Dispatch on the source's form: URL, archive, CSV manifest or folder."""
    if source.startswith(sources.URL_SCHEMES):
        archive = sources.download(source, scratch)
        return sources.read_utkface_folder(sources.extract_archive(archive, scratch / "extracted"))
    path = Path(source).expanduser()
    if not path.exists():
        raise SourceError(
            f"{source}: no such file or folder (expected 'demo', a UTKFace folder or archive, "
            "a CSV manifest, or an http(s)/s3/gs URL)"
        )
    if path.is_dir():
        return sources.read_utkface_folder(path)
    if path.suffix.lower() == ".csv":
        return sources.read_manifest(path)
    return sources.read_utkface_folder(sources.extract_archive(path, scratch / "extracted"))


def label_row(file: str, item: Item, source: str) -> dict:
    return {"file": file, "age": item.age, "gender": item.gender, "race": item.race, "source": source}


def unique_name(staging: Path, name: str, digest: str) -> str:
    """images/<name>, or images/<stem>-<hash><suffix> if another image already has that name."""
    file = f"{IMAGES}/{name}"
    if (staging / file).exists():
        stem, dot, suffix = name.partition(".")
        file = f"{IMAGES}/{stem}-{digest[:8]}{dot}{suffix}"
    return file


def write_labels(path: Path, rows: list[dict]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=LABEL_COLUMNS, lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if row[k] is None else row[k] for k in LABEL_COLUMNS})


def swap_into_place(staging: Path, data_dir: Path, track: Callable[[], object]) -> None:
    """Replace data_dir by staging with renames; put the old one back if `track` fails."""
    old = data_dir.with_name(f".{data_dir.name}-old")
    shutil.rmtree(old, ignore_errors=True)
    if data_dir.exists():
        data_dir.rename(old)
    staging.rename(data_dir)
    try:
        track()
    except BaseException:
        data_dir.rename(staging)
        if old.exists():
            old.rename(data_dir)
        raise
    shutil.rmtree(old, ignore_errors=True)


def link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def file_md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()
