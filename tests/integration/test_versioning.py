"""A DVC remote that cannot be reached: the push is reported, the pull is an error, not a fallback."""

from __future__ import annotations

import shutil

import pytest

from agegender.config import DataParams
from agegender.data.fetch import fetch_dataset, ingest_tracked
from agegender.data.versioning import VersioningError
from tests.conftest import copy_utk_subset, run

pytestmark = pytest.mark.slow
DATA = DataParams()


@pytest.fixture
def unreachable_remote(project_repo, monkeypatch):
    """The project's default remote is an S3 endpoint where nothing listens (port 9 on 127.0.0.1)."""
    run("dvc", "remote", "add", "-f", "-d", "team", "s3://agegender-dvc/store", cwd=project_repo)
    run("dvc", "remote", "modify", "team", "endpointurl", "http://127.0.0.1:9", cwd=project_repo)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    return project_repo


def test_ingest_with_the_remote_down_tracks_locally_and_says_push_failed(unreachable_remote, tmp_path):
    repo = unreachable_remote
    result = ingest_tracked(
        repo, str(copy_utk_subset(tmp_path / "utk", count=20)), append=False, demo=DATA.demo, checks=DATA.ingest
    )
    assert result.added == 22 and result.remote is None
    assert "dvc push to remote 'team' failed" in result.push_error
    assert (repo / "data.dvc").exists()


def test_fetch_with_the_remote_down_is_an_error_not_a_fresh_ingest(unreachable_remote, tmp_path):
    repo = unreachable_remote
    ingest_tracked(
        repo, str(copy_utk_subset(tmp_path / "utk", count=20)), append=False, demo=DATA.demo, checks=DATA.ingest
    )
    pointer = (repo / "data.dvc").read_bytes()
    shutil.rmtree(repo / "data")
    shutil.rmtree(repo / ".dvc" / "cache")
    with pytest.raises(VersioningError, match="dvc pull of data.dvc from remote 'team' failed"):
        fetch_dataset(repo, "demo", DATA.demo, DATA.ingest)
    assert (repo / "data.dvc").read_bytes() == pointer and not (repo / "data").exists()
