"""Readers that turn a dataset source into labelled items, without touching data/.

A source is `demo`, a UTKFace folder or archive, a CSV manifest, or the URL of an
archive. Every reader returns `Item`s; `ingest` copies them into place.
"""

from __future__ import annotations

import csv
import re
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".zip")
URL_SCHEMES = ("http://", "https://", "s3://", "gs://")
UTKFACE_NAME = re.compile(r"^(\d+)_(\d+)_(\d+)_\d+")
MANIFEST_COLUMNS = ("path", "age", "gender")


class SourceError(ValueError):
    """The source cannot be read; the message says what is wrong with it."""


@dataclass(frozen=True)
class Item:
    """One image to ingest. `path` is None when the manifest names a missing file:
    the row is kept so validation quarantines it instead of it vanishing."""

    name: str
    path: Path | None
    age: int | None
    gender: int | None
    race: int | None


def parse_utkface_name(name: str) -> tuple[int, int, int] | None:
    """(age, gender, race) from `[age]_[gender]_[race]_[datetime].jpg[.chip.jpg]`.

    Names that do not follow the convention give None: their labels are unknown,
    and validation quarantines them rather than guessing.
    """
    match = UTKFACE_NAME.match(name)
    if not match:
        return None
    age, gender, race = (int(group) for group in match.groups())
    return age, gender, race


def read_utkface_folder(root: Path) -> list[Item]:
    """Every image below `root`, labelled from its UTKFace file name."""
    files = list_images(root)
    items = []
    for path in files:
        labels = parse_utkface_name(path.name)
        age, gender, race = labels if labels else (None, None, None)
        items.append(Item(name=path.name, path=path, age=age, gender=gender, race=race))
    if not any(item.age is not None for item in items):
        raise SourceError(
            f"{root}: no file name follows the UTKFace convention "
            "[age]_[gender]_[race]_[datetime].jpg; for other names use a CSV manifest"
        )
    return items


def list_images(root: Path) -> list[Path]:
    """Image files below root, sorted; refuses links that leave the tree."""
    if not root.is_dir():
        raise SourceError(f"{root}: not a folder")
    real_root = root.resolve()
    files = []
    for path in sorted(root.rglob("*")):
        if path.suffix.lower() not in IMAGE_SUFFIXES or path.is_dir():
            continue
        if not path.resolve().is_relative_to(real_root):
            raise SourceError(f"{path}: symbolic link points outside the source folder; refusing it")
        files.append(path)
    if not files:
        raise SourceError(f"{root}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) found")
    return files


def read_manifest(manifest: Path) -> list[Item]:
    """Items from a CSV with columns path,age,gender[,race]; paths relative to the CSV."""
    with manifest.open(newline="") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in MANIFEST_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise SourceError(
                f"{manifest}: missing column(s) {', '.join(missing)}; "
                f"expected path,age,gender[,race], got {reader.fieldnames}"
            )
        rows = list(reader)
    if not rows:
        raise SourceError(f"{manifest}: no rows")
    base = manifest.parent.resolve()
    items = []
    for line, row in enumerate(rows, start=2):
        path = (base / row["path"]).resolve()
        if not path.is_relative_to(base):
            raise SourceError(f"{manifest} line {line}: path {row['path']!r} leaves the manifest's folder")
        items.append(
            Item(
                name=path.name,
                path=path if path.is_file() else None,
                age=_parse_int(row["age"], "age", manifest, line, required=True),
                gender=_parse_int(row["gender"], "gender", manifest, line, required=True),
                race=_parse_int(row.get("race") or "", "race", manifest, line, required=False),
            )
        )
    return items


def _parse_int(text: str, column: str, manifest: Path, line: int, *, required: bool) -> int | None:
    text = text.strip()
    if not text and not required:
        return None
    if not re.fullmatch(r"\d+", text):
        raise SourceError(f"{manifest} line {line}: {column} {text!r} is not a non-negative integer")
    return int(text)


def extract_archive(archive: Path, dest: Path) -> Path:
    """Unpack a .tar.gz/.tgz/.tar/.zip into dest, refusing entries that would land outside it."""
    name = archive.name.lower()
    if name.endswith(".zip"):
        _extract_zip(archive, dest)
    elif name.endswith((".tar.gz", ".tgz", ".tar")):
        try:
            with tarfile.open(archive) as tar:
                # The "data" filter rejects absolute paths, "..", links out of dest and devices.
                tar.extractall(dest, filter="data")
        except tarfile.FilterError as err:
            raise SourceError(f"{archive}: unsafe archive entry refused: {err}") from err
        except (tarfile.TarError, EOFError, OSError) as err:
            raise SourceError(f"{archive}: not a readable tar archive: {err}") from err
    else:
        raise SourceError(f"{archive}: unknown archive type; expected one of {', '.join(ARCHIVE_SUFFIXES)}")
    return dest


def _extract_zip(archive: Path, dest: Path) -> None:
    try:
        with zipfile.ZipFile(archive) as zf:
            real_dest = dest.resolve()
            for info in zf.infolist():
                target = (dest / info.filename).resolve()
                is_symlink = (info.external_attr >> 16) & 0o170000 == 0o120000
                if not target.is_relative_to(real_dest) or is_symlink:
                    raise SourceError(f"{archive}: unsafe archive entry refused: {info.filename!r}")
            zf.extractall(dest)
    except zipfile.BadZipFile as err:
        raise SourceError(f"{archive}: not a readable zip archive: {err}") from err


def download(url: str, dest_dir: Path) -> Path:
    """Fetch the archive at url (http, https, s3, gs) into dest_dir with fsspec."""
    import fsspec

    file_name = url.rstrip("/").rsplit("/", 1)[-1].split("?")[0] or "download"
    target = dest_dir / file_name
    try:
        with fsspec.open(url, "rb") as remote, target.open("wb") as local:
            while chunk := remote.read(1 << 20):
                local.write(chunk)
    except ImportError as err:
        raise SourceError(f"{url}: this URL scheme needs an extra package: {err}") from err
    except Exception as err:  # fsspec raises backend-specific errors (aiohttp, botocore, ...)
        raise SourceError(f"{url}: download failed: {type(err).__name__}: {err}") from err
    return target
