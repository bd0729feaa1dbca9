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

from tests.conftest import MALFORMED, PROJECT, run, utkface_files

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
