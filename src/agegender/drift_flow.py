"""The Prefect drift flow: served records of a window against the champion's training reference.

    agegender monitor drift   # once, by hand
    agegender flow serve      # serves deployment agegender-monitoring/drift beside agegender-training/retrain

The flow reads the champion's reference (logged by training as outputs/reference.csv in its
run), the records the service wrote for that model version in the window, compares them
(agegender.drift), writes drift.html and drift.json to monitor.reports, publishes a
markdown and a table artifact, and on drift with monitor.drift.retrain starts the
retraining deployment (force=true: drift is the reason to retrain now; the gates still
decide whether the new model replaces the champion).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pandas as pd
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.states import Completed

from agegender import paths
from agegender.config import MonitorParams, load_params
from agegender.drift import DriftReport, check_drift, report_html
from agegender.files import write_json
from agegender.monitoring import faces_table, read_records, records_url

FLOW_NAME = "agegender-monitoring"
DEPLOYMENT = "drift"
REPORT_KEY = "agegender-drift-report"
REPORT_HTML = "drift.html"
REPORT_JSON = "drift.json"
RETRIES = {"retries": 2, "retry_delay_seconds": [10, 30]}


@dataclass(frozen=True)
class Champion:
    label: str  # e.g. agegender v3
    version: str
    reference: pd.DataFrame


@task(name="load-reference", **RETRIES)
def load_reference(root: Path, model_uri: str) -> Champion:
    """The model `model_uri` names now, and the reference statistics its training run logged."""
    import mlflow

    from agegender.registry import resolve_version
    from agegender.tracking import configure_tracking

    configure_tracking(root, os.environ.get("MLFLOW_TRACKING_URI"))
    version = resolve_version(mlflow.MlflowClient(), model_uri)
    path = mlflow.artifacts.download_artifacts(run_id=version.run_id, artifact_path=f"outputs/{paths.DRIFT_REFERENCE}")
    label = f"{version.name} v{version.version}"
    return Champion(label=label, version=str(version.version), reference=pd.read_csv(path))


@task(name="read-served-records", **RETRIES)
def read_window(url: str, since: datetime, until: datetime, version: str) -> pd.DataFrame:
    """The faces the given model version answered in the window (other versions' predictions differ by design)."""
    faces = faces_table(read_records(url, since=since, until=until))
    get_run_logger().info("%d served faces in %s between %s and %s", len(faces), url, since, until)
    return faces[faces["model_version"] == version]


@task(name="publish-drift-report")
def publish_report(report: DriftReport, champion: Champion, window: pd.DataFrame, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    page = folder / REPORT_HTML
    page.write_text(report_html(report, champion.reference, window))
    write_json(folder / REPORT_JSON, report.as_dict())
    create_markdown_artifact(
        key=REPORT_KEY, markdown=report.markdown() + f"\nHTML report: `{page}`\n", description=report.summary
    )
    if report.features:
        create_table_artifact(key="agegender-drift-features", table=report.table(), description=report.summary)
    return page


@task(name="start-retraining", **RETRIES)
def start_retraining(reason: str) -> str:
    """A run of agegender-training/retrain (force=true), not waited for; one per drift run, even when retried."""
    from prefect.deployments import run_deployment
    from prefect.runtime import flow_run

    from agegender.flow import DEPLOYMENT as RETRAIN
    from agegender.flow import FLOW_NAME as TRAINING

    run = run_deployment(
        f"{TRAINING}/{RETRAIN}",
        parameters={"force": True},
        timeout=0,
        idempotency_key=f"drift-{flow_run.id}",
        flow_run_name=f"retrain-on-drift-{datetime.now(UTC):%Y%m%d-%H%M}",
    )
    get_run_logger().warning("Started %s/%s (flow run %s): %s", TRAINING, RETRAIN, run.id, reason)
    return str(run.id)


def window_bounds(hours: float, end: str | None) -> tuple[datetime, datetime]:
    """(since, until) in UTC; `end` is an ISO time (naive means UTC), default now."""
    until = datetime.fromisoformat(end) if end else datetime.now(UTC)
    until = (until if until.tzinfo else until.replace(tzinfo=UTC)).astimezone(UTC)
    return until - timedelta(hours=hours), until


@flow(name=FLOW_NAME, description="Compare a window of served records with the champion's training reference.")
def drift_flow(
    project_root: str = ".", window_hours: float | None = None, end: str | None = None, retrain: bool | None = None
):
    """window_hours / retrain default to monitor.drift in params.yaml; end defaults to now."""
    root = Path(project_root).expanduser().resolve()
    params = load_params(root / "params.yaml")
    monitor: MonitorParams = params.monitor
    since, until = window_bounds(window_hours or monitor.drift.window_hours, end)
    champion = load_reference(root, params.serve.model_uri)
    window = read_window(records_url(monitor.records, root), since, until, champion.version)
    report = check_drift(
        champion.reference,
        window,
        monitor.drift,
        model=champion.label,
        start=since.isoformat(timespec="seconds"),
        end=until.isoformat(timespec="seconds"),
    )
    page = publish_report(report, champion, window, root / monitor.reports)
    get_run_logger().info("%s; report: %s", report.summary, page)
    result = report.as_dict() | {"report": str(page), "retraining_run": None}
    if report.drifted and (monitor.drift.retrain if retrain is None else retrain):
        result["retraining_run"] = start_retraining(report.summary)
    return Completed(name="Drift" if report.drifted else "Completed", message=report.summary, data=result)


def drift_deployment(root: Path, monitor: MonitorParams, timezone: str):
    """The drift check as a deployment on monitor.drift.cron, to serve beside the training one."""
    from prefect.schedules import Cron

    return drift_flow.to_deployment(
        name=DEPLOYMENT,
        schedules=[Cron(monitor.drift.cron, timezone=timezone)],
        parameters={"project_root": str(root)},
        description="Compare the last monitor.drift.window_hours of served records with the champion's reference.",
        tags=["agegender", "drift"],
        concurrency_limit=1,
    )
