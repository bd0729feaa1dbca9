"""The Prefect training flow end to end, on real UTKFace images with a tiny model.

1. The flow in-process under Prefect's test harness: it ingests data.source, runs the
   dvc.yaml stages, publishes its report artifact, and a second run on unchanged data
   trains nothing.
2. The scheduled deployment served by `python -m flows.retrain` against a real
   `prefect server` process: it carries params.yaml's cron schedule; triggering it
   trains, then (once a champion exists) skips on unchanged data, and retrains after
   an `agegender data ingest --append` batch.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import (
    BIN,
    OPEN_GATES,
    PROJECT,
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


def has_stage(repo: Path, name: str) -> bool:
    return name in (yaml.safe_load((repo / "dvc.yaml").read_text()).get("stages") or {})


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


def report_for(flow_run_id) -> str:
    """The markdown report artifact that one flow run published (from the current Prefect API)."""
    from flows.training import REPORT_KEY
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        ArtifactFilterKey,
    )

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                key=ArtifactFilterKey(any_=[REPORT_KEY]),
                flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]),
            )
        )
    assert len(artifacts) == 1, f"expected one {REPORT_KEY!r} artifact, got {artifacts}"
    assert artifacts[0].type == "markdown"
    return artifacts[0].data


def test_flow_trains_skips_unchanged_data_and_never_promotes_a_worse_model(project_repo, utk_subset):
    from flows.training import training_flow
    from prefect.testing.utilities import prefect_test_harness

    # No data.dvc yet: the fetch task must fall back to ingesting data.source.
    set_params(project_repo, {**TINY, "data": {"source": str(utk_subset)}})
    stages = yaml.safe_load((project_repo / "dvc.yaml").read_text())["stages"]

    with prefect_test_harness(server_startup_timeout=240):
        first = training_flow(project_root=str(project_repo), return_state=True)
        assert first.is_completed(), first.message
        summary = first.result()
        assert summary["fetched"] == f"ingest {utk_subset}"
        assert summary["retrain"] and summary["status"] == "trained"
        assert summary["stages"] == list(stages)
        assert summary["ran"] == list(stages), "every stage runs on new data, in dvc.yaml order"
        assert summary["unchanged"] == [] and summary["cached"] == []
        assert (project_repo / "data.dvc").exists() and summary["data_version"] == data_version(project_repo)

        report = report_for(first.state_details.flow_run_id)
        candidates = json.loads((project_repo / "artifacts/model/candidates.json").read_text())
        assert "## Candidates" in report and "## Gate" in report
        for candidate in candidates:  # sqlite store: run ids, not links
            assert f"`{candidate['run_id']}`" in report
        if (project_repo / "artifacts/eval/gate.json").exists():
            assert summary["gate"] is not None and "**Decision:" in report
        if has_stage(project_repo, "register"):
            assert "## Registry" in report and "champion now" in report

        lock = (project_repo / "dvc.lock").read_text()
        runs = training_runs(project_repo)
        assert len(runs) == 1 and runs[0]["data_version"] == summary["data_version"]

        second = training_flow(project_root=str(project_repo), return_state=True)
        assert second.is_completed(), second.message
        again = second.result()
        assert again["fetched"] == "dvc pull"
        assert "train" not in again["ran"] + again["cached"]
        if has_stage(project_repo, "register"):
            # The first run registered a champion trained on this very data version.
            assert second.name == "Skipped" and again["status"] == "skipped", second.message
            assert again["champion"]["data_version"] == summary["data_version"]
            assert again["ran"] == [] and again["stages"] == []
            assert "# agegender training: skipped" in report_for(second.state_details.flow_run_id)
        else:
            # No registry stage yet, so no champion to compare with: DVC skips every stage.
            assert again["status"] == "up to date" and again["ran"] == [], again
            assert "train" in again["unchanged"]
        assert (project_repo / "dvc.lock").read_text() == lock
        assert len(training_runs(project_repo)) == 1, "no second training run in MLflow"

        # A deliberately worse candidate (one epoch, tiny learning rate), forced: it trains and
        # registers, is scored against the champion on the same test split, and is not promoted.
        set_params(project_repo, {"train": {"epochs": 1, "learning_rate": 0.0001}, "gates": {"min_improvement": 0.5}})
        third = training_flow(project_root=str(project_repo), force=True, return_state=True)
        assert third.is_completed(), third.message
        worse = third.result()
        assert "train" in worse["ran"] and worse["gate"]["full_pass"] is False
        assert champion_version(project_repo) == "1"
    run("agegender", "registry", "promote", "2", cwd=project_repo)
    assert champion_version(project_repo) == "2"
    run("agegender", "registry", "rollback", cwd=project_repo)
    assert champion_version(project_repo) == "1"


def champion_version(repo: Path) -> str:
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    return str(client.get_model_version_by_alias("agegender", "champion").version)


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


def test_scheduled_deployment_retrains_only_when_the_data_changes(project_repo, utk_subset, tmp_path):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    set_params(project_repo, TINY)
    # The project layout: `python -m flows.retrain` runs from the project root.
    (project_repo / "flows").symlink_to(PROJECT / "flows")
    run("agegender", "data", "ingest", str(utk_subset), cwd=project_repo)
    schedule = yaml.safe_load((project_repo / "params.yaml").read_text())["schedule"]
    registers = has_stage(project_repo, "register")

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
            [
                str(BIN / "prefect"),
                "server",
                "start",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--no-ui",
            ],
            cwd=tmp_path,
            env=env,
            log=server_log,
        )
        processes.append(server)
        wait_until(
            lambda: answers_ok(f"{api}/health"), what="prefect server", seconds=240, process=server, log=server_log
        )

        serve = start([sys.executable, "-m", "flows.retrain"], cwd=project_repo, env=env, log=serve_log)
        processes.append(serve)
        with temporary_settings(updates={PREFECT_API_URL: api}):
            deployment = wait_until(
                lambda: deployment_named(DEPLOYMENT),
                what="the deployment",
                seconds=240,
                process=serve,
                log=serve_log,
            )
            assert f"against the Prefect API at {api}" in serve_log.read_text()
            (entry,) = deployment.schedules
            assert entry.schedule.cron == schedule["cron"]
            assert entry.schedule.timezone == schedule["timezone"]
            assert entry.active
            assert deployment.parameters == {
                "project_root": str(project_repo.resolve()),
                "force": False,
            }

            # No champion yet: the run trains.
            first = trigger(serve_log)
            assert first.state.message.startswith("trained"), first.state.message
            assert "## Candidates" in report_for(first.id)
            version = data_version(project_repo)
            assert [r["data_version"] for r in training_runs(project_repo)] == [version]

            if registers:
                # The champion was trained on this data version: nothing to do.
                lock = (project_repo / "dvc.lock").read_text()
                second = trigger(serve_log)
                assert second.state.name == "Skipped", second.state.message
                assert f"data version {version} is the champion's" in second.state.message
                assert "skipped" in report_for(second.id)
                assert (project_repo / "dvc.lock").read_text() == lock
                assert len(training_runs(project_repo)) == 1

            # A new batch of images changes the data version: the run retrains.
            batch = tmp_path / "batch"
            batch.mkdir()
            for path in utkface_files(40, offset=1):
                shutil.copyfile(path, batch / path.name)
            run("agegender", "data", "ingest", str(batch), "--append", cwd=project_repo)
            new_version = data_version(project_repo)
            assert new_version != version

            third = trigger(serve_log)
            assert third.state.message.startswith("trained"), third.state.message
            versions = sorted(r["data_version"] for r in training_runs(project_repo))
            assert versions == sorted([version, new_version])
    finally:
        for process in reversed(processes):  # the runner first: it pauses its schedule
            stop(process)
