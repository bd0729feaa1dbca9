"""Ingest: name parsing, every source form, and bad input that must change nothing."""

import contextlib
import csv
import functools
import hashlib
import http.server
import io
import os
import re
import shutil
import tarfile
import threading
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from agegender.config import DemoParams, IngestParams
from agegender.data.ingest import check_size, ingest
from agegender.data.sources import SourceError, parse_utkface_name
from tests.conftest import MALFORMED, UTKFACE, utkface_files

DEMO = DemoParams(count=20, image_size=64, seed=1)
# A stalled download fails in 2 s; long enough that a busy test machine does not trip it.
FAST = IngestParams(connect_timeout=5, read_timeout=2)


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


def labelled_folder(folder: Path, files: list[Path], missing: int = 0) -> Path:
    """A folder of images with a manifest labels.csv naming them, plus `missing` rows whose file is gone."""
    (folder / "img").mkdir(parents=True)
    for path in files:
        shutil.copyfile(path, folder / "img" / path.name)
    (folder / "labels.csv").write_text(
        "path,age,gender,race\n"
        + "".join(f"img/{p.name},{30 + i},{i % 2},\n" for i, p in enumerate(files))
        + "".join(f"img/gone{i}.jpg,40,1,2\n" for i in range(missing))
    )
    return folder / "labels.csv"


def test_manifest(tmp_path):
    report = ingest(str(labelled_folder(tmp_path / "m", utkface_files(3))), tmp_path / "data", append=False, demo=DEMO)
    rows = read_rows(tmp_path / "data")
    assert [r["age"] for r in rows] == ["30", "31", "32"]
    assert report.added == report.total == 3
    assert all((tmp_path / "data" / r["file"]).is_file() for r in rows)


def test_append_with_a_missing_file_changes_nothing(tmp_path, existing):
    """The tester's case: --append with 1 of 6 paths missing reported 6 added."""
    before = snapshot(existing)
    source = labelled_folder(tmp_path / "m", utkface_files(5, offset=1), missing=1)
    with pytest.raises(SourceError, match=r"labels.csv: 1 of 6 image files not found: line 7 'img/gone0.jpg'"):
        ingest(str(source), existing, append=True, demo=DEMO)
    assert snapshot(existing) == before


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


def tar_bytes(files: list[Path]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for path in files:
            tar.add(path, arcname=f"UTKFace/{path.name}")
    return buffer.getvalue()


def cut_at_member(data: bytes, keep: int) -> bytes:
    """The tar cut where its member number `keep` starts: tarfile reads it as a complete tar of `keep` files."""
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return data[: tar.getmembers()[keep].offset]


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def cut_tar(tmp_path: Path) -> Path:
    return write(tmp_path / "cut.tar", cut_at_member(tar_bytes(utkface_files(12)), keep=4))


def cut_tar_gz(tmp_path: Path) -> Path:
    whole = tmp_path / "whole.tar.gz"
    with tarfile.open(whole, "w:gz") as tar:
        for path in utkface_files(12):
            tar.add(path, arcname=path.name)
    return write(tmp_path / "cut.tar.gz", whole.read_bytes()[:-8])  # everything but the gzip trailer


def cut_zip(tmp_path: Path) -> Path:
    whole = tmp_path / "whole.zip"
    with zipfile.ZipFile(whole, "w") as zf:
        for path in utkface_files(12):
            zf.write(path, path.name)
    data = whole.read_bytes()
    return write(tmp_path / "cut.zip", data[: len(data) * 2 // 3])


def corrupt_image(tmp_path: Path) -> Path:
    folder = tmp_path / "corrupt"
    folder.mkdir()
    for path in utkface_files(12, offset=1):
        shutil.copyfile(path, folder / path.name)
    data = utkface_files(1, offset=2)[0].read_bytes()
    write(folder / "30_1_0_20170101000000000.jpg", data[: len(data) // 2])
    return folder


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
        (lambda t: manifest(t, "path,age,gender\nnope.jpg,30,1\n"), "1 of 1 image files not found: line 2 'nope.jpg'"),
        (lambda t: (t / "bad.zip").write_bytes(b"not a zip") and t / "bad.zip", "not a readable zip archive"),
        (lambda t: "http://127.0.0.1:9/utkface.tar.gz", "download failed"),
        (cut_tar, "incomplete tar archive: no end-of-archive marker"),
        (cut_tar_gz, "not a complete, readable tar archive: Compressed file ended"),
        (cut_zip, "not a readable zip archive (cut short or corrupt)"),
        (corrupt_image, "1 of 13 images do not decode: "),
        (lambda t: UTKFACE / utkface_files(1)[0].name, "unknown archive type"),
        (lambda t: write(t / "few.tar", tar_bytes(utkface_files(5))), "would replace the 12 images in"),
    ],
)
def test_bad_source_changes_nothing(tmp_path, existing, make_source, message):
    before = snapshot(existing)
    with pytest.raises(SourceError) as err:
        ingest(str(make_source(tmp_path)), existing, append=False, demo=DEMO, checks=FAST)
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


def test_corrupt_image_is_named(tmp_path, existing):
    with pytest.raises(SourceError, match=r"corrupt/30_1_0_20170101000000000.jpg: image is truncated or corrupt"):
        ingest(str(corrupt_image(tmp_path)), existing, append=False, demo=DEMO)


def test_much_smaller_dataset_needs_replace(tmp_path, existing):
    few = write(tmp_path / "few.tar", tar_bytes(utkface_files(5)))
    with pytest.raises(SourceError, match=r"with 5 \(fewer than 50% of them\); pass --replace"):
        ingest(str(few), existing, append=False, demo=DEMO)
    report = ingest(str(few), existing, append=False, demo=DEMO, replace=True)
    assert report.added == report.total == len(read_rows(existing)) == 5


@pytest.mark.parametrize(
    ("digest", "message"),
    [
        ("0" * 64, "SHA-256 is "),
        ("abc", "--sha256 'abc': expected 64 hexadecimal digits"),
    ],
)
def test_sha256_mismatch_changes_nothing(tmp_path, existing, digest, message):
    archive = write(tmp_path / "batch.tar", tar_bytes(utkface_files(12, offset=1)))
    before = snapshot(existing)
    with pytest.raises(SourceError, match=message):
        ingest(str(archive), existing, append=False, demo=DEMO, sha256=digest)
    assert snapshot(existing) == before


def test_sha256_only_checks_archives(tmp_path, chips, existing):
    with pytest.raises(SourceError, match="--sha256 checks an archive or a download, not a folder"):
        ingest(str(chips), existing, append=False, demo=DEMO, sha256="0" * 64)


class ArchiveHandler(http.server.BaseHTTPRequestHandler):
    """GET /<how>/<name> serves server.archives[name] the way <how> says (see HOW); HEAD, its headers."""

    def do_HEAD(self) -> None:
        self.answer(body=False)

    def do_GET(self) -> None:
        self.answer(body=True)

    def answer(self, *, body: bool) -> None:
        how, name = self.path.strip("/").split("/", 1)
        data = self.server.archives[name]
        self.send_response(200)
        length = {"whole": len(data), "stall": len(data), "short": len(data) + 1000, "long": len(data) // 2}
        if how in length:  # `cut` sends none, like a server streaming a file it is still reading
            self.send_header("Content-Length", str(length[how]))
        self.end_headers()
        if not body:
            return
        if how == "cut":
            self.wfile.write(cut_at_member(data, keep=4))
        elif how == "stall":
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self.server.released.wait(30)
        else:
            self.wfile.write(data)

    def log_message(self, *args) -> None:
        pass


@contextlib.contextmanager
def serve_archives(archives: dict[str, bytes]) -> Iterator[str]:
    """A real HTTP server on 127.0.0.1 serving `archives`; yields its base URL."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), ArchiveHandler)
    server.archives, server.released = archives, threading.Event()
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.released.set()
        server.shutdown()
        server.server_close()


@pytest.fixture
def served_tar() -> Iterator[tuple[str, str]]:
    """The URL of a tar of 12 real chips (other than those in `existing`) and its SHA-256."""
    data = tar_bytes(utkface_files(12, offset=1))
    with serve_archives({"utkface.tar": data}) as base:
        yield f"{base}/{{how}}/utkface.tar", hashlib.sha256(data).hexdigest()


def test_download_with_sha256(served_tar, existing):
    url, digest = served_tar
    report = ingest(url.format(how="whole"), existing, append=True, demo=DEMO, sha256=digest, checks=FAST)
    assert report.added == 12 and report.total == 24


@pytest.mark.parametrize(
    ("how", "message"),
    [
        ("cut", "incomplete tar archive: no end-of-archive marker after the last entry"),
        ("short", f"received {len(tar_bytes(utkface_files(12, offset=1)))} of"),
        # aiohttp refuses bytes past the Content-Length if they come with the body; else the tar is cut
        # (at a block boundary or inside one).
        ("long", "download failed|incomplete tar archive|not a complete, readable tar archive"),
        ("stall", r"download timed out .*data.ingest.read_timeout=2 s"),
    ],
)
def test_bad_download_changes_nothing(served_tar, existing, how, message):
    url, _ = served_tar
    before = snapshot(existing)
    started = time.monotonic()
    with pytest.raises(SourceError) as err:
        ingest(url.format(how=how), existing, append=False, demo=DEMO, checks=FAST)
    assert re.search(message, str(err.value))
    assert time.monotonic() - started < 10
    assert snapshot(existing) == before
    assert not list(existing.parent.glob(".data-*")), "a staging folder was left behind"


@pytest.mark.parametrize(
    ("current", "new", "replace", "message"),
    [
        (12, 6, False, None),  # half the current size is still allowed
        (12, 5, False, "would replace the 12 images in data with 5"),
        (12, 5, True, None),
        (12, 0, True, "nothing to ingest"),
        (0, 0, False, "nothing to ingest"),
    ],
)
def test_size_rule(current, new, replace, message):
    check = functools.partial(check_size, "src", Path("data"), current=current, new=new, replace=replace)
    if message is None:
        check()
    else:
        with pytest.raises(SourceError, match=message):
            check()
