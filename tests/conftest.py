"""Shared fixtures: the real UTKFace images from ../shared, throwaway git + DVC repos, the team stack."""

from __future__ import annotations

import fcntl
import os
import random
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

import agegender  # noqa: F401  # before any test module loads TensorFlow: it chooses TensorFlow's CPU kernels

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


# Modules sharing the team stack run in one test process (pytest-xdist's loadgroup), so its servers
# start once; every module stays whole in one process, so its module fixtures are built once. The
# trained template needs no group: the test processes share one copy on disk (trained_template).
SHARED_FIXTURE_GROUPS = ("team_stack",)


# The longest groups (several minutes each) start first, so that none is left running alone at the end;
# pyproject's --no-loadscope-reorder keeps this order (xdist would put the groups with most tests first).
LONGEST_GROUPS = ("tests.e2e.test_work_pool", "team_stack", "tests.e2e.test_service", "tests.e2e.test_scale_out_dask")


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    modules: dict[str, list[pytest.Item]] = {}
    for item in items:
        modules.setdefault(item.module.__name__, []).append(item)
    groups: dict[pytest.Item, str] = {}
    for module, module_items in modules.items():
        used = {name for item in module_items for name in item.fixturenames}
        group = next((name for name in SHARED_FIXTURE_GROUPS if name in used), module)
        for item in module_items:
            item.add_marker(pytest.mark.xdist_group(group))
            groups[item] = group
    rank = {group: n for n, group in enumerate(LONGEST_GROUPS)}
    items.sort(key=lambda item: rank.get(groups[item], len(rank)))  # stable: the rest keep their order


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


def printed_by_new_python(code: str, *, variable: str, setting: str | None) -> str:
    """What `code` prints in a new Python process whose environment sets `variable` to `setting` (None: unset)."""
    env = {k: v for k, v in os.environ.items() if k != variable} | ({variable: setting} if setting is not None else {})
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip()


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


# ---------------------------------------------------------------- the team stack

SEAWEED_PORTS = 7  # SeaweedFS's internal servers: stack.ports.seaweed and the 6 ports after it


@dataclass
class TeamStack:
    """One `agegender stack up` for the whole session: PostgreSQL, S3, MLflow and Prefect servers."""

    root: Path  # the stack's folder (absolute stack.dir)
    settings: dict  # the `stack` section of params.yaml that names it
    params: Path  # a params.yaml with that section, for `agegender stack ... --params`
    env: dict  # os.environ plus what `agegender stack env` exports

    @property
    def mlflow(self) -> str:
        return self.env["MLFLOW_TRACKING_URI"]

    @property
    def s3(self) -> str:
        return self.env["FSSPEC_S3_ENDPOINT_URL"]

    @property
    def ports(self) -> dict:
        return self.settings["ports"]


def free_port_block(size: int) -> int:
    """The first of `size` consecutive free ports (SeaweedFS's internal servers), below Linux's ephemeral
    range (32768+), so no client connection takes one while a stopped service waits to restart."""
    for _ in range(200):
        first = random.randrange(20000, 32000)
        if first + size > 65535:
            continue
        try:
            for port in range(first, first + size):
                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", port))
        except OSError:
            continue
        return first
    raise AssertionError(f"no block of {size} free ports found")


def stack_ports() -> dict:
    """Ports for a stack in one block, so SeaweedFS's internal ports cannot overlap the other four (none is bound yet)."""
    first = free_port_block(4 + SEAWEED_PORTS)
    return {"postgres": first, "s3": first + 1, "mlflow": first + 2, "prefect": first + 3, "seaweed": first + 4}


def exported(text: str) -> dict:
    """The variables `export K=V` lines set, as a shell's eval would."""
    values = {}
    for line in text.splitlines():
        if line.startswith("export "):
            key, _, value = line.removeprefix("export ").partition("=")
            values[key] = shlex.split(value)[0]
    return values


def stop_leftovers(root: Path) -> None:
    """Backstop after `stack down`: nothing the stack started may outlive the tests."""
    for pid_file in (root / "run").glob("*.pid"):
        try:
            os.killpg(int(pid_file.read_text()), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass
    pid_file = root / "postgres" / "data" / "postmaster.pid"
    if pid_file.exists():
        try:
            os.kill(int(pid_file.read_text().split()[0]), signal.SIGQUIT)  # PostgreSQL's immediate shutdown
        except (ProcessLookupError, ValueError):
            pass


@pytest.fixture(scope="session")
def team_stack() -> TeamStack:
    """The team stack on free ports, started once and always stopped (also when a test fails)."""
    # The postgres user must reach the stack's folder; pytest's own temporary root is private (0700).
    outer = Path(tempfile.mkdtemp(prefix="agegender-stack-"))
    outer.chmod(0o711)
    root = outer / "stack"
    settings = {"dir": str(root), "host": "127.0.0.1", "ports": stack_ports()}
    params = outer / "params.yaml"
    shutil.copyfile(PROJECT / "params.yaml", params)
    set_params(outer, {"stack": settings})
    try:
        started = time.monotonic()
        run("agegender", "stack", "up", "--params", str(params), cwd=outer)
        print(f"stack up in {time.monotonic() - started:.0f} s")
        env = {**os.environ, **exported(run("agegender", "stack", "env", "--params", str(params), cwd=outer).stdout)}
        yield TeamStack(root=root, settings=settings, params=params, env=env)
    finally:
        started = time.monotonic()
        down = run("agegender", "stack", "down", "--params", str(params), cwd=outer, check=False)
        print(f"stack down in {time.monotonic() - started:.0f} s: {down.stderr}")
        stop_leftovers(root)
        shutil.rmtree(outer, ignore_errors=True)


def use_team_remote(repo: Path, stack: TeamStack) -> None:
    """Make the stack's S3 bucket the repo's default DVC remote and commit it (README: Run as a team)."""
    run("dvc", "remote", "add", "-d", "team", "s3://agegender-dvc", cwd=repo)
    run("dvc", "remote", "modify", "team", "endpointurl", stack.s3, cwd=repo)
    run("git", "commit", "-qm", "DVC remote: the team's S3 bucket", ".dvc/config", cwd=repo)


# A model trained for two epochs at 32 px: enough to exercise every stage in seconds.
TINY = {
    "preprocess": {"image_size": 32},
    "train": {"width": 8, "epochs": 2, "batch_size": 32, "warmup_epochs": 0, "patience": 2},
}
TWO_CANDIDATES = [{"name": "small", "train": {}}, {"name": "wider", "train": {"width": 12}}]
# Enough training crops for the drift reference to tell a served window of 300 faces apart (test_service).
TEMPLATE_CHIPS = 400


@pytest.fixture(scope="session")
def trained_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A repository with TEMPLATE_CHIPS real chips ingested and `dvc repro train` done (two candidates), once per session.

    The first test process to need it builds it under a lock; the others (pytest-xdist's) wait and
    share it. Tests take copies (`copy_repo`); its MLflow runs keep their artifacts in this folder.
    """
    session = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):  # each process has its own basetemp inside the session's
        session = session.parent
    base = session / "trained-template"
    with open(session / "trained-template.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also when a build fails
        if not (base / "built").exists():
            shutil.rmtree(base, ignore_errors=True)  # what a failed build left
            base.mkdir()
            repo = make_project_repo(base)
            set_params(repo, {**TINY, "candidates": TWO_CANDIDATES})
            run("agegender", "data", "ingest", str(copy_utk_subset(base / "utk", count=TEMPLATE_CHIPS)), cwd=repo)
            run("dvc", "repro", "train", cwd=repo)
            (base / "built").touch()
    return base / "repo"


def copy_repo(repo: Path, dest: Path) -> Path:
    return shutil.copytree(repo, dest, symlinks=True)
