"""The Prefect training flow end to end on the team stack, on real UTKFace images with a tiny model.

Three clones of one git repository share the session's team stack (PostgreSQL, S3, MLflow and
Prefect servers) by configuration alone, as README "Run as a team" says: the first ingests the
data and pushes it to the stack's S3 bucket; the second serves the scheduled deployment
(`agegender flow serve`) against the stack's Prefect server, and its runs pull the data from S3,
train, evaluate and register in the stack's MLflow server; the third serves the champion with
`bentoml serve` through the MLflow server and swaps models when the alias moves. Triggered
without a champion the deployment trains; with one it skips unchanged data; an appended batch
makes it retrain; a worse candidate is registered and not promoted; promote and rollback by hand.
(The local sqlite default is covered by tests/e2e/test_pipeline.py and tests/e2e/test_service.py.)
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.conftest import (
    BIN,
    OPEN_GATES,
    PROJECT,
    TeamStack,
    answers_ok,
    copy_utk_subset,
    free_port,
    make_project_repo,
    run,
    set_params,
    start,
    stop,
    tail,
    use_team_remote,
    utkface_files,
    wait_until,
)

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

TINY = {
    "preprocess": {"image_size": 32},
    "train": {"width": 8, "epochs": 2, "batch_size": 32, "warmup_epochs": 0, "patience": 2},
    "gates": OPEN_GATES,
}
DEPLOYMENT = "agegender-training/retrain"
RUN_TIMEOUT = 1500  # s for one triggered flow run (training included) on a slow shared machine
RELOAD_SECONDS = 2  # serve.reload_seconds on the serving clone


def data_version(repo: Path) -> str:
    return yaml.safe_load((repo / "data.dvc").read_text())["outs"][0]["md5"].removesuffix(".dir")


def client(stack: TeamStack):
    import mlflow

    return mlflow.MlflowClient(stack.mlflow, registry_uri=stack.mlflow)


def training_runs(stack: TeamStack) -> list[dict]:
    """The MLflow parent (training) runs on the stack's server: their data versions."""
    mlflow_client = client(stack)
    experiment = mlflow_client.get_experiment_by_name("agegender")
    if experiment is None:
        return []
    runs = mlflow_client.search_runs([experiment.experiment_id], "tags.role = 'parent'")
    return [{"run_id": r.info.run_id, "data_version": r.data.tags.get("data_version")} for r in runs]


def artifacts_of(flow_run_id) -> dict[str, object]:
    """The artifacts one flow run published, by key (from the current Prefect API)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
    return {artifact.key: artifact for artifact in found}


# ---------------------------------------------------------------- real server


def deployment_named(name: str):
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            return client.read_deployment_by_name(name)
        except ObjectNotFound:
            return None


def trigger(log: Path):
    """Run the deployment now (as a schedule would) and wait for the run to finish."""
    from prefect.deployments import run_deployment

    flow_run = run_deployment(DEPLOYMENT, timeout=RUN_TIMEOUT, poll_interval=3)
    assert flow_run.state is not None and flow_run.state.is_final(), (
        f"run {flow_run.name} unfinished after {RUN_TIMEOUT} s: {flow_run.state}\n{tail(log)}"
    )
    assert flow_run.state.is_completed(), f"{flow_run.state}\n{tail(log)}"
    return flow_run


def clone(origin: Path, folder: Path) -> Path:
    run("git", "clone", "-q", str(origin), str(folder), cwd=origin.parent)
    return folder


@pytest.mark.timeout(1800)
def test_a_second_clone_trains_on_the_team_stack_skips_retrains_and_a_third_serves_the_champion(team_stack, tmp_path):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    stack, env = team_stack, {**team_stack.env, "PREFECT_RUNNER_POLL_FREQUENCY": "2"}
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")  # a client with no profile of its own

    # First clone: the data owner ingests a batch into the team's S3 bucket and commits data.dvc.
    (tmp_path / "first").mkdir()
    first = make_project_repo(tmp_path / "first")
    use_team_remote(first, stack)
    (first / "service").symlink_to(PROJECT / "service")  # the repository's BentoML service
    set_params(first, TINY)
    utk = copy_utk_subset(tmp_path / "utk", count=300)
    run("agegender", "data", "ingest", str(utk), cwd=first, env=env)
    run("git", "add", "params.yaml", "data.dvc", "service", cwd=first)
    run("git", "commit", "-qm", "data: first batch; tiny model", cwd=first)
    version = data_version(first)
    stages = list(yaml.safe_load((first / "dvc.yaml").read_text())["stages"])
    schedule = yaml.safe_load((first / "params.yaml").read_text())["schedule"]

    # Second clone: a worker host serves the scheduled deployment against the stack's Prefect server.
    second = clone(first, tmp_path / "second")
    serve_log = tmp_path / "retrain.log"
    runner = start([str(BIN / "agegender"), "flow", "serve"], cwd=second, env=env, log=serve_log)
    try:
        with temporary_settings(updates={PREFECT_API_URL: env["PREFECT_API_URL"]}):
            deployment = wait_until(
                lambda: deployment_named(DEPLOYMENT), what="the deployment", seconds=240, process=runner, log=serve_log
            )
            assert f"against the Prefect API at {env['PREFECT_API_URL']}" in serve_log.read_text()
            (entry,) = deployment.schedules
            assert (entry.schedule.cron, entry.schedule.timezone) == (schedule["cron"], schedule["timezone"])
            assert entry.active
            assert deployment.parameters == {"project_root": str(second.resolve()), "force": False}

            # No champion yet: the run pulls data.dvc's version from S3, runs every stage in order and reports.
            started = time.monotonic()
            first_run = trigger(serve_log)
            print(f"first (training) run on the stack: {time.monotonic() - started:.0f} s")
            assert first_run.state.message.startswith(f"trained: DVC ran {', '.join(stages)}"), first_run.state.message
            assert data_version(second) == version
            assert [r["data_version"] for r in training_runs(stack)] == [version]
            published = artifacts_of(first_run.id)
            report = published["agegender-training-report"].data
            candidates = json.loads((second / "artifacts/model/candidates.json").read_text())
            assert all(c["run_id"] in report for c in candidates)
            assert "## Gate" in report and "**Decision: " in report and "champion now: version 1" in report
            assert {"agegender-candidates", "agegender-gate"} <= set(published)
            assert f"`{version}` (dvc pull)" in report
            metrics = json.loads((second / "artifacts/eval/metrics.json").read_text())
            assert {"age_mae", "age_rmse", "age_cs5", "gender_accuracy", "gender_f1", "gender_roc_auc"} <= set(metrics)
            assert (second / "artifacts/eval/plots/age_scatter.png").exists()
            assert aliases(stack) == {"champion": "1", "challenger": "1"}
            assert registered_data_version(stack, "1") == version
            lines = [log.message for log in run_logs(first_run.id)]
            assert any("Running stage 'train'" in line for line in lines), "stage output in the run logs"
            assert not (second / "mlflow.db").exists() and not (second / "mlartifacts").exists()
            check_the_server_holds_the_run(stack, version="1")

            # The champion was trained on this data version: nothing runs.
            lock = (second / "dvc.lock").read_text()
            skipped = trigger(serve_log)
            assert skipped.state.name == "Skipped", skipped.state.message
            assert f"data version {version} is the champion's" in skipped.state.message
            assert "# agegender training: skipped" in artifacts_of(skipped.id)["agegender-training-report"].data
            assert (second / "dvc.lock").read_text() == lock
            assert len(training_runs(stack)) == 1

            nothing = run("dvc", "repro", cwd=second, env=env)
            assert "Running stage" not in nothing.stdout, "after the flow, `dvc repro` by hand has nothing to do"

            # The data owner appends a batch (pushed to S3) and commits it with deliberately worse
            # training params (one epoch, tiny learning rate); the worker pulls the commit. The run
            # retrains; the candidate is scored against the champion on the same test split,
            # registered, and not promoted.
            batch = tmp_path / "batch"
            batch.mkdir()
            for path in utkface_files(40, offset=1):
                shutil.copyfile(path, batch / path.name)
            run("agegender", "data", "ingest", str(batch), "--append", cwd=first, env=env)
            new_version = data_version(first)
            assert new_version != version
            set_params(first, {"train": {"epochs": 1, "learning_rate": 0.0001}, "gates": {"min_improvement": 0.5}})
            run("git", "commit", "-qm", "data: second batch; worse params", "data.dvc", "params.yaml", cwd=first)
            run("git", "pull", "-q", "--ff-only", cwd=second)

            third_run = trigger(serve_log)
            assert third_run.state.message.startswith("trained"), third_run.state.message
            assert data_version(second) == new_version
            versions = sorted(r["data_version"] for r in training_runs(stack))
            assert versions == sorted([version, new_version])
            gate = json.loads((second / "artifacts/eval/gate.json").read_text())
            assert gate["has_champion"] is True and gate["full_pass"] is False
            assert aliases(stack)["champion"] == "1"
    finally:
        stop(runner)  # it pauses its schedule

    # Third clone: a serving host with only MLFLOW_TRACKING_URI serves the champion from the server.
    third = clone(first, tmp_path / "third")
    set_params(third, {"serve": {"reload_seconds": RELOAD_SECONDS}})
    serving_env = {**env, "MLFLOW_TRACKING_URI": stack.mlflow}
    with serving(third, serving_env, tmp_path / "bentoml.log") as service:
        assert service.metadata()["version"] == "1"
        assert service.metadata()["data_version"] == version

        # The registry by hand: list, promote (the service swaps), roll back (it swaps back).
        listed = run("agegender", "registry", "list", cwd=third, env=serving_env).stdout
        assert "v1  aliases: champion" in listed and "v2" in listed
        run("agegender", "registry", "promote", "2", cwd=third, env=serving_env)
        assert aliases(stack)["champion"] == "2"
        swap = service.wait_for_version("2")
        print(f"swapped to version 2 {swap:.0f} s after the promotion (reload every {RELOAD_SECONDS} s)")
        run("agegender", "registry", "rollback", cwd=third, env=serving_env)
        assert aliases(stack)["champion"] == "1"
        service.wait_for_version("1")
        assert service.process.poll() is None, "the same process serves on: no restart"
    missing = run("agegender", "registry", "promote", "99", cwd=third, env=serving_env, check=False)
    assert missing.returncode == 1 and "99" in missing.stderr

    # make bento's model step packs the remote champion into the BentoML model store.
    bento_env = {**serving_env, "BENTOML_HOME": str(tmp_path / "bentoml")}
    run("agegender", "registry", "to-bentoml", cwd=third, env=bento_env)
    packed = json.loads(
        run("bentoml", "models", "get", "agegender:latest", "-o", "json", cwd=third, env=bento_env).stdout
    )
    assert packed["labels"] == {"registered_model": "agegender", "version": "1"}, packed


def check_the_server_holds_the_run(stack: TeamStack, version: str) -> None:
    """Per-epoch metrics, the logged model, plots, tags and aliases are in PostgreSQL and S3, and the UI serves them."""
    import boto3

    registered = client(stack).get_model_version("agegender", version)
    run_id, model_id = registered.run_id, registered.tags["model_id"]  # the registry tags the logged model's id
    history = client(stack).get_metric_history(run_id, "val_age_mae")
    assert len({point.step for point in history}) >= TINY["train"]["epochs"], history

    rows = postgres(stack, "SELECT alias, version FROM registered_model_aliases WHERE name = 'agegender'")
    assert {alias: str(number) for alias, number in rows} == {"champion": version, "challenger": version}
    tags = dict(
        postgres(stack, f"SELECT key, value FROM model_version_tags WHERE name = 'agegender' AND version = {version}")
    )
    assert {"data_version", "git_commit", "params_hash", "gate_summary", "registration_complete"} <= set(tags)
    (points,) = postgres(stack, f"SELECT count(*) FROM metrics WHERE run_uuid = '{run_id}' AND key = 'val_age_mae'")
    assert points[0] == len(history)

    s3 = boto3.client(
        "s3",
        endpoint_url=stack.s3,
        aws_access_key_id=stack.env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=stack.env["AWS_SECRET_ACCESS_KEY"],
        region_name="us-east-1",
    )
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket="agegender-mlflow")
    stored = [item["Key"] for page in pages for item in page.get("Contents", [])]
    for suffix in (
        f"{model_id}/artifacts/MLmodel",
        f"{run_id}/artifacts/outputs/curves.png",
        f"{run_id}/artifacts/evaluation/plots/age_scatter.png",
    ):
        assert [key for key in stored if key.endswith(suffix)], f"no {suffix} in s3://agegender-mlflow"

    # What the server's UI asks for when it shows the model, the run's chart and a plot.
    ui = stack.mlflow
    assert answers_ok(f"{ui}/")
    model = get_json(f"{ui}/ajax-api/2.0/mlflow/registered-models/get?name=agegender")["registered_model"]
    assert {a["alias"]: a["version"] for a in model["aliases"]} == {"champion": version, "challenger": version}
    chart = get_json(f"{ui}/ajax-api/2.0/mlflow/metrics/get-history-bulk?run_id={run_id}&metric_key=val_age_mae")
    assert len(chart["metrics"]) == len(history)
    with urllib.request.urlopen(
        f"{ui}/get-artifact?path=evaluation/plots/age_scatter.png&run_uuid={run_id}", timeout=30
    ) as plot:
        assert plot.read(8) == b"\x89PNG\r\n\x1a\n"


def postgres(stack: TeamStack, sql: str) -> list[tuple]:
    """Rows of a query in the MLflow server's PostgreSQL database, as its own role."""
    import psycopg2

    password = dict(
        line.split("=", 1) for line in (stack.root / "secrets.env").read_text().splitlines() if "=" in line
    )["MLFLOW_DB_PASSWORD"]
    conn = psycopg2.connect(
        host="127.0.0.1", port=stack.ports["postgres"], user="mlflow", password=password, dbname="mlflow"
    )
    try:
        with conn.cursor() as cur:
            cur.execute(sql)
            return cur.fetchall()
    finally:
        conn.close()


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.loads(response.read())


class Serving:
    """A running `bentoml serve` and what the test asks it."""

    def __init__(self, url: str, process: subprocess.Popen, log: Path) -> None:
        self.url, self.process, self.log = url, process, log

    def metadata(self) -> dict:
        request = urllib.request.Request(
            f"{self.url}/metadata", data=b"{}", method="POST", headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            return json.loads(response.read())

    def wait_for_version(self, version: str) -> float:
        """Seconds until the service answers with `version` (it checks every reload_seconds, then loads)."""
        started = time.monotonic()
        wait_until(
            lambda: self.metadata()["version"] == version,
            what=f"the service swaps to version {version}",
            seconds=RELOAD_SECONDS + 90,
            process=self.process,
            log=self.log,
        )
        return time.monotonic() - started


@contextlib.contextmanager
def serving(repo: Path, env: dict, log: Path):
    """`bentoml serve service.service:AgeGender` in a clone, until the block ends."""
    port = free_port()
    args = [str(BIN / "bentoml"), "serve", "service.service:AgeGender", "--host", "127.0.0.1", "--port", str(port)]
    process = start(args, cwd=repo, env=env, log=log)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: answers_ok(f"{url}/readyz"), what="bentoml serve", seconds=240, process=process, log=log)
        yield Serving(url, process, log)
    finally:
        stop(process)


def aliases(stack: TeamStack) -> dict[str, str]:
    return {alias: str(number) for alias, number in client(stack).get_registered_model("agegender").aliases.items()}


def run_logs(flow_run_id) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    with get_client(sync_client=True) as client:
        return client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])), limit=200)


def registered_data_version(stack: TeamStack, version: str) -> str:
    return client(stack).get_model_version("agegender", version).tags["data_version"]
