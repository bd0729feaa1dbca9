"""Where the training flow runs on a schedule: `agegender flow serve` (this process serves it) or
`agegender flow deploy` (prefect.yaml's deployments on a work pool, run by `prefect worker start` on
any host, with automations that retry a run whose worker host died), and `agegender flow multiworker`
(one run of the `train-multiworker` deployment per host of a tf.distribute cluster).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path

import yaml

from agegender.config import MonitorParams, ScheduleParams
from agegender.distributed import cluster_from_tf_config, tf_config
from agegender.flow import DEPLOYMENT, FLOW_NAME, run_logged, training_flow

# Its runs are pinned to hosts (each TF_CONFIG names its own address): a crashed one is not put back
# for any worker, so it has no crash automations; the README says to start the run again.
MULTIWORKER = "train-multiworker"


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


# --- the work pool: prefect.yaml's deployments, run by `prefect worker start` on any host ---------

CRASHED = "agegender: crashed without heartbeat"  # automation names (deploy replaces them)
RESCHEDULED = "agegender: retry a crashed run"


def deploy_to_work_pool(root: Path, schedule: ScheduleParams, log: Callable[[str], object]) -> list[str]:
    """`prefect deploy` each deployment of root/prefect.yaml (its pull steps clone the current commit),
    the `retrain` one on schedule.cron; create their work pools and the crash automations. Returns
    the deployments' names."""
    from prefect.client.orchestration import get_client

    spec = yaml.safe_load((root / "prefect.yaml").read_text())
    names = [entry["name"] for entry in spec["deployments"]]
    for pool in sorted({entry["work_pool"]["name"] for entry in spec["deployments"]}):
        ensure_work_pool(pool)
    # Every run's process sends heartbeats this often; the automation below waits for them.
    heartbeat = json.dumps({"env": {"PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(schedule.heartbeat_seconds)}})
    for name in names:
        command = [str(Path(sys.executable).parent / "prefect"), "deploy", "--name", name]
        command += ["--job-variable", heartbeat]  # a JSON object: `key=value` would pass the env as a string
        if name == DEPLOYMENT:
            command += ["--cron", schedule.cron, "--timezone", schedule.timezone]
        run_logged(command, cwd=root, seconds=600, log=log, env={"PREFECT_CLI_PROMPT": "false"})
    with get_client(sync_client=True) as client:
        ids = [str(client.read_deployment_by_name(f"{FLOW_NAME}/{name}").id) for name in names if name != MULTIWORKER]
    create_crash_automations(ids, schedule)
    return [f"{FLOW_NAME}/{name}" for name in names]


def ensure_work_pool(name: str) -> None:
    """A `process` work pool of this name, with Prefect's default job template; kept if it exists."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists
    from prefect.workers.process import ProcessWorker

    template = ProcessWorker.get_default_base_job_template()
    with get_client(sync_client=True) as client, suppress(ObjectAlreadyExists):
        client.create_work_pool(WorkPoolCreate(name=name, type="process", base_job_template=template))


def create_crash_automations(deployment_ids: list[str], schedule: ScheduleParams) -> None:
    """Prefect's server has no crash detection of its own for a lost worker host: one automation marks
    a run of these deployments Crashed when its heartbeats stop, another puts a Crashed run back as
    AwaitingRetry for any worker, at most schedule.crash_retries times (the run count of its attempts)."""
    from datetime import timedelta

    from prefect.automations import Automation
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import EventTrigger, Posture

    runs = {"prefect.resource.id": "prefect.flow-run.*"}
    ours = {
        "prefect.resource.role": "deployment",
        "prefect.resource.id": [f"prefect.deployment.{i}" for i in deployment_ids],
    }
    silent = schedule.heartbeat_seconds * schedule.missed_heartbeats
    ends = {f"prefect.flow-run.{state}" for state in ("Completed", "Failed", "Cancelled", "Crashed")}
    automations = [
        Automation(
            name=CRASHED,
            description=f"A running flow run without a heartbeat for {silent} s: its worker host is gone.",
            trigger=EventTrigger(
                match=runs,
                match_related=ours,
                after={"prefect.flow-run.heartbeat"},
                expect={"prefect.flow-run.heartbeat", *ends},
                for_each={"prefect.resource.id"},
                posture=Posture.Proactive,
                threshold=1,
                within=timedelta(seconds=silent),
            ),  # fmt: skip
            actions=[ChangeFlowRunState(state=StateType.CRASHED, message=f"No heartbeat for {silent} s")],
        ),
        Automation(
            name=RESCHEDULED,
            description=f"A crashed flow run is scheduled again, at most {schedule.crash_retries} times.",
            trigger=EventTrigger(
                match={**runs, "prefect.run-count": [str(n) for n in range(1, schedule.crash_retries + 1)]},
                match_related=ours,
                expect={"prefect.flow-run.Crashed"},
                posture=Posture.Reactive,
                threshold=1,
            ),  # fmt: skip
            actions=[
                ChangeFlowRunState(state=StateType.SCHEDULED, name="AwaitingRetry", message="Retry after a crash")
            ],
        ),
    ]
    with get_client(sync_client=True) as client:
        for automation in automations:
            for old in client.read_automations_by_name(automation.name):
                client.delete_automation(old.id)
            automation.create()


def start_multiworker_runs(workers: list[str]) -> list:
    """One flow run of the `train-multiworker` deployment per worker of a tf.distribute cluster (host:port
    each, the chief first), with its TF_CONFIG as a job variable, on the work queue named after its host:
    the worker on that host listens there (`prefect worker start --pool agegender --work-queue HOST`).
    A missing queue is a ValueError: a worker polling a queue that does not exist takes no run at all."""
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    cluster_from_tf_config(tf_config(workers, 0))  # a malformed address is a ValueError naming it
    with get_client(sync_client=True) as client:
        pool = client.read_deployment_by_name(f"{FLOW_NAME}/{MULTIWORKER}").work_pool_name
        queues = {queue.name for queue in client.read_work_queues(work_pool_name=pool)}
    missing = [queue for queue in map(work_queue_of, workers) if queue not in queues]
    if missing:
        raise ValueError(
            f"the work pool {pool!r} has no work queue {', '.join(missing)}: on each of those hosts, "
            f"`prefect work-queue create HOST --pool {pool}` before `{worker_command(pool)}`"
        )
    return [
        run_deployment(
            f"{FLOW_NAME}/{MULTIWORKER}",
            job_variables={"env": {"TF_CONFIG": tf_config(workers, index)}},
            work_queue_name=work_queue_of(worker),
            flow_run_name=f"{MULTIWORKER}-worker{index}-of-{len(workers)}",
            timeout=0,  # started, not awaited: the runs train together on their hosts
        )
        for index, worker in enumerate(workers)
    ]


def work_queue_of(worker: str) -> str:
    """The work queue of a TF_CONFIG worker address: its host (10.0.0.12:12345 -> 10.0.0.12)."""
    return worker.rsplit(":", 1)[0]


def worker_command(pool: str) -> str:
    """How a host's worker takes the pool's runs and the multi-worker runs on its own work queue."""
    return f"prefect worker start --pool {pool} --work-queue default --work-queue HOST"
