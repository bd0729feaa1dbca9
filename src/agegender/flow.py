"""The Prefect training flow: fetch data -> retrain? -> each dvc.yaml stage in order -> report.

Orchestration only. Each stage task runs `dvc repro --single-item STAGE`, the command a person
runs, so dvc.lock and DVC's caches decide what runs and a later `dvc repro` by hand has nothing to
do. Prefect adds retries on the tasks that touch the DVC remote or the registry, a time limit that
stops a stage's processes, the stages' output in the run logs, and report artifacts. Deployments
(`agegender flow serve|deploy|multiworker`) are agegender.deployments'.

On a work pool a run whose host dies is marked Crashed when its heartbeats stop and put back for
another worker, whose attempt ends the MLflow runs the dead one left open as KILLED. With TF_CONFIG
(a multi-worker run's job variable) the chief runs the whole flow and trains with the other
workers; each of those prepares the same data and only trains.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Mapping
from contextlib import suppress
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.runtime import flow_run
from prefect.states import Completed

from agegender import paths, pipeline
from agegender.config import load_params
from agegender.distributed import Cluster, cluster_from_tf_config

FLOW_NAME = "agegender-training"
DEPLOYMENT = "retrain"
REPORT_KEY = "agegender-training-report"
RETRIES = {"retries": 2, "retry_delay_seconds": [10, 30]}
RETRIED_STAGES = {"evaluate", "register"}  # they read and write the registry
STAGE_SECONDS = {"train": 2 * 3600}
DEFAULT_STAGE_SECONDS = 3600
RUN_TAG = "prefect_flow_run_id"  # on every MLflow run a stage starts: which flow run it belongs to


def run_logged(
    command: list[str], *, cwd: Path, seconds: float, log: Callable[[str], object], env: Mapping[str, str] = {}
) -> None:
    """Run command with env added, passing each output line to log; stop its process group after `seconds`."""
    env = dict(os.environ, **env, PYTHONUNBUFFERED="1", COLUMNS="200")  # Rich wraps at 80 columns without a terminal
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
        raise TimeoutError(f"`{' '.join(command)}` ran past its limit of {seconds:.0f} s and was stopped")
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
    # MLflow tags every run the stage starts with these (its MLFLOW_RUN_CONTEXT): a retry finds them.
    tags = {"MLFLOW_RUN_CONTEXT": json.dumps({RUN_TAG: str(flow_run.id)})} if flow_run.id else {}
    run_logged(command, cwd=root, seconds=STAGE_SECONDS.get(stage, DEFAULT_STAGE_SECONDS), log=logger.info, env=tags)
    return True


@task(name="end-abandoned-runs", **RETRIES)
def end_abandoned_runs(root: Path, flow_run_id: str) -> list[str]:
    """End as KILLED the MLflow runs an earlier attempt of this flow run left RUNNING (its host died)."""
    from agegender.tracking import configure_tracking, end_dead_runs

    configure_tracking(root, os.environ.get("MLFLOW_TRACKING_URI"))
    ended = end_dead_runs(f"tags.{RUN_TAG} = '{flow_run_id}'")
    get_run_logger().info("Attempt %d: ended %d MLflow run(s) of the crashed attempt: %s", flow_run.run_count,
                          len(ended), ", ".join(ended) or "none")  # fmt: skip
    return ended


def stage_task(stage: str):
    retries = RETRIES if stage in RETRIED_STAGES else {}
    return task(run_stage).with_options(name=f"stage-{stage}", **retries)


@task(name="train-with-the-chief")
def train_with_chief(root: Path, cluster: Cluster) -> None:
    """`agegender train` as a non-chief worker: it trains in step with the chief and writes nothing,
    so it runs outside `dvc repro` (which would miss the stage's outputs)."""
    logger = get_run_logger()
    logger.info(
        "$ agegender train   (worker %d of %d; the chief is %s)", cluster.index, cluster.size, cluster.workers[0]
    )
    command = [str(Path(sys.executable).parent / "agegender"), "train"]
    run_logged(command, cwd=root, seconds=STAGE_SECONDS["train"], log=logger.info)


def run_as_worker(root: Path, cluster: Cluster) -> Completed:
    """A non-chief worker's share of a multi-worker run: the data and stages up to train, then train."""
    fetch_data(root)
    stages = pipeline.pipeline_stages(root)
    for stage in stages[: stages.index("train")]:
        stage_task(stage)(root, stage)
    train_with_chief(root, cluster)
    message = (
        f"trained as worker {cluster.index} of {cluster.size}; the chief {cluster.workers[0]} evaluates and registers"
    )
    return Completed(message=message)


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
    cluster = cluster_from_tf_config(os.environ.get("TF_CONFIG"))
    if cluster is not None and not cluster.is_chief:
        return run_as_worker(root, cluster)
    if flow_run.run_count > 1:  # rescheduled after a crash (deploy's automations) or retried
        end_abandoned_runs(root, str(flow_run.id))
    fetched = fetch_data(root)
    report = pipeline.RunReport(decision=check_retrain(root, force), fetched=fetched)
    if report.decision.retrain:
        for stage in pipeline.pipeline_stages(root):
            (report.ran if stage_task(stage)(root, stage) else report.up_to_date).append(stage)
    publish_report(root, report)
    name = "Completed" if report.decision.retrain else "Skipped"
    return Completed(name=name, message=report.message(), data=report.as_dict())
