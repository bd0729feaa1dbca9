"""The Prefect training flow: fetch data -> retrain? -> each dvc.yaml stage in order -> report.

Orchestration only. Each stage task runs `dvc repro --single-item STAGE`, the command a
person runs, so dvc.lock and DVC's caches decide what runs and a later `dvc repro` by hand
has nothing to do; the stages are the `agegender` commands dvc.yaml names. Prefect adds
retries on the tasks that touch the DVC remote or the registry, a time limit that stops a
stage's processes, the stages' output in the run logs, and report artifacts.

    agegender flow run      # once (what `make run` runs)
    agegender flow serve    # the `retrain` deployment on params.yaml's schedule (and the drift check's)
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.states import Completed

from agegender import paths, pipeline
from agegender.config import MonitorParams, load_params

FLOW_NAME = "agegender-training"
DEPLOYMENT = "retrain"
REPORT_KEY = "agegender-training-report"
RETRIES = {"retries": 2, "retry_delay_seconds": [10, 30]}
RETRIED_STAGES = {"evaluate", "register"}  # they read and write the registry
STAGE_SECONDS = {"train": 2 * 3600}
DEFAULT_STAGE_SECONDS = 3600


class StageTimeout(TimeoutError):
    """A stage ran past its time limit; its processes were stopped."""


def run_logged(command: list[str], *, cwd: Path, seconds: float, log: Callable[[str], object]) -> None:
    """Run command, passing each output line to log; stop its whole process group after `seconds`."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", COLUMNS="200")  # Rich wraps at 80 columns without a terminal
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # this environment's CLI
    proc = subprocess.Popen(
        command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
        start_new_session=True,
    )  # fmt: skip
    expired = threading.Event()

    def stop() -> None:
        expired.set()
        with suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)

    timer = threading.Timer(seconds, stop)
    timer.start()
    try:
        for line in proc.stdout:
            if line.strip():
                log(line.rstrip())
        code = proc.wait()
    finally:
        timer.cancel()
        if proc.poll() is None:  # interrupted: never leave a stage running behind the flow
            stop()
            proc.wait()
    if expired.is_set():
        raise StageTimeout(f"`{' '.join(command)}` ran past its limit of {seconds:.0f} s and was stopped")
    if code != 0:
        raise RuntimeError(f"`{' '.join(command)}` exited with {code}")


@task(name="fetch-data", **RETRIES)
def fetch_data(root: Path) -> str:
    """What `agegender data fetch` does: dvc pull data.dvc, else ingest data.source."""
    from agegender.data.fetch import fetch_dataset

    params = load_params(root / "params.yaml")
    result = fetch_dataset(root, params.data.source, params.data.demo, params.data.ingest)
    get_run_logger().info(result.summary)
    return result.how


@task(name="check-data-version", **RETRIES)
def check_retrain(root: Path, force: bool) -> pipeline.RetrainDecision:
    import mlflow

    from agegender.data.versioning import data_version
    from agegender.registry import champion_info
    from agegender.tracking import configure_tracking

    model_name = load_params(root / "params.yaml").registry.model_name
    configure_tracking(root, os.environ.get("MLFLOW_TRACKING_URI"))
    champion = None if force else champion_info(mlflow.MlflowClient(), model_name)
    decision = pipeline.decide_retrain(
        data_version(root / paths.DATA_DVC), champion, force=force, model_name=model_name
    )
    get_run_logger().info("%s: %s", "Retraining" if decision.retrain else "Not retraining", decision.reason)
    return decision


def run_stage(root: Path, stage: str) -> bool:
    """`dvc repro --single-item STAGE` when DVC says the stage is stale; True when it ran."""
    logger = get_run_logger()
    if not pipeline.stage_is_stale(root, stage):
        logger.info("Stage %r is up to date: DVC skips it", stage)
        return False
    command = [sys.executable, "-m", "dvc", "repro", "--single-item", stage]
    logger.info("$ dvc repro --single-item %s   (in %s)", stage, root)
    run_logged(command, cwd=root, seconds=STAGE_SECONDS.get(stage, DEFAULT_STAGE_SECONDS), log=logger.info)
    return True


def stage_task(stage: str):
    retries = RETRIES if stage in RETRIED_STAGES else {}
    return task(run_stage).with_options(name=f"stage-{stage}", **retries)


@task(name="report")
def publish_report(root: Path, report: pipeline.RunReport) -> None:
    import mlflow

    from agegender.registry import champion_info

    if report.decision.retrain:
        pipeline.collect_outputs(root, report)
        model_name = load_params(root / "params.yaml").registry.model_name
        report.champion_after = champion_info(mlflow.MlflowClient(), model_name)
    create_markdown_artifact(key=REPORT_KEY, markdown=report.markdown(), description=report.message())
    if report.candidates:
        create_table_artifact(key="agegender-candidates", table=report.candidates, description="Candidates")
    if report.gate:
        create_table_artifact(key="agegender-gate", table=report.gate["checks"], description=report.gate["summary"])


@flow(name=FLOW_NAME, description="Fetch data, run the dvc.yaml stages (DVC skips what did not change), report.")
def training_flow(project_root: str = ".", force: bool = False):
    """With force=False (the schedule's setting) a run on the champion's data version is "Skipped"."""
    root = Path(project_root).expanduser().resolve()
    fetched = fetch_data(root)
    report = pipeline.RunReport(decision=check_retrain(root, force), fetched=fetched)
    if report.decision.retrain:
        for stage in pipeline.pipeline_stages(root):
            (report.ran if stage_task(stage)(root, stage) else report.up_to_date).append(stage)
    publish_report(root, report)
    name = "Completed" if report.decision.retrain else "Skipped"
    return Completed(name=name, message=report.message(), data=report.as_dict())


def serve_deployment(root: Path, *, name: str, cron: str, timezone: str, monitor: MonitorParams) -> None:
    """Serve the flow as deployment `agegender-training/NAME` on the schedule, and beside it the drift
    check `agegender-monitoring/drift` on monitor.drift.cron; runs until stopped."""
    from prefect import serve
    from prefect.schedules import Cron

    from agegender.drift_flow import drift_deployment

    training = training_flow.to_deployment(
        name=name,
        schedules=[Cron(cron, timezone=timezone)],
        parameters={"project_root": str(root), "force": False},
        description="Retrain when the data version differs from the registry champion's.",
        tags=["agegender", "retrain"],
        concurrency_limit=1,  # one pipeline at a time in a project, scheduled or started by a drift check
    )
    serve(training, drift_deployment(root, monitor, timezone))
