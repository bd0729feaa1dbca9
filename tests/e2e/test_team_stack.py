"""The team stack end to end: `agegender stack up` starts real PostgreSQL, SeaweedFS (S3), MLflow and
Prefect servers from the project's own files, and DVC, s3:// ingest, MLflow and Prefect use them by
configuration alone (`eval "$(agegender stack env)"`). Faults: the object store dying in the middle
of a push, and ports already taken.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tarfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import (
    BIN,
    TeamStack,
    make_project_repo,
    run,
    set_params,
    stack_ports,
    start,
    stop,
    tail,
    use_team_remote,
    utkface_files,
    wait_until,
)

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


@dataclass
class Stack:
    repo: Path  # a git + DVC project whose default remote is the stack's S3 bucket
    root: Path  # the stack's folder
    env: dict  # os.environ plus what `agegender stack env` exports
    ports: dict


@pytest.fixture(scope="module")
def stack(team_stack: TeamStack, tmp_path_factory) -> Stack:
    """The session's stack, and a project whose params.yaml names it and whose DVC remote is its bucket."""
    repo = make_project_repo(tmp_path_factory.mktemp("team"))
    set_params(repo, {"stack": team_stack.settings})
    run("git", "commit", "-qam", "params: the team stack", cwd=repo)
    use_team_remote(repo, team_stack)
    return Stack(repo=repo, root=team_stack.root, env=team_stack.env, ports=team_stack.ports)


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


def connected(pid: int, port: int) -> bool:
    """The process holds a TCP connection to `port`."""
    import psutil

    try:
        return any(c.raddr and c.raddr.port == port for c in psutil.Process(pid).net_connections("tcp"))
    except psutil.NoSuchProcess:
        return False


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


RECORDS = """
import json
from datetime import UTC, datetime, timedelta

from agegender.monitoring import RecordWriter, read_records

url = "s3://agegender-monitoring/records"
since = datetime.now(UTC)
writer = RecordWriter(url, batch_records=2, flush_seconds=60)
for n in range(3):
    writer.add({"time": datetime.now(UTC).isoformat(timespec="milliseconds"), "request": str(n), "faces": []})
writer.close()
window = [r["request"] for r in read_records(url, since=since, until=datetime.now(UTC))]
before = read_records(url, since=since - timedelta(hours=2), until=since - timedelta(seconds=1))
print(json.dumps({"window": window, "before": before}))
"""


def test_served_input_records_go_to_the_stacks_s3_store(stack: Stack, tmp_path: Path):
    """monitor.records: s3://... in team mode: the service's writer and the drift check's reader, in a
    process with what `agegender stack env` exports (fsspec reads its S3 endpoint when imported)."""
    s3_client(stack).create_bucket(Bucket="agegender-monitoring")
    result = run(str(BIN / "python"), "-c", RECORDS, cwd=tmp_path, env=stack.env)
    assert json.loads(result.stdout.splitlines()[-1]) == {"window": ["0", "1", "2"], "before": []}, result.stderr
    assert len(keys(stack, "agegender-monitoring")) == 2  # a full batch of 2, then the rest on close


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
    # botocore retries a refused connection 4 times by default (minutes over many files); 2 attempts keep it short.
    env = {**stack.env, "AWS_MAX_ATTEMPTS": "2"}

    # The store hangs (SIGSTOP), the push connects to it, then the store dies: the crash is always mid-push.
    store = int((stack.root / "run" / "s3.pid").read_text())
    os.killpg(store, signal.SIGSTOP)
    push = subprocess.Popen(
        ["dvc", "push"], cwd=stack.repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        deadline = time.monotonic() + 90
        while not connected(push.pid, stack.ports["s3"]):
            assert push.poll() is None and time.monotonic() < deadline, "dvc push never connected to the store"
            time.sleep(0.05)
        os.killpg(store, signal.SIGKILL)
        output = push.communicate(timeout=120)[0]
        assert push.returncode != 0, output
        assert "Could not connect to the endpoint URL" in output, output  # names the store it lost
        assert tree_digest(stack.repo) == digest  # a failed push changes neither data/ nor data.dvc

        status = run("agegender", "stack", "status", cwd=stack.repo, check=False)
        assert status.returncode == 1 and "s3        down" in status.stdout, status.stdout
        again = run("dvc", "push", cwd=stack.repo, check=False, env=env)
        assert again.returncode != 0 and "Could not connect to the endpoint URL" in again.stderr, again.stderr
        assert tree_digest(stack.repo) == digest
    finally:
        push.kill()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(store, signal.SIGKILL)  # never left frozen
        up = run("agegender", "stack", "up", cwd=stack.repo)  # the later tests need the store, also after a failure
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


# ---------------------------------------------------------------- registry faults

FAULT_MODEL = "agegender-faults"  # a registered model of its own: the flow test's `agegender` is not touched
GATE = {"absolute_pass": True, "full_pass": True, "has_champion": False, "checks": [], "summary": "pass (fault test)"}
REGISTER_FLOW = """
import sys
from pathlib import Path

from prefect import flow

from agegender.flow import stage_task

@flow(name="agegender-register-fault")
def register(root: str) -> bool:
    return stage_task("register")(Path(root), "register")

register(sys.argv[1])
"""


@pytest.fixture(scope="module")
def evaluated(stack: Stack, tmp_path_factory) -> Path:
    """A project as the evaluate stage leaves it: a model logged on the stack's server, its gate and test metrics.

    The logged model has no weights (the registry never loads it), so no training is needed.
    """
    import mlflow
    from mlflow.entities import LoggedModelOutput

    from agegender.tracking import configure_tracking

    repo = make_project_repo(tmp_path_factory.mktemp("faults"))
    set_params(repo, {"stack": {"dir": str(stack.root), "ports": stack.ports}, "registry": {"model_name": FAULT_MODEL}})
    run("git", "commit", "-qam", "params: the team stack; the fault tests' model", cwd=repo)
    configure_tracking(repo, stack.env["MLFLOW_TRACKING_URI"])
    with mlflow.start_run(run_name="registry-faults") as active:
        model = mlflow.create_external_model(name="model")
    mlflow.MlflowClient().log_outputs(active.info.run_id, [LoggedModelOutput(model_id=model.model_id, step=0)])
    write_evaluation(repo, active.info.run_id, data_version="faults-1")
    return repo


def write_evaluation(repo: Path, run_id: str, data_version: str) -> None:
    files = {
        # The shapes the train and evaluate stages write (the register stage describes the version from them).
        "artifacts/model/card.json": {
            "mlflow_run_id": run_id,
            "data_version": data_version,
            "model": "agegender (placeholder for the fault tests)",
            "trained_on": "real",
            "intended_use": "Registry fault tests only.",
        },
        "artifacts/eval/metrics.json": {
            "n_samples": 10,
            "age_mae": 9.5,
            "gender_accuracy": 0.8,
            "by_race": {"0": {"n_samples": 10, "age_mae": 9.5, "gender_accuracy": 0.8}},
            "age_mae_group_gap": 0.0,
            "gender_accuracy_group_gap": 0.0,
        },
        "artifacts/eval/gate.json": GATE,
    }
    for name, content in files.items():
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        (repo / name).write_text(json.dumps(content))


def fault_registry(stack: Stack):
    from mlflow import MlflowClient

    return MlflowClient(stack.env["MLFLOW_TRACKING_URI"], registry_uri=stack.env["MLFLOW_TRACKING_URI"])


def registry_state(stack: Stack) -> dict:
    """Every version with its status and tags, the aliases and the model's tags."""
    client = fault_registry(stack)
    model = client.get_registered_model(FAULT_MODEL)
    versions = client.search_model_versions(f"name = '{FAULT_MODEL}'")
    return {
        "versions": {int(v.version): (v.status, dict(v.tags)) for v in versions},
        "aliases": dict(model.aliases),
        "tags": dict(model.tags),
    }


def assert_consistent(stack: Stack) -> dict:
    """Aliases point only at complete READY versions, and nothing lists an incomplete one."""
    from agegender.registry import COMPLETE_TAG, READY, list_versions

    state = registry_state(stack)
    for alias, number in state["aliases"].items():
        status, tags = state["versions"][int(number)]
        assert status == READY and COMPLETE_TAG in tags, f"{alias} points at unfinished version {number}: {state}"
    complete = sorted((n for n, (_, tags) in state["versions"].items() if COMPLETE_TAG in tags), reverse=True)
    assert [row["version"] for row in list_versions(fault_registry(stack), FAULT_MODEL)] == complete
    return state


@contextlib.contextmanager
def register_flow(repo: Path, env: dict, log: Path):
    """The flow's register task (`dvc repro --single-item register`, with its retries) in a Prefect flow run."""
    process = start([str(BIN / "python"), "-c", REGISTER_FLOW, str(repo)], cwd=repo, env=env, log=log)
    try:
        yield process
    finally:
        stop(process)  # never left running behind a failed test


def stop_mlflow(stack: Stack) -> None:
    from agegender.stack import stop_services

    stop_services(stack.root, ["mlflow"])


def restart_stack(stack: Stack) -> None:
    up = run("agegender", "stack", "up", cwd=stack.repo)
    assert "starting" in up.stderr, up.stderr


@pytest.mark.timeout(600)
def test_the_mlflow_server_down_during_register_leaves_no_half_registered_version_and_the_flow_retry_completes_it(
    stack: Stack, evaluated: Path, tmp_path: Path, monkeypatch
):
    from mlflow.exceptions import MlflowException

    from agegender.registry import COMPLETE_TAG, RegistryError, promote, register_candidate

    # One MLflow attempt per call (its default is 7 retries over minutes): the flow's retries are under test.
    env = {**stack.env, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "PREFECT_HOME": str(tmp_path / "prefect-home")}
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    mlflow_url = stack.env["MLFLOW_TRACKING_URI"]
    run("agegender", "register", cwd=evaluated, env=env)
    before = assert_consistent(stack)
    assert before["aliases"] == {"champion": "1", "challenger": "1"}

    # The server is down: the stage fails naming it, and the registry is as it was.
    stop_mlflow(stack)
    try:
        failed = run("agegender", "register", cwd=evaluated, env=env, check=False)
    finally:
        restart_stack(stack)
    assert failed.returncode == 1, failed.stderr
    said = " ".join(failed.stderr.split())  # unwrapped
    assert (
        f"error: registering in the MLflow registry at {mlflow_url} failed; run `agegender register` again" in said
    ), said
    assert f"API request to {mlflow_url}/" in said and "Connection refused" in said and "Traceback" not in said
    assert registry_state(stack) == before

    # The server stops after the version is created with its tags and before any alias moves.
    card = json.loads((evaluated / "artifacts/model/card.json").read_text())
    run_id = card["mlflow_run_id"]
    try:
        with pytest.raises(MlflowException, match="Connection refused"):
            register_candidate(
                fault_registry(stack),
                model_name=FAULT_MODEL,
                model_uri=f"runs:/{run_id}/model",
                run_id=run_id,
                tags={"data_version": card["data_version"]},
                decision=GATE,
                before_alias=lambda: stop_mlflow(stack),
            )
    finally:
        restart_stack(stack)
    state = assert_consistent(stack)
    status, tags = state["versions"][2]
    assert COMPLETE_TAG not in tags and tags["data_version"] == "faults-1", "created with all its tags at once"
    assert state["aliases"] == before["aliases"] and state["tags"] == before["tags"]
    with pytest.raises(RegistryError, match="never finished registering"):
        promote(fault_registry(stack), FAULT_MODEL, 2)

    # The flow's register task with the server down: its first attempt fails, the retry after the
    # restart removes the abandoned version and registers the candidate with its tags and aliases.
    stop_mlflow(stack)
    log = tmp_path / "flow.log"
    with register_flow(evaluated, env, log) as flow:
        try:
            wait_until(
                lambda: "Retry 1/2 will start" in log.read_text(),
                what="a failed attempt",
                seconds=180,
                process=flow,
                log=log,
            )
        finally:
            restart_stack(stack)
        assert flow.wait(timeout=240) == 0, tail(log)
    registration = json.loads((evaluated / "artifacts/registry/registration.json").read_text())
    assert (registration["version"], registration["removed"]) == (3, [2]), registration
    state = assert_consistent(stack)
    assert sorted(state["versions"]) == [1, 3]
    assert state["aliases"] == {"champion": "3", "challenger": "3"}
    tags = state["versions"][3][1]
    assert {"data_version", "git_commit", "params_hash", "test_age_mae", "gate_summary", COMPLETE_TAG} <= set(tags)
    assert json.loads(state["tags"]["champion_history"]) == [1]


@pytest.mark.timeout(600)
def test_postgres_restarted_mid_flow_is_a_clean_failure_or_a_retry_never_a_corrupt_registry(
    stack: Stack, evaluated: Path, tmp_path: Path
):
    from agegender.stack import stop_services

    env = {**stack.env, "PREFECT_HOME": str(tmp_path / "prefect-home")}
    card = json.loads((evaluated / "artifacts/model/card.json").read_text())
    write_evaluation(evaluated, card["mlflow_run_id"], data_version="faults-2")  # a new candidate: the stage is stale
    before = assert_consistent(stack)

    log = tmp_path / "flow.log"
    with register_flow(evaluated, env, log) as flow:
        try:
            wait_until(
                lambda: "dvc repro --single-item register" in log.read_text(),
                what="the register stage starts",
                seconds=180,
                process=flow,
                log=log,
            )
            stop_services(stack.root, ["postgres"])  # both the MLflow and the Prefect server lose their database
        finally:
            restart_stack(stack)
        code = flow.wait(timeout=400)
    print(f"the flow during the PostgreSQL restart exited {code}:\n{tail(log, 15)}")
    state = assert_consistent(stack)
    if code != 0:  # a clean failure leaves the aliases as they were; a rerun completes the registration
        assert state["aliases"] == before["aliases"]
        with register_flow(evaluated, env, tmp_path / "rerun.log") as rerun:
            assert rerun.wait(timeout=400) == 0, tail(tmp_path / "rerun.log")
        state = assert_consistent(stack)
    newest = max(state["versions"])
    assert state["aliases"] == {"champion": str(newest), "challenger": str(newest)}
    assert state["versions"][newest][1]["data_version"] == "faults-2"
