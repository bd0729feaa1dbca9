"""Shared fixtures: the real UTKFace images from ../shared and throwaway git + DVC repos."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

PROJECT = Path(__file__).resolve().parents[1]
UTKFACE = PROJECT.parent / "shared" / "datasets" / "utkface-part1"
MALFORMED = ["61_1_20170109142408075.jpg.chip.jpg", "61_3_20170109150557335.jpg.chip.jpg"]
BIN = Path(sys.executable).parent

# Commits in throwaway repos need an identity; CI machines have none configured.
os.environ.setdefault("GIT_AUTHOR_NAME", "agegender tests")
os.environ.setdefault("GIT_AUTHOR_EMAIL", "tests@example.invalid")
os.environ.setdefault("GIT_COMMITTER_NAME", "agegender tests")
os.environ.setdefault("GIT_COMMITTER_EMAIL", "tests@example.invalid")
os.environ["PATH"] = f"{BIN}{os.pathsep}{os.environ['PATH']}"


MLFLOW_STORE_VARS = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")


@pytest.fixture(autouse=True)
def isolated_mlflow_store():
    """Each test sees only the store it names.

    mlflow.set_tracking_uri also exports MLFLOW_TRACKING_URI so that subprocesses
    inherit it; without this, one test's store leaks into the next test's `dvc repro`.
    """
    for name in MLFLOW_STORE_VARS:
        os.environ.pop(name, None)
    yield
    if "mlflow" in sys.modules:
        import mlflow

        mlflow.set_tracking_uri(None)
        mlflow.set_registry_uri(None)
    for name in MLFLOW_STORE_VARS:
        os.environ.pop(name, None)


def utkface_files(count: int, offset: int = 0) -> list[Path]:
    """A deterministic spread of well-formed UTKFace chips (every k-th file by name)."""
    if not UTKFACE.is_dir():
        pytest.fail(f"the real test images are missing: {UTKFACE} (CI must provide ../shared)")
    files = sorted(p for p in UTKFACE.iterdir() if p.name not in MALFORMED)
    step = max(len(files) // count, 1)
    return files[offset::step][:count]


@pytest.fixture(scope="session")
def utkface_dir() -> Path:
    if not UTKFACE.is_dir():
        pytest.fail(f"the real test images are missing: {UTKFACE} (CI must provide ../shared)")
    return UTKFACE


@pytest.fixture
def utk_subset(tmp_path: Path) -> Path:
    """A folder of 300 real chips plus the two malformed names (copied into tmp, never the project)."""
    folder = tmp_path / "utk"
    folder.mkdir()
    for path in utkface_files(300) + [UTKFACE / name for name in MALFORMED]:
        shutil.copyfile(path, folder / path.name)
    return folder


def run(*args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    """Run a real command (agegender, dvc, git) the way a user would."""
    result = subprocess.run(args, cwd=cwd, capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited {result.returncode}\n{result.stdout}\n{result.stderr}")
    return result


@pytest.fixture
def project_repo(tmp_path: Path) -> Path:
    """A fresh git + DVC repository holding this project's dvc.yaml and params.yaml."""
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in ("dvc.yaml", "params.yaml", ".gitignore"):
        shutil.copyfile(PROJECT / name, repo / name)
    # dvc.yaml names the library modules as deps; link the real ones in.
    (repo / "src").symlink_to(PROJECT / "src")
    run("git", "init", "-q", cwd=repo)
    run("dvc", "init", "-q", cwd=repo)
    run("dvc", "remote", "add", "-d", "local", str(tmp_path / "remote"), cwd=repo)
    run("git", "add", "-A", cwd=repo)
    run("git", "commit", "-qm", "init", cwd=repo)
    return repo
