"""The team stack end to end: `agegender stack up` starts real PostgreSQL, SeaweedFS (S3), MLflow and
Prefect servers from the project's own files, and DVC, s3:// ingest, MLflow and Prefect use them by
configuration alone (`eval "$(agegender stack env)"`). Faults: the object store dying in the middle
of a push, and ports already taken.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import BIN, free_port, make_project_repo, run, set_params, utkface_files

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

SEAWEED_PORTS = 7


@dataclass
class Stack:
    repo: Path  # a git + DVC project whose default remote is the stack's S3 bucket
    root: Path  # the stack's folder
    env: dict  # os.environ plus what `agegender stack env` exports
    ports: dict


def free_port_block(size: int) -> int:
    """The first of `size` consecutive free ports (SeaweedFS's internal servers)."""
    for _ in range(200):
        first = free_port()
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
    return {
        "postgres": free_port(),
        "s3": free_port(),
        "mlflow": free_port(),
        "prefect": free_port(),
        "seaweed": free_port_block(SEAWEED_PORTS),
    }


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


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Stack:
    # The postgres user must reach the stack's folder; pytest's own temporary root is private (0700).
    outer = Path(tempfile.mkdtemp(prefix="agegender-stack-"))
    outer.chmod(0o711)
    root = outer / "stack"
    repo = make_project_repo(tmp_path_factory.mktemp("team"))
    ports = stack_ports()
    set_params(repo, {"stack": {"dir": str(root), "host": "127.0.0.1", "ports": ports}})
    try:
        started = time.monotonic()
        run("agegender", "stack", "up", cwd=repo)
        print(f"stack up in {time.monotonic() - started:.0f} s")
        env = {**os.environ, **exported(run("agegender", "stack", "env", cwd=repo).stdout)}
        s3 = env["FSSPEC_S3_ENDPOINT_URL"]
        run("dvc", "remote", "add", "-d", "team", "s3://agegender-dvc", cwd=repo)
        run("dvc", "remote", "modify", "team", "endpointurl", s3, cwd=repo)
        run("git", "commit", "-qam", "DVC remote: the team's S3 bucket", cwd=repo)
        yield Stack(repo=repo, root=root, env=env, ports=ports)
    finally:
        started = time.monotonic()
        down = run("agegender", "stack", "down", cwd=repo, check=False)
        print(f"stack down in {time.monotonic() - started:.0f} s: {down.stderr}")
        stop_leftovers(root)
        shutil.rmtree(outer, ignore_errors=True)


def s3_client(stack: Stack):
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=stack.env["FSSPEC_S3_ENDPOINT_URL"],
        aws_access_key_id=stack.env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=stack.env["AWS_SECRET_ACCESS_KEY"],
        region_name="us-east-1",
    )


def keys(stack: Stack, bucket: str) -> list[str]:
    pages = s3_client(stack).get_paginator("list_objects_v2").paginate(Bucket=bucket)
    return [item["Key"] for page in pages for item in page.get("Contents", [])]


def copy_batch(folder: Path, count: int, offset: int) -> Path:
    folder.mkdir()
    for path in utkface_files(count, offset=offset):
        shutil.copyfile(path, folder / path.name)
    return folder


def tree_digest(repo: Path) -> str:
    """One hash over data/ and data.dvc, to show a command left them as they were."""
    digest = hashlib.sha256((repo / "data.dvc").read_bytes())
    for path in sorted((repo / "data").rglob("*")):
        if path.is_file():
            digest.update(path.relative_to(repo).as_posix().encode() + path.read_bytes())
    return digest.hexdigest()


def commit_data(repo: Path, message: str) -> None:
    run("git", "add", "data.dvc", cwd=repo)
    run("git", "commit", "-qm", message, cwd=repo)


def fetch_in_new_clone(stack: Stack, tmp_path: Path) -> Path:
    clone = tmp_path / "clone"
    run("git", "clone", "-q", str(stack.repo), str(clone), cwd=tmp_path)
    result = run("agegender", "data", "fetch", cwd=clone, env=stack.env)
    assert "(dvc pull)" in result.stderr, result.stderr
    return clone


def test_stack_is_up_and_keeps_its_secrets_off_command_lines(stack: Stack):
    status = run("agegender", "stack", "status", cwd=stack.repo)
    assert [line.split()[:2] for line in status.stdout.splitlines()] == [
        ["postgres", "up"],
        ["s3", "up"],
        ["mlflow", "up"],
        ["prefect", "up"],
    ]
    assert (stack.root / "secrets.env").stat().st_mode & 0o777 == 0o600
    secrets = [line.partition("=")[2] for line in (stack.root / "secrets.env").read_text().splitlines()]
    assert len(secrets) == 5
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes().decode(errors="replace")
        except OSError:
            continue  # the process ended meanwhile
        assert not [s for s in secrets if s in text], f"a secret is on the command line of {cmdline.parent}"
    for log in [*stack.root.glob("logs/*.log"), stack.root / "postgres" / "postgres.log"]:
        text = log.read_text(errors="replace")
        assert not [s for s in secrets if s in text], f"a secret is in {log}"
    # The S3 store refuses anonymous requests: it has an identity configured.
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{stack.env['FSSPEC_S3_ENDPOINT_URL']}/agegender-dvc", timeout=10)
    assert refused.value.code == 403


def test_ingest_pushes_to_s3_and_a_second_clone_fetches_the_same_version(stack: Stack, tmp_path: Path):
    batch = copy_batch(tmp_path / "batch1", 40, offset=0)
    result = run("agegender", "data", "ingest", str(batch), cwd=stack.repo, env=stack.env)
    assert "Pushed to DVC remote 'team'" in result.stderr, result.stderr
    assert any(key.startswith("files/md5/") for key in keys(stack, "agegender-dvc"))
    commit_data(stack.repo, "data: first batch")

    clone = fetch_in_new_clone(stack, tmp_path)
    assert (clone / "data.dvc").read_bytes() == (stack.repo / "data.dvc").read_bytes()
    assert (clone / "data" / "labels.csv").read_bytes() == (stack.repo / "data" / "labels.csv").read_bytes()
    assert len(list((clone / "data" / "images").iterdir())) == 40


def test_ingest_from_an_s3_url(stack: Stack, tmp_path: Path):
    batch = copy_batch(tmp_path / "batch2", 20, offset=1)
    archive = tmp_path / "batch2.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(batch, arcname="batch2")
    client = s3_client(stack)
    client.create_bucket(Bucket="incoming")
    client.upload_file(str(archive), "incoming", "faces/batch2.tar.gz")

    result = run(
        "agegender", "data", "ingest", "s3://incoming/faces/batch2.tar.gz", "--append", cwd=stack.repo, env=stack.env
    )
    assert "20 images added" in result.stderr, result.stderr
    assert "Pushed to DVC remote 'team'" in result.stderr, result.stderr
    labels = (stack.repo / "data" / "labels.csv").read_text()
    assert labels.count("s3://incoming/faces/batch2.tar.gz") == 20
    commit_data(stack.repo, "data: batch from S3")


def test_mlflow_runs_and_artifacts_go_through_the_server_into_s3(stack: Stack, tmp_path: Path):
    import mlflow

    from agegender.tracking import configure_tracking

    uri = configure_tracking(stack.repo, stack.env["MLFLOW_TRACKING_URI"])
    assert uri == f"http://127.0.0.1:{stack.ports['mlflow']}"
    card = tmp_path / "card.json"
    card.write_text(json.dumps({"data_version": "abc"}))
    with mlflow.start_run(run_name="team-stack") as active:
        mlflow.log_param("stack", "team")
        mlflow.log_metric("val_age_mae", 7.5)
        mlflow.log_artifact(str(card))
    run_id = active.info.run_id

    fetched = mlflow.MlflowClient(uri).get_run(run_id)
    assert fetched.data.metrics["val_age_mae"] == 7.5
    assert fetched.info.artifact_uri.startswith("mlflow-artifacts:")  # proxied: clients need no S3 settings
    copy = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="card.json", dst_path=str(tmp_path / "dl"))
    assert json.loads(Path(copy).read_text()) == {"data_version": "abc"}
    assert [key for key in keys(stack, "agegender-mlflow") if key.endswith(f"{run_id}/artifacts/card.json")]
    assert not (stack.repo / "mlartifacts").exists() and not (stack.repo / "mlflow.db").exists()


FLOW = """
from prefect import flow

@flow(name="team-stack-smoke")
def smoke(x: int) -> int:
    return x + 1

assert smoke(41) == 42
"""


def test_a_prefect_flow_runs_against_the_stacks_server(stack: Stack, tmp_path: Path):
    env = {**stack.env, "PREFECT_HOME": str(tmp_path / "prefect-home")}  # a client with no profile of its own
    run(str(BIN / "python"), "-c", FLOW, cwd=tmp_path, env=env)
    body = json.dumps({"flows": {"name": {"any_": ["team-stack-smoke"]}}}).encode()
    request = urllib.request.Request(
        f"{stack.env['PREFECT_API_URL']}/flow_runs/filter", data=body, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        runs = json.loads(response.read())
    assert [r["state_type"] for r in runs] == ["COMPLETED"]


def test_the_object_store_dying_mid_push_fails_clearly_and_the_push_completes_after_restart(
    stack: Stack, tmp_path: Path
):
    # A version tracked but not pushed yet: ingest with the default remote unset, then set it back.
    run("dvc", "remote", "default", "--unset", cwd=stack.repo)
    batch = copy_batch(tmp_path / "batch3", 60, offset=2)
    run("agegender", "data", "ingest", str(batch), "--append", cwd=stack.repo, env=stack.env)
    run("dvc", "remote", "default", "team", cwd=stack.repo)
    digest = tree_digest(stack.repo)
    before = len(keys(stack, "agegender-dvc"))
    # botocore retries a refused connection 4 times by default (minutes over many files); 2 attempts keep it short.
    env = {**stack.env, "AWS_MAX_ATTEMPTS": "2"}

    push = subprocess.Popen(
        ["dvc", "push"], cwd=stack.repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    deadline = time.monotonic() + 90
    while len(keys(stack, "agegender-dvc")) == before:  # wait for the first new objects to land
        assert push.poll() is None and time.monotonic() < deadline, "dvc push ended before it could be interrupted"
        time.sleep(0.05)
    os.killpg(int((stack.root / "run" / "s3.pid").read_text()), signal.SIGKILL)  # the store crashes
    output = push.communicate(timeout=120)[0]
    assert push.returncode != 0, output
    assert "failed to push data to the cloud" in output and "Could not connect to the endpoint URL" in output, output
    assert tree_digest(stack.repo) == digest  # a failed push changes neither data/ nor data.dvc

    status = run("agegender", "stack", "status", cwd=stack.repo, check=False)
    assert status.returncode == 1 and "s3        down" in status.stdout, status.stdout
    again = run("dvc", "push", cwd=stack.repo, check=False, env=env)
    assert again.returncode != 0 and "Could not connect to the endpoint URL" in again.stderr, again.stderr
    assert tree_digest(stack.repo) == digest

    up = run("agegender", "stack", "up", cwd=stack.repo)
    assert "starting s3" in up.stderr and "mlflow is already running" in up.stderr, up.stderr
    done = run("dvc", "push", cwd=stack.repo, env=env)
    assert "pushed" in done.stdout, done.stdout
    assert tree_digest(stack.repo) == digest
    in_sync = run("dvc", "status", "--cloud", cwd=stack.repo, env=env)
    assert "in sync" in in_sync.stdout, in_sync.stdout


def test_stack_up_names_a_port_that_is_already_taken(stack: Stack, tmp_path: Path):
    ports = stack_ports()
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", ports["mlflow"]))
        holder.listen()
        params = tmp_path / "params.yaml"
        shutil.copyfile(stack.repo / "params.yaml", params)
        set_params(tmp_path, {"stack": {"dir": str(tmp_path / "other-stack"), "ports": ports}})
        result = run("agegender", "stack", "up", "--params", str(params), cwd=tmp_path, check=False)
    assert result.returncode == 1
    assert f"port {ports['mlflow']} on 127.0.0.1 is already taken" in result.stderr, result.stderr
    assert "the MLflow server (stack.ports.mlflow)" in result.stderr, result.stderr
    assert not (tmp_path / "other-stack" / "postgres").exists()  # it checked before starting anything

    # The running stack's own ports: another stack folder cannot take them either.
    set_params(tmp_path, {"stack": {"dir": str(tmp_path / "third-stack"), "ports": stack.ports}})
    result = run("agegender", "stack", "up", "--params", str(params), cwd=tmp_path, check=False)
    assert result.returncode == 1
    assert f"port {stack.ports['postgres']} on 127.0.0.1 is already taken" in result.stderr, result.stderr
