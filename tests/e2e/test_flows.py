"""The Prefect training flow end to end, on real UTKFace images with a tiny model.

The scheduled deployment served by `agegender flow serve` against a real `prefect server`
process carries params.yaml's cron schedule. Triggering it without a dataset ingests
data.source and trains; once a champion exists it skips unchanged data; an
`agegender data ingest --append` batch makes it retrain. (The registry's promote, reject
and rollback scenario runs once, in tests/e2e/test_pipeline.py.)
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.conftest import (
    BIN,
    OPEN_GATES,
    answers_ok,
    free_port,
    run,
    set_params,
    start,
    stop,
    tail,
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


def data_version(repo: Path) -> str:
    return yaml.safe_load((repo / "data.dvc").read_text())["outs"][0]["md5"].removesuffix(".dir")


def training_runs(repo: Path) -> list[dict]:
    """The MLflow parent (training) runs in the repo's store: their data versions."""
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("agegender")
    if experiment is None:
        return []
    runs = client.search_runs([experiment.experiment_id], "tags.role = 'parent'")
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


@pytest.mark.timeout(1800)
def test_scheduled_deployment_trains_skips_retrains_and_never_promotes_a_worse_model(
    project_repo, utk_subset, tmp_path
):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    # No data.dvc yet: the flow's fetch task falls back to ingesting data.source.
    set_params(project_repo, {**TINY, "data": {"source": str(utk_subset)}})
    stages = list(yaml.safe_load((project_repo / "dvc.yaml").read_text())["stages"])
    schedule = yaml.safe_load((project_repo / "params.yaml").read_text())["schedule"]

    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {
        **os.environ,
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "PREFECT_API_URL": api,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_RUNNER_POLL_FREQUENCY": "2",
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    server_log, serve_log = tmp_path / "server.log", tmp_path / "retrain.log"
    processes: list[subprocess.Popen] = []
    try:
        server = start(
            [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port), "--no-ui"],
            cwd=tmp_path,
            env=env,
            log=server_log,
        )
        processes.append(server)
        wait_until(
            lambda: answers_ok(f"{api}/health"), what="prefect server", seconds=240, process=server, log=server_log
        )
        serve = start([str(BIN / "agegender"), "flow", "serve"], cwd=project_repo, env=env, log=serve_log)
        processes.append(serve)
        with temporary_settings(updates={PREFECT_API_URL: api}):
            deployment = wait_until(
                lambda: deployment_named(DEPLOYMENT), what="the deployment", seconds=240, process=serve, log=serve_log
            )
            assert f"against the Prefect API at {api}" in serve_log.read_text()
            (entry,) = deployment.schedules
            assert (entry.schedule.cron, entry.schedule.timezone) == (schedule["cron"], schedule["timezone"])
            assert entry.active
            assert deployment.parameters == {"project_root": str(project_repo.resolve()), "force": False}

            # No champion yet: the run ingests data.source, runs every stage in order and reports.
            first = trigger(serve_log)
            assert first.state.message.startswith(f"trained: DVC ran {', '.join(stages)}"), first.state.message
            version = data_version(project_repo)
            assert [r["data_version"] for r in training_runs(project_repo)] == [version]
            published = artifacts_of(first.id)
            report = published["agegender-training-report"].data
            candidates = json.loads((project_repo / "artifacts/model/candidates.json").read_text())
            assert all(c["run_id"] in report for c in candidates)
            assert "## Gate" in report and "**Decision: " in report and "champion now: version 1" in report
            assert {"agegender-candidates", "agegender-gate"} <= set(published)
            assert f"ingest {utk_subset}" in report
            metrics = json.loads((project_repo / "artifacts/eval/metrics.json").read_text())
            assert {"age_mae", "age_rmse", "age_cs5", "gender_accuracy", "gender_f1", "gender_roc_auc"} <= set(metrics)
            assert (project_repo / "artifacts/eval/plots/age_scatter.png").exists()
            assert aliases(project_repo) == {"champion": "1", "challenger": "1"}
            assert registered_data_version(project_repo, "1") == version
            lines = [log.message for log in run_logs(first.id)]
            assert any("Running stage 'train'" in line for line in lines), "stage output in the run logs"

            # The champion was trained on this data version: nothing runs.
            lock = (project_repo / "dvc.lock").read_text()
            second = trigger(serve_log)
            assert second.state.name == "Skipped", second.state.message
            assert f"data version {version} is the champion's" in second.state.message
            assert "# agegender training: skipped" in artifacts_of(second.id)["agegender-training-report"].data
            assert (project_repo / "dvc.lock").read_text() == lock
            assert len(training_runs(project_repo)) == 1

            nothing = run("dvc", "repro", cwd=project_repo)
            assert "Running stage" not in nothing.stdout, "after the flow, `dvc repro` by hand has nothing to do"

            # A new batch of images changes the data version: the run retrains. The candidate is
            # deliberately worse (one epoch, tiny learning rate): it is scored against the champion
            # on the same test split, registered, and not promoted.
            batch = tmp_path / "batch"
            batch.mkdir()
            for path in utkface_files(40, offset=1):
                shutil.copyfile(path, batch / path.name)
            run("agegender", "data", "ingest", str(batch), "--append", cwd=project_repo)
            new_version = data_version(project_repo)
            assert new_version != version
            set_params(
                project_repo, {"train": {"epochs": 1, "learning_rate": 0.0001}, "gates": {"min_improvement": 0.5}}
            )

            third = trigger(serve_log)
            assert third.state.message.startswith("trained"), third.state.message
            versions = sorted(r["data_version"] for r in training_runs(project_repo))
            assert versions == sorted([version, new_version])
            gate = json.loads((project_repo / "artifacts/eval/gate.json").read_text())
            assert gate["has_champion"] is True and gate["full_pass"] is False
            assert aliases(project_repo)["champion"] == "1"
    finally:
        for process in reversed(processes):  # the runner first: it pauses its schedule
            stop(process)

    # The registry by hand: list, promote, roll back, and a version that does not exist.
    listed = run("agegender", "registry", "list", cwd=project_repo).stdout
    assert "v1  aliases: champion" in listed and "v2" in listed
    run("agegender", "registry", "promote", "2", cwd=project_repo)
    assert aliases(project_repo)["champion"] == "2"
    run("agegender", "registry", "rollback", cwd=project_repo)
    assert aliases(project_repo)["champion"] == "1"
    missing = run("agegender", "registry", "promote", "99", cwd=project_repo, check=False)
    assert missing.returncode == 1 and "99" in missing.stderr


def aliases(repo: Path) -> dict[str, str]:
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    versions = [
        client.get_model_version("agegender", v.version) for v in client.search_model_versions("name='agegender'")
    ]
    return {alias: str(v.version) for v in versions for alias in v.aliases}


def run_logs(flow_run_id) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    with get_client(sync_client=True) as client:
        return client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])), limit=200)


def registered_data_version(repo: Path, version: str) -> str:
    import mlflow

    return (
        mlflow.MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
        .get_model_version("agegender", version)
        .tags["data_version"]
    )
