"""Shared fixtures: the real UTKFace images from ../shared and throwaway git + DVC repos."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

PROJECT = Path(__file__).resolve().parents[1]
UTKFACE = PROJECT.parent / "shared" / "datasets" / "utkface-part1"
MALFORMED = ["61_1_20170109142408075.jpg.chip.jpg", "61_3_20170109150557335.jpg.chip.jpg"]
# A model trained for a few epochs is far from useful: these gates let it become champion.
OPEN_GATES = {"max_age_mae": 100.0, "min_gender_accuracy": 0.0, "max_group_gap": 100.0}
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


def copy_utk_subset(folder: Path, count: int = 300) -> Path:
    """A folder of `count` real chips plus the two malformed names (copied into tmp, never the project)."""
    folder.mkdir()
    for path in utkface_files(count) + [UTKFACE / name for name in MALFORMED]:
        shutil.copyfile(path, folder / path.name)
    return folder


@pytest.fixture
def utk_subset(tmp_path: Path) -> Path:
    return copy_utk_subset(tmp_path / "utk")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def set_params(repo: Path, changes: dict) -> None:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    for section, values in changes.items():
        if isinstance(values, dict):
            params[section].update(values)
        else:
            params[section] = values
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def start(args: list[str], *, cwd: Path, env: dict, log: Path) -> subprocess.Popen:
    """A long-running process in its own session (so stopping it stops its children too)."""
    with log.open("w") as handle:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(args, cwd=cwd, env=env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)


def stop(process: subprocess.Popen) -> None:
    """Stop a server and everything it started (bentoml's workers run in sessions of their own)."""
    import psutil

    try:
        family = psutil.Process(process.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        family = []
    for sig, grace in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            break
        try:
            process.wait(timeout=grace)
            break
        except subprocess.TimeoutExpired:
            continue
    for child in family:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass


def tail(log: Path, lines: int = 60) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:]) if log.exists() else ""


def wait_until(check, *, what: str, seconds: float, process: subprocess.Popen, log: Path):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"{what}: the process exited with {process.returncode}\n{tail(log)}")
        result = check()
        if result:
            return result
        time.sleep(1)
    raise AssertionError(f"{what}: not within {seconds} s\n{tail(log)}")


def answers_ok(url: str) -> bool:
    """True when a GET of url answers 200 (a server's health or readiness route)."""
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status == 200
    except OSError:
        return False


def run(*args: str, cwd: Path, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run a real command (agegender, dvc, git) the way a user would."""
    result = subprocess.run(args, cwd=cwd, capture_output=True, text=True, env=env)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited {result.returncode}\n{result.stdout}\n{result.stderr}")
    return result


@pytest.fixture
def project_repo(tmp_path: Path) -> Path:
    return make_project_repo(tmp_path)


def make_project_repo(tmp_path: Path) -> Path:
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
