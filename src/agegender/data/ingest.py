"""Ingest a source into the canonical raw dataset: data/images/* + data/labels.csv.

All or nothing: the new dataset is assembled in a staging folder beside data/, every
image is checked to decode, and it is swapped in only when complete, so a failed
ingest leaves the previous dataset (and data.dvc) as it was.
"""

from __future__ import annotations

import csv
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from rich.progress import track

from agegender.config import DemoParams, IngestParams
from agegender.data import sources
from agegender.data.sources import Item, SourceError
from agegender.files import file_md5

LABEL_COLUMNS = ("file", "age", "gender", "race", "source")
IMAGES = "images"
LABELS = "labels.csv"
# Replacing the dataset with fewer than this share of its rows needs replace=True (--replace).
MIN_KEPT_FRACTION = 0.5
DEFAULT_CHECKS = IngestParams()  # params.yaml's defaults, for callers that pass no data.ingest section


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
    replace: bool = False,
    sha256: str | None = None,
    checks: IngestParams = DEFAULT_CHECKS,
    track: Callable[[], object] = lambda: None,
) -> IngestReport:
    """Read `source` and write it (or, with append, add it) to data_dir atomically.

    Every image must decode; an archive must be complete and, if `sha256` is given, match it.
    A dataset under half the current size needs `replace`. `track` runs once the new dataset
    is in place (DVC tracking); if it fails, the previous dataset is put back.
    """
    if append and source == "demo":
        raise SourceError("demo: the demo data replaces the dataset; --append is for batches of real images")
    if append and replace:
        raise SourceError("--append adds to the dataset and --replace replaces it: choose one")
    current = read_existing(data_dir)
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{data_dir.name}-staging-", dir=data_dir.parent))
    try:
        with tempfile.TemporaryDirectory(prefix="agegender-source-") as scratch:
            rows = list(current) if append else []
            known = copy_existing(data_dir, staging, rows)
            new_rows, skipped = add_source(source, staging, Path(scratch), known, demo, sha256=sha256, checks=checks)
        rows += new_rows
        check_size(source, data_dir, current=len(current), new=len(rows), replace=replace)
        write_labels(staging / LABELS, rows)
        swap_into_place(staging, data_dir, track)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return IngestReport(data_dir=data_dir, added=len(new_rows), skipped_duplicates=skipped, total=len(rows))


def check_size(source: str, data_dir: Path, *, current: int, new: int, replace: bool) -> None:
    """Refuse an empty dataset always, and one much smaller than the current one unless asked to replace it."""
    if new == 0:
        raise SourceError(f"{source}: nothing to ingest")
    if new < current * MIN_KEPT_FRACTION and not replace:
        raise SourceError(
            f"{source}: would replace the {current} images in {data_dir} with {new} "
            f"(fewer than {MIN_KEPT_FRACTION:.0%} of them); pass --replace if that is intended"
        )


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
    source: str,
    staging: Path,
    scratch: Path,
    known: dict[str, str],
    demo: DemoParams,
    *,
    sha256: str | None,
    checks: IngestParams,
) -> tuple[list[dict], int]:
    """Copy the source's images into staging/images, skipping content already present.

    Raises SourceError naming every image that does not decode (after looking at all of them).
    """
    if source == "demo":
        if sha256:
            raise SourceError("demo: --sha256 checks an archive; the demo data is drawn here")
        return add_demo(staging, demo), 0
    items = read_items(source, scratch, sha256=sha256, checks=checks)
    rows, skipped, undecodable = [], 0, []
    for item in track(items, description=f"Checking and copying {len(items)} images", transient=True):
        data = item.path.read_bytes()
        if problem := decode_problem(data):
            undecodable.append(f"{item.path}: {problem}")
            continue
        digest = file_md5(item.path)
        if digest in known:
            skipped += 1
            continue
        file = unique_name(staging, item.name, digest)
        (staging / file).write_bytes(data)
        known[digest] = file
        rows.append(label_row(file, item, source))
    if undecodable:
        raise SourceError(
            f"{source}: {len(undecodable)} of {len(items)} images do not decode: {sources.list_problems(undecodable)}"
        )
    return rows, skipped


def decode_problem(data: bytes) -> str | None:
    """Why the image bytes cannot be used, or None: the one decoder that training and serving use."""
    from agegender.images import FILE_LIMITS, ImageError, decode_image

    try:
        decode_image(data, FILE_LIMITS)
    except ImageError as err:
        return str(err)
    return None


def add_demo(staging: Path, demo: DemoParams) -> list[dict]:
    from agegender.data.demo import generate_demo

    generated = generate_demo(staging / IMAGES, count=demo.count, seed=demo.seed, image_size=demo.image_size)
    return [
        {"file": f"{IMAGES}/{g['file']}", "age": g["age"], "gender": g["gender"], "race": g["race"], "source": "demo"}
        for g in generated
    ]


def read_items(
    source: str, scratch: Path, *, sha256: str | None = None, checks: IngestParams = DEFAULT_CHECKS
) -> list[Item]:
    """Dispatch on the source's form: URL, archive, CSV manifest or folder.

    An archive (downloaded or local) must match `sha256` when it is given.
    """
    if sha256 is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", sha256):
        raise SourceError(f"--sha256 {sha256!r}: expected 64 hexadecimal digits")
    if source.startswith(sources.URL_SCHEMES):
        archive = sources.download(
            source, scratch, connect_timeout=checks.connect_timeout, read_timeout=checks.read_timeout
        )
    else:
        archive = Path(source).expanduser()
        if not archive.exists():
            raise SourceError(
                f"{source}: no such file or folder (expected 'demo', a UTKFace folder or archive, "
                "a CSV manifest, or an http(s)/s3 URL)"
            )
        if archive.is_dir() or archive.suffix.lower() == ".csv":
            if sha256:
                raise SourceError(f"{source}: --sha256 checks an archive or a download, not a folder or manifest")
            return sources.read_utkface_folder(archive) if archive.is_dir() else sources.read_manifest(archive)
    if sha256:
        sources.check_sha256(archive, sha256, origin=source)
    return sources.read_utkface_folder(sources.extract_archive(archive, scratch / "extracted", origin=source))


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
