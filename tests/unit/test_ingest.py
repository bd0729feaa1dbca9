"""Ingest: name parsing, every source form, and bad input that must change nothing."""

import csv
import io
import os
import shutil
import tarfile
import zipfile
from pathlib import Path

import pytest

from agegender.config import DemoParams
from agegender.data.ingest import ingest
from agegender.data.sources import SourceError, parse_utkface_name
from tests.conftest import MALFORMED, UTKFACE, utkface_files

DEMO = DemoParams(count=20, image_size=64, seed=1)


def read_rows(data_dir: Path) -> list[dict]:
    with (data_dir / "labels.csv").open() as handle:
        return list(csv.DictReader(handle))


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("26_1_2_20170116174525125.jpg.chip.jpg", (26, 1, 2)),
        ("1_0_0_20161219140623097.jpg", (1, 0, 0)),
        ("116_1_4_20170120134744096.jpg.chip.jpg", (116, 1, 4)),
        (MALFORMED[0], None),
        (MALFORMED[1], None),
        ("portrait.jpg", None),
        ("26_x_2_20170116174525125.jpg", None),
    ],
)
def test_parse_utkface_name(name, expected):
    assert parse_utkface_name(name) == expected


@pytest.fixture
def chips(tmp_path) -> Path:
    folder = tmp_path / "chips"
    folder.mkdir()
    for path in utkface_files(12):
        shutil.copyfile(path, folder / path.name)
    return folder


@pytest.fixture
def existing(tmp_path, chips) -> Path:
    """A data/ folder holding a first batch, as a user would have it before a bad ingest."""
    data_dir = tmp_path / "data"
    ingest(str(chips), data_dir, append=False, demo=DEMO)
    return data_dir


def test_utkface_folder(tmp_path, chips):
    report = ingest(str(chips), tmp_path / "data", append=False, demo=DEMO)
    rows = read_rows(tmp_path / "data")
    assert report.added == len(rows) == 12
    assert {r["source"] for r in rows} == {str(chips)}
    first = rows[0]
    assert (tmp_path / "data" / first["file"]).read_bytes() == (chips / Path(first["file"]).name).read_bytes()
    assert (first["age"], first["gender"], first["race"]) == tuple(
        str(v) for v in parse_utkface_name(Path(first["file"]).name)
    )


def test_malformed_names_are_kept_with_empty_labels(tmp_path, chips):
    for name in MALFORMED:
        shutil.copyfile(UTKFACE / name, chips / name)
    ingest(str(chips), tmp_path / "data", append=False, demo=DEMO)
    rows = {Path(r["file"]).name: r for r in read_rows(tmp_path / "data")}
    for name in MALFORMED:
        assert rows[name]["age"] == rows[name]["gender"] == rows[name]["race"] == ""


def test_append_skips_content_already_present(tmp_path, chips, existing):
    more = tmp_path / "more"
    more.mkdir()
    for path in utkface_files(12, offset=3):
        shutil.copyfile(path, more / path.name)
    shutil.copyfile(next(chips.iterdir()), more / "renamed_copy_1_0_0_20170101000000000.jpg")
    report = ingest(str(more), existing, append=True, demo=DEMO)
    assert report.skipped_duplicates == 1
    assert report.total == 12 + report.added
    assert len(read_rows(existing)) == report.total


def test_manifest(tmp_path):
    folder = tmp_path / "m"
    (folder / "img").mkdir(parents=True)
    files = utkface_files(3)
    for path in files:
        shutil.copyfile(path, folder / "img" / path.name)
    (folder / "labels.csv").write_text(
        "path,age,gender,race\n"
        + "".join(f"img/{p.name},{30 + i},{i % 2},\n" for i, p in enumerate(files))
        + "img/gone.jpg,40,1,2\n"
    )
    ingest(str(folder / "labels.csv"), tmp_path / "data", append=False, demo=DEMO)
    rows = read_rows(tmp_path / "data")
    assert [r["age"] for r in rows] == ["30", "31", "32", "40"]
    # The missing image stays as a row without a file, for validation to quarantine.
    assert not (tmp_path / "data" / rows[-1]["file"]).exists()


def test_zip_archive(tmp_path, chips):
    archive = tmp_path / "batch.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in chips.iterdir():
            zf.write(path, f"UTKFace/{path.name}")
    assert ingest(str(archive), tmp_path / "data", append=False, demo=DEMO).added == 12


def test_demo_is_deterministic(tmp_path):
    ingest("demo", tmp_path / "a", append=False, demo=DEMO)
    ingest("demo", tmp_path / "b", append=False, demo=DEMO)
    assert snapshot(tmp_path / "a") == snapshot(tmp_path / "b")
    assert {r["source"] for r in read_rows(tmp_path / "a")} == {"demo"}


def zip_slip(tmp_path: Path) -> Path:
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("ok/1_0_0_20170101000000000.jpg", b"x")
        zf.writestr("../../escaped_1_0_0_20170101000000000.jpg", b"x")
    return archive


def tar_slip(tmp_path: Path) -> Path:
    archive = tmp_path / "evil.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        info = tarfile.TarInfo("../escaped_1_0_0_20170101000000000.jpg")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    return archive


def tar_link_out(tmp_path: Path) -> Path:
    archive = tmp_path / "link.tar"
    with tarfile.open(archive, "w") as tar:
        info = tarfile.TarInfo("1_0_0_20170101000000000.jpg")
        info.type = tarfile.SYMTYPE
        info.linkname = "/etc/passwd"
        tar.addfile(info)
    return archive


def folder_with_symlink_out(tmp_path: Path) -> Path:
    folder = tmp_path / "linked"
    folder.mkdir()
    shutil.copyfile(utkface_files(1)[0], folder / "1_0_0_20170101000000000.jpg")
    outside = tmp_path / "outside_1_0_0_20170101000000000.jpg"
    shutil.copyfile(utkface_files(1, offset=2)[0], outside)
    os.symlink(outside, folder / "2_0_0_20170101000000000.jpg")
    return folder


def empty_folder(tmp_path: Path) -> Path:
    (tmp_path / "empty").mkdir()
    return tmp_path / "empty"


def not_utkface_names(tmp_path: Path) -> Path:
    folder = tmp_path / "plain"
    folder.mkdir()
    shutil.copyfile(utkface_files(1)[0], folder / "holiday.jpg")
    return folder


def manifest(tmp_path: Path, text: str) -> Path:
    (tmp_path / "manifest.csv").write_text(text)
    return tmp_path / "manifest.csv"


@pytest.mark.parametrize(
    ("make_source", "message"),
    [
        (lambda t: t / "does-not-exist", "no such file or folder"),
        (empty_folder, "no image files"),
        (not_utkface_names, "no file name follows the UTKFace convention"),
        (zip_slip, "unsafe archive entry refused"),
        (tar_slip, "unsafe archive entry refused"),
        (tar_link_out, "unsafe archive entry refused"),
        (folder_with_symlink_out, "symbolic link points outside the source folder"),
        (lambda t: manifest(t, "file,age\nx.jpg,3\n"), "missing column(s) path, gender"),
        (lambda t: manifest(t, "path,age,gender\nx.jpg,old,1\n"), "line 2: age 'old' is not a non-negative integer"),
        (lambda t: manifest(t, "path,age,gender\n../x.jpg,3,1\n"), "leaves the manifest's folder"),
        (lambda t: manifest(t, "path,age,gender\n"), "no rows"),
        (lambda t: (t / "bad.zip").write_bytes(b"not a zip") and t / "bad.zip", "not a readable zip archive"),
        (lambda t: "http://127.0.0.1:9/utkface.tar.gz", "download failed"),
    ],
)
def test_bad_source_changes_nothing(tmp_path, existing, make_source, message):
    before = snapshot(existing)
    with pytest.raises(SourceError) as err:
        ingest(str(make_source(tmp_path)), existing, append=False, demo=DEMO)
    assert message in str(err.value)
    assert snapshot(existing) == before
    assert not list(existing.parent.glob(".data-*")), "a staging folder was left behind"
    assert not (tmp_path.parent / "escaped_1_0_0_20170101000000000.jpg").exists()


def test_failed_tracking_restores_previous_dataset(tmp_path, chips, existing):
    before = snapshot(existing)

    def broken_tracking():
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        ingest("demo", existing, append=False, demo=DEMO, track=broken_tracking)
    assert snapshot(existing) == before


def test_demo_append_is_refused(tmp_path, existing):
    with pytest.raises(SourceError, match="--append is for batches of real images"):
        ingest("demo", existing, append=True, demo=DEMO)
