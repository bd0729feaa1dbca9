"""Ingest and validate real UTKFace images with the real CLI inside a git + DVC repository."""

import functools
import http.server
import json
import shutil
import tarfile
import threading
from pathlib import Path

import pytest
import yaml

from tests.conftest import MALFORMED, PROJECT, run, set_params, utkface_files
from tests.unit.test_ingest import labelled_folder, serve_archives, snapshot, tar_bytes

pytestmark = pytest.mark.slow


def summary(repo: Path) -> dict:
    return json.loads((repo / "artifacts/validation/summary.json").read_text())


def test_ingest_and_validate_real_images(project_repo, utk_subset):
    out = run("agegender", "data", "ingest", str(utk_subset), cwd=project_repo)
    assert "302 images added" in out.stderr.replace("\n", " ")
    assert (project_repo / "data.dvc").exists()

    run("dvc", "repro", "validate", cwd=project_repo)
    result = summary(project_repo)
    assert result["success"] is True
    assert result["rows_total"] == 302 and result["rows_valid"] == 300
    assert sorted(Path(q["file"]).name for q in result["quarantined"]) == sorted(MALFORMED)
    assert all("label missing" in q["reason"] for q in result["quarantined"])
    assert (project_repo / "artifacts/validation/data_docs/index.html").exists()
    manifest = (project_repo / "artifacts/validation/manifest.csv").read_text()
    assert not any(name in manifest for name in MALFORMED)

    # Nothing changed: DVC runs nothing.
    again = run("dvc", "repro", "validate", cwd=project_repo)
    assert "didn't change, skipping" in again.stdout and "Running stage" not in again.stdout

    # The dataset went to the default remote: a fresh checkout can pull it back.
    shutil.rmtree(project_repo / "data")
    shutil.rmtree(project_repo / ".dvc" / "cache")
    run("agegender", "data", "fetch", cwd=project_repo)
    assert len(list((project_repo / "data/images").iterdir())) == 302


def test_append_a_batch_then_revalidate(project_repo, tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    for folder, offset in ((first, 0), (second, 1)):
        folder.mkdir()
        for path in utkface_files(150, offset=offset):
            shutil.copyfile(path, folder / path.name)
    shutil.copyfile(next(first.iterdir()), second / "99_0_0_20170101000000000.jpg")  # already present

    run("agegender", "data", "ingest", str(first), cwd=project_repo)
    version_1 = yaml.safe_load((project_repo / "data.dvc").read_text())["outs"][0]["md5"]
    out = run("agegender", "data", "ingest", str(second), "--append", cwd=project_repo)
    assert "150 images added, 1 skipped" in out.stderr.replace("\n", " ")
    version_2 = yaml.safe_load((project_repo / "data.dvc").read_text())["outs"][0]["md5"]
    assert version_1 != version_2
    run("dvc", "repro", "validate", cwd=project_repo)
    assert summary(project_repo)["rows_valid"] == 300


def test_ingest_from_a_url(project_repo, tmp_path, utk_subset):
    served = tmp_path / "served"
    served.mkdir()
    with tarfile.open(served / "utkface.tar.gz", "w:gz") as tar:
        tar.add(utk_subset, arcname="UTKFace")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}"
        run("agegender", "data", "ingest", f"{url}/utkface.tar.gz", cwd=project_repo)
        assert len(list((project_repo / "data/images").iterdir())) == 302
        before = (project_repo / "data.dvc").read_bytes()
        missing = run("agegender", "data", "ingest", f"{url}/nope.tar.gz", cwd=project_repo, check=False)
        assert missing.returncode == 1 and "download failed" in missing.stderr
        assert (project_repo / "data.dvc").read_bytes() == before
    finally:
        server.shutdown()


def dataset_state(repo: Path) -> dict:
    """What a failed ingest must leave as it was: data/, data.dvc, the DVC cache and the DVC remote."""
    folders = {name: snapshot(repo / name) for name in ("data", ".dvc/cache", "../remote")}
    return {**folders, "data.dvc": (repo / "data.dvc").read_bytes()}


def test_failed_ingests_change_nothing(project_repo, tmp_path):
    """Issue 9: each bad ingest exits 1 and says why; data/, data.dvc, the cache and the remote stay as they were."""
    chips, few = tmp_path / "chips", tmp_path / "few"
    for folder, files in ((chips, utkface_files(30)), (few, utkface_files(4, offset=2))):
        folder.mkdir()
        for path in files:
            shutil.copyfile(path, folder / path.name)
    run("agegender", "data", "ingest", str(chips), cwd=project_repo)
    set_params(project_repo, {"data": {"ingest": {"connect_timeout": 5, "read_timeout": 2}}})
    (tmp_path / "m.csv").write_text("path,age,gender\nnope.jpg,30,1\n")
    batch = labelled_folder(tmp_path / "batch", utkface_files(5, offset=1), missing=1)
    before = dataset_state(project_repo)
    with serve_archives({"utkface.tar": tar_bytes(utkface_files(30, offset=1))}) as url:
        cases = [
            ([str(tmp_path / "m.csv")], "1 of 1 image files not found: line 2 'nope.jpg'"),
            ([str(batch), "--append"], "1 of 6 image files not found: line 7 'img/gone0.jpg'"),
            ([f"{url}/cut/utkface.tar"], "incomplete tar archive: no end-of-archive marker"),
            ([f"{url}/short/utkface.tar"], "content length"),
            ([f"{url}/stall/utkface.tar"], "download timed out"),
            ([str(few)], "would replace the 30 images in"),
            ([f"{url}/whole/utkface.tar", "--sha256", "0" * 64], "SHA-256 is"),
        ]
        for args, message in cases:
            result = run("agegender", "data", "ingest", *args, cwd=project_repo, check=False)
            said = result.stderr.replace("\n", " ")
            assert result.returncode == 1 and message in said and "Nothing was changed" in said, (args, said)
            assert dataset_state(project_repo) == before, args

    out = run("agegender", "data", "ingest", str(few), "--replace", cwd=project_repo)
    assert "4 images added, 0 skipped (content already present), 4 in data/labels.csv" in out.stderr.replace("\n", " ")
    assert dataset_state(project_repo)["data.dvc"] != before["data.dvc"]


def test_validation_failure_stops_the_pipeline(project_repo, utk_subset):
    run("agegender", "data", "ingest", str(utk_subset), cwd=project_repo)
    params = yaml.safe_load((project_repo / "params.yaml").read_text())
    params["validate"]["min_rows"] = 1000
    (project_repo / "params.yaml").write_text(yaml.safe_dump(params))
    result = run("dvc", "repro", "validate", cwd=project_repo, check=False)
    assert result.returncode != 0
    assert "validate.min_rows" in result.stdout + result.stderr
    assert summary(project_repo)["success"] is False


def test_demo_data_matches_the_committed_version(project_repo):
    """A fresh clone regenerates the demo data byte for byte: same md5 as the committed data.dvc."""
    run("agegender", "data", "ingest", "demo", cwd=project_repo)
    committed = yaml.safe_load((PROJECT / "data.dvc").read_text())["outs"][0]["md5"]
    regenerated = yaml.safe_load((project_repo / "data.dvc").read_text())["outs"][0]["md5"]
    assert regenerated == committed
    run("dvc", "repro", "validate", cwd=project_repo)
    assert summary(project_repo)["success"] is True
