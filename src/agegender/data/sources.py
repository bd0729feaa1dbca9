"""Readers that turn a dataset source into labelled items, without touching data/.

A source is `demo`, a UTKFace folder or archive, a CSV manifest, or the URL of an
archive. Every reader returns `Item`s; `ingest` copies them into place.
"""

from __future__ import annotations

import csv
import hashlib
import re
import tarfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".zip")
URL_SCHEMES = ("http://", "https://", "s3://")
UTKFACE_NAME = re.compile(r"^(\d+)_(\d+)_(\d+)_\d+")
MANIFEST_COLUMNS = ("path", "age", "gender")
SHOWN_PROBLEMS = 5  # an error lists this many offending files or lines, then counts the rest


class SourceError(ValueError):
    """The source cannot be read; the message says what is wrong with it."""


@dataclass(frozen=True)
class Item:
    """One image file to ingest, with its labels (None where unknown)."""

    name: str
    path: Path
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
    items, not_found = [], []
    for line, row in enumerate(rows, start=2):
        path = (base / row["path"]).resolve()
        if not path.is_relative_to(base):
            raise SourceError(f"{manifest} line {line}: path {row['path']!r} leaves the manifest's folder")
        if not path.is_file():
            not_found.append(f"line {line} {row['path']!r}")
        items.append(
            Item(
                name=path.name,
                path=path,
                age=_parse_int(row["age"], "age", manifest, line, required=True),
                gender=_parse_int(row["gender"], "gender", manifest, line, required=True),
                race=_parse_int(row.get("race") or "", "race", manifest, line, required=False),
            )
        )
    if not_found:
        raise SourceError(
            f"{manifest}: {len(not_found)} of {len(rows)} image files not found: {list_problems(not_found)}"
        )
    return items


def list_problems(problems: list[str]) -> str:
    """The first few problems, then how many more: an error stays readable for a large dataset."""
    shown = "; ".join(problems[:SHOWN_PROBLEMS])
    more = len(problems) - SHOWN_PROBLEMS
    return shown + (f"; and {more} more" if more > 0 else "")


def _parse_int(text: str, column: str, manifest: Path, line: int, *, required: bool) -> int | None:
    text = text.strip()
    if not text and not required:
        return None
    if not re.fullmatch(r"\d+", text):
        raise SourceError(f"{manifest} line {line}: {column} {text!r} is not a non-negative integer")
    return int(text)


def extract_archive(archive: Path, dest: Path, *, origin: str | None = None) -> Path:
    """Unpack a complete .tar.gz/.tgz/.tar/.zip into dest, refusing entries that would land outside it.

    Errors name `origin` (the URL an archive was downloaded from), else the archive's path.
    """
    origin = origin or str(archive)
    name = archive.name.lower()
    if name.endswith(".zip"):
        _extract_zip(archive, dest, origin)
    elif name.endswith((".tar.gz", ".tgz", ".tar")):
        _extract_tar(archive, dest, origin)
    else:
        raise SourceError(f"{origin}: unknown archive type; expected one of {', '.join(ARCHIVE_SUFFIXES)}")
    return dest


def _extract_tar(archive: Path, dest: Path, origin: str) -> None:
    try:
        with tarfile.open(archive) as tar:
            # The "data" filter rejects absolute paths, "..", links out of dest and devices.
            tar.extractall(dest, filter="data")
            _check_tar_end(tar, origin)
    except tarfile.FilterError as err:
        raise SourceError(f"{origin}: unsafe archive entry refused: {err}") from err
    except (tarfile.TarError, EOFError, zlib.error, OSError) as err:
        raise SourceError(f"{origin}: not a complete, readable tar archive: {err}") from err


def _check_tar_end(tar: tarfile.TarFile, origin: str) -> None:
    """Refuse a tar cut short: tarfile takes the end of the file for the end of the archive.

    A complete tar ends with two zero blocks after its last entry (tar.offset, once every
    member is read); reading on to the end also checks a gzip stream's length and CRC.
    """
    tar.fileobj.seek(tar.offset)
    end = tar.fileobj.read(2 * tarfile.BLOCKSIZE)
    if end != bytes(2 * tarfile.BLOCKSIZE):
        last = tar.getmembers()[-1].name if tar.getmembers() else "none"
        raise SourceError(
            f"{origin}: incomplete tar archive: no end-of-archive marker after the last entry ({last}); "
            "the file was probably cut short"
        )
    while tar.fileobj.read(1 << 20):
        pass


def _extract_zip(archive: Path, dest: Path, origin: str) -> None:
    try:
        with zipfile.ZipFile(archive) as zf:
            real_dest = dest.resolve()
            for info in zf.infolist():
                target = (dest / info.filename).resolve()
                is_symlink = (info.external_attr >> 16) & 0o170000 == 0o120000
                if not target.is_relative_to(real_dest) or is_symlink:
                    raise SourceError(f"{origin}: unsafe archive entry refused: {info.filename!r}")
            # Reading each entry checks its CRC; a zip cut short has no central directory and fails to open.
            zf.extractall(dest)
    except (zipfile.BadZipFile, EOFError, zlib.error) as err:
        raise SourceError(f"{origin}: not a readable zip archive (cut short or corrupt): {err}") from err


def check_sha256(archive: Path, expected: str, *, origin: str | None = None) -> None:
    """Refuse an archive whose SHA-256 is not the one the user gave."""
    digest = hashlib.sha256()
    with archive.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    if digest.hexdigest() != expected.lower():
        raise SourceError(
            f"{origin or archive}: SHA-256 is {digest.hexdigest()}, expected {expected.lower()} (--sha256)"
        )


def download(url: str, dest_dir: Path, *, connect_timeout: float, read_timeout: float) -> Path:
    """Fetch the archive at url (http, https, s3) into dest_dir with fsspec.

    An http(s) download fails when connecting takes longer than connect_timeout or no byte
    arrives for read_timeout seconds, and when the body is shorter than its Content-Length.
    """
    import fsspec

    file_name = url.rstrip("/").rsplit("/", 1)[-1].split("?")[0] or "download"
    target = dest_dir / file_name
    try:
        with fsspec.open(url, "rb", **_storage_options(url, connect_timeout, read_timeout)) as remote:
            with target.open("wb") as local:
                while chunk := remote.read(1 << 20):
                    local.write(chunk)
    except ImportError as err:
        raise SourceError(f"{url}: this URL scheme needs an extra package: {err}") from err
    except TimeoutError as err:  # fsspec's FSTimeoutError, caused by aiohttp's connect or read timeout
        raise SourceError(
            f"{url}: download timed out ({err.__cause__ or err}); limits: data.ingest.connect_timeout="
            f"{connect_timeout:g} s, data.ingest.read_timeout={read_timeout:g} s"
        ) from err
    except Exception as err:  # fsspec raises backend-specific errors (aiohttp, botocore, ...)
        # aiohttp can quote the whole offending body in its message (with escaped newlines): keep the first line.
        detail = re.split(r"\n|\\n", str(err))[0][:300]
        raise SourceError(f"{url}: download failed: {type(err).__name__}: {detail}") from err
    return target


def _storage_options(url: str, connect_timeout: float, read_timeout: float) -> dict:
    if not url.startswith(("http://", "https://")):
        return {}
    import aiohttp

    # block_size=0 streams one GET: aiohttp then refuses a body shorter than its Content-Length.
    timeout = aiohttp.ClientTimeout(sock_connect=connect_timeout, sock_read=read_timeout)
    return {"block_size": 0, "client_kwargs": {"timeout": timeout}}
