"""The training flow on a Prefect work pool across hosts (network namespaces, tests/hosts.py).

    server   agegender stack up (PostgreSQL, S3, MLflow, Prefect server on its bridge address),
             `git daemon` serving the project repository, and `dask scheduler`
    worker1  prefect worker start --pool agegender
    worker2  prefect worker start --pool agegender
    dask1    dask worker (one thread)
    dask2    dask worker (one thread)

The deployed commit has two candidates and scale.dask_scheduler naming the server's scheduler;
`agegender flow deploy` deploys prefect.yaml's two deployments. Issue 11's "done" is one test: the
server's scheduler creates the `retrain` run (no champion yet, so it trains), a worker host takes
it, clones the deployed commit over the network, pulls the data version from S3, detects faces in
shards on both Dask workers, trains the two candidates side by side on them, and registers the
champion on the server's MLflow. Faults: a worker host killed mid-stage in a `train` run started by
hand (the run is marked Crashed for missing heartbeats and completed on the other host, the killed
attempt's MLflow runs ended as KILLED), and the Prefect server restarted while a worker waits. The
Dask workers have hosts of their own, so a killed worker host takes no Dask worker with it. Last, a
model trains across both worker hosts (tf.distribute) from the `train-multiworker` deployment.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import (
    BIN,
    OPEN_GATES,
    PROJECT,
    TINY,
    TWO_CANDIDATES,
    TeamStack,
    copy_utk_subset,
    exported,
    make_project_repo,
    run,
    set_params,
    stop_leftovers,
    tail,
    use_team_remote,
    wait_until,
)
from tests.e2e.test_scale_out_dask import DASK_PORT, Cluster, dask_env, detector_use
from tests.hosts import Host, network_hosts

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

TRAIN, RETRAIN = "agegender-training/train", "agegender-training/retrain"
RUN_SECONDS = 900  # one training run (clone, dvc pull, every stage) on a slow shared machine
HEARTBEAT = {"heartbeat_seconds": 30, "missed_heartbeats": 2}  # a lost host's run is Crashed after 60 s
CHIPS, SHARD_IMAGES = 150, 20  # 8 detection shards: enough for both Dask workers to get some


@dataclass
class Pool:
    hosts: dict[str, Host]
    stack: TeamStack  # the stack on the server host; env has what `agegender stack env` exports
    repo: Path  # the project repository, served by git daemon from the server host
    deployed: str  # the commit `agegender flow deploy` deployed
    folder: Path
    workers: dict
    dask: Cluster  # the scheduler on the server host, dask1 and dask2 its workers

    def start_worker(self, name: str) -> None:
        home = self.folder / name
        home.mkdir(exist_ok=True)
        env = {**self.stack.env, "PREFECT_HOME": str(home / "prefect-home"), "PREFECT_WORKER_QUERY_SECONDS": "2"}
        args = [BIN / "prefect", "worker", "start", "--pool", "agegender", "--name", name, "--type", "process"]
        # Its multi-worker runs come on a queue named after its address (make_pool creates it: a worker
        # polling a queue that does not exist takes no run at all, not even the default queue's).
        args += ["--work-queue", "default", "--work-queue", self.hosts[name].address]
        self.workers[name] = self.hosts[name].start(args, cwd=home, env=env, log=self.log(name))

    def log(self, worker: str) -> Path:
        return self.folder / f"{worker}.log"

    def ran_on(self, flow_run_id) -> list[str]:
        """The worker hosts that started this flow run (both may try to submit it; one wins)."""
        with api(self):
            started = f"Flow run '{flow_run(flow_run_id).name}' submitted to infrastructure"
        return [name for name in self.workers if started in self.log(name).read_text(errors="replace")]

    def host_of(self, address: str) -> str:
        """The test host with this address (a Dask worker's tcp://IP:PORT or a bare IP)."""
        ip = address.removeprefix("tcp://").rsplit(":", 1)[0]
        (name,) = [name for name, host in self.hosts.items() if host.address == ip]
        return name


@pytest.fixture(scope="module")
def pool() -> Pool:
    # The postgres user must reach the stack's folder; pytest's own temporary root is private (0700).
    folder = Path(tempfile.mkdtemp(prefix="agegender-pool-"))
    folder.chmod(0o711)
    root = folder / "stack"
    params = folder / "params.yaml"
    try:
        with network_hosts(["server", "worker1", "worker2", "dask1", "dask2"]) as hosts:
            server = hosts["server"]
            settings = {"dir": str(root), "host": server.address}  # default ports: the server host has its own
            shutil.copyfile(PROJECT / "params.yaml", params)
            set_params(folder, {"stack": settings})
            try:
                server.run(["agegender", "stack", "up", "--params", params], cwd=folder)
                env = {
                    **os.environ,
                    **exported(run("agegender", "stack", "env", "--params", str(params), cwd=folder).stdout),
                }
                env["PREFECT_HOME"] = str(folder / "client-prefect-home")  # the tests' client: no profile of its own
                stack = TeamStack(root=root, settings=settings, params=params, env=env)
                yield make_pool(hosts, stack, folder)
            finally:
                server.run(["agegender", "stack", "down", "--params", params], cwd=folder, check=False)
                stop_leftovers(root)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def make_pool(hosts: dict[str, Host], stack: TeamStack, folder: Path) -> Pool:
    server = hosts["server"]
    dask = start_dask(hosts, folder)
    repo = make_project_repo(folder)  # folder/repo, served as git://SERVER/repo
    daemon = ["git", "daemon", f"--base-path={folder}", "--export-all", "--reuseaddr", f"--listen={server.address}"]
    git_log = folder / "git-daemon.log"
    served = server.start(daemon, cwd=folder, log=git_log)
    run("git", "remote", "add", "origin", f"git://{server.address}/repo", cwd=repo)
    wait_until(lambda: run("git", "ls-remote", "origin", cwd=repo, check=False).returncode == 0,
               what="git daemon", seconds=60, process=served, log=git_log)  # fmt: skip
    use_team_remote(repo, stack)
    scale = {"dask_scheduler": dask.scheduler, "shard_images": SHARD_IMAGES}
    set_params(repo, {**TINY, "gates": OPEN_GATES, "schedule": HEARTBEAT, "candidates": TWO_CANDIDATES, "scale": scale})
    shutil.copyfile(PROJECT / "prefect.yaml", repo / "prefect.yaml")
    run("agegender", "data", "ingest", str(copy_utk_subset(folder / "utk", count=CHIPS)), cwd=repo, env=stack.env)
    run("git", "add", "params.yaml", "data.dvc", "prefect.yaml", cwd=repo)
    run("git", "commit", "-qm", "data in the team's S3; tiny model, two candidates on Dask; the deployments", cwd=repo)
    deployed = run("git", "rev-parse", "HEAD", cwd=repo).stdout.strip()
    deploy = run("agegender", "flow", "deploy", cwd=repo, env=stack.env)
    assert f"Deployed {TRAIN}, {RETRAIN}" in deploy.stderr, deploy.stderr
    # The branch moves on after the deploy: runs still train the deployed commit.
    (repo / "NOTES.md").write_text("after the deploy\n")
    run("git", "add", "NOTES.md", cwd=repo)
    run("git", "commit", "-qm", "a commit after the deploy", cwd=repo)
    pool = Pool(hosts=hosts, stack=stack, repo=repo, deployed=deployed, folder=folder, workers={}, dask=dask)
    for name in ("worker1", "worker2"):
        run("prefect", "work-queue", "create", hosts[name].address, "--pool", "agegender", cwd=folder, env=stack.env)
        pool.start_worker(name)
    return pool


def start_dask(hosts: dict[str, Host], folder: Path) -> Cluster:
    """`dask scheduler` on the server host, a one-thread `dask worker` on dask1 and dask2."""
    cluster = Cluster({"scheduler": hosts["server"], "dask1": hosts["dask1"], "dask2": hosts["dask2"]}, logs=folder)
    args = [BIN / "dask", "scheduler", "--host", hosts["server"].address, "--port", DASK_PORT, "--no-dashboard"]
    hosts["server"].start(args, cwd=folder, env=dask_env(folder), log=folder / "dask-scheduler.log")
    cluster.start_worker("dask1"), cluster.start_worker("dask2")
    cluster.wait_for_workers(2)
    return cluster


@contextlib.contextmanager
def api(pool: Pool):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: pool.stack.env["PREFECT_API_URL"]}):
        yield


def mlflow_client(pool: Pool):
    import mlflow

    return mlflow.MlflowClient(pool.stack.mlflow, registry_uri=pool.stack.mlflow)


def runs_of(pool: Pool, flow_run_id) -> list:
    """The MLflow runs the stages of one flow run started (flow.RUN_TAG)."""
    from agegender.flow import RUN_TAG

    return mlflow_client(pool).search_runs(
        [e.experiment_id for e in mlflow_client(pool).search_experiments()], f"tags.{RUN_TAG} = '{flow_run_id}'"
    )


def children_of(pool: Pool, parent_run_id: str) -> list:
    """The MLflow child runs of a stage's parent run: the candidates (tracked from the Dask workers)."""
    experiment_id = mlflow_client(pool).get_run(parent_run_id).info.experiment_id
    return mlflow_client(pool).search_runs([experiment_id], f"tags.mlflow.parentRunId = '{parent_run_id}'")


def flow_run(flow_run_id):
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_flow_run(flow_run_id)


def wait_final(pool: Pool, flow_run_id, seconds: float = RUN_SECONDS):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        state = flow_run(flow_run_id).state
        if state is not None and state.is_final() and state.name != "Crashed":  # Crashed: the retry comes
            return flow_run(flow_run_id)
        time.sleep(3)
    logs = "\n".join(f"--- {name}\n{tail(pool.log(name), 30)}" for name in pool.workers)
    raise AssertionError(f"flow run {flow_run_id} unfinished after {seconds} s: {state}\n{logs}")


def run_logs(pool: Pool, flow_run_id, phrase: str) -> list[str]:
    """The flow run's log lines with this phrase (the server searches: a run has more lines than one page)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId, LogFilterTextSearch

    found_by = LogFilter(
        flow_run_id=LogFilterFlowRunId(any_=[flow_run_id]), text=LogFilterTextSearch(query=f'"{phrase}"')
    )
    with api(pool), get_client(sync_client=True) as client:
        return [log.message for log in client.read_logs(log_filter=found_by)]


def assert_registry_consistent(pool: Pool) -> dict[str, str]:
    """Aliases point only at complete versions, and registry list shows exactly those; returns the aliases."""
    from agegender.registry import COMPLETE_TAG, list_versions

    client = mlflow_client(pool)
    versions = {int(v.version): v for v in client.search_model_versions("name = 'agegender'")}
    aliases = {alias: str(n) for alias, n in client.get_registered_model("agegender").aliases.items()}
    for alias, number in aliases.items():
        assert COMPLETE_TAG in versions[int(number)].tags, f"{alias} points at unfinished version {number}"
    complete = sorted((n for n, v in versions.items() if COMPLETE_TAG in v.tags), reverse=True)
    assert [row["version"] for row in list_versions(client, "agegender")] == complete
    return aliases


def flow_run_deployment(name: str):
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_deployment_by_name(name)


def next_scheduled(deployment):
    """The deployment's earliest run in state Scheduled, or None."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterId,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.client.schemas.sorting import FlowRunSort

    with get_client(sync_client=True) as client:
        found = client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id])),
            flow_run_filter=FlowRunFilter(
                state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.SCHEDULED]))
            ),
            sort=FlowRunSort.EXPECTED_START_TIME_ASC,
            limit=1,
        )
    return found[0] if found else None


def shards_cropped(pool: Pool) -> dict[str, int]:
    """Per Dask worker host: the detection shards its worker process has cropped since it started."""
    return {pool.host_of(address): shards for address, (_, shards) in detector_use(pool.dask).items()}


@pytest.mark.timeout(1800)
def test_the_scheduled_retraining_fires_on_the_server_and_trains_on_a_worker_host_over_dask(pool: Pool):
    """Issue 11's "done": scheduler -> worker host -> clean clone + S3 data -> Dask -> shared registry."""
    from prefect.client.orchestration import get_client
    from prefect.states import Scheduled

    from tests.e2e.test_flows import artifacts_of

    schedule = {"cron": "0 3 * * 1", "timezone": "UTC"}  # params.yaml's, unchanged by the test repo
    with api(pool):
        deployment = flow_run_deployment(RETRAIN)
        (entry,) = deployment.schedules
        assert (entry.schedule.cron, entry.schedule.timezone) == (schedule["cron"], schedule["timezone"])
        assert deployment.parameters == {"force": False}
        (clone,) = [step["prefect.deployments.steps.git_clone"] for step in deployment.pull_steps]
        assert clone["repository"] == f"git://{pool.hosts['server'].address}/repo"
        assert clone["commit_sha"] == pool.deployed != run("git", "rev-parse", "HEAD", cwd=pool.repo).stdout.strip()
        # The server's scheduler creates the coming runs on its own; the test moves the next one to now.
        upcoming = wait_until(lambda: next_scheduled(deployment), what="a scheduled run", seconds=300,
                              process=pool.workers["worker1"], log=pool.log("worker1"))  # fmt: skip
        assert upcoming.auto_scheduled
        before = shards_cropped(pool)
        started = time.monotonic()
        with get_client(sync_client=True) as client:
            client.set_flow_run_state(upcoming.id, Scheduled(), force=True)  # due now
        done = wait_final(pool, upcoming.id)
        print(f"scheduled retraining on the pool: {time.monotonic() - started:.0f} s")
        # No champion yet: force=False retrains.
        assert done.state.is_completed() and done.state.message.startswith("trained"), done.state.message
        assert len(pool.ran_on(done.id)) == 1, "one worker host took the run"
        report = artifacts_of(done.id)["agegender-training-report"].data
        assert "(dvc pull)" in report, report  # the data came from the team's S3 bucket
        assert [line for line in run_logs(pool, done.id, "Running stage") if "'train'" in line], (
            "stage output in the logs"
        )
    after = shards_cropped(pool)
    shards = {host: after[host] - before.get(host, 0) for host in ("dask1", "dask2")}
    assert min(shards.values()) > 0 and sum(shards.values()) == -(-CHIPS // SHARD_IMAGES), shards
    (parent,) = [r for r in runs_of(pool, done.id) if r.data.tags.get("role") == "parent"]
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["git_commit"] == pool.deployed  # the worker's clone was at the deployed commit
    children = children_of(pool, parent.info.run_id)
    assert {r.info.status for r in children} == {"FINISHED"} and len(children) == 2
    assert sorted(pool.host_of(r.data.tags["dask_worker"]) for r in children) == ["dask1", "dask2"]
    # The winner is chosen on validation alone (each child's last val_age_mae is its restored best model's).
    val_mae = {r.info.run_id: r.data.metrics["val_age_mae"] for r in children}
    winner = parent.data.tags["winner_run_id"]
    assert winner == min(val_mae, key=val_mae.get), val_mae
    assert "outputs/model.keras" in {item.path for item in mlflow_client(pool).list_artifacts(winner, "outputs")}
    assert assert_registry_consistent(pool) == {"champion": "1", "challenger": "1"}
    assert mlflow_client(pool).get_model_version("agegender", "1").run_id == winner


@pytest.mark.timeout(1800)
def test_a_worker_host_killed_mid_stage_crashes_the_run_and_the_other_host_completes_it(pool: Pool):
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    with api(pool):
        started = run_deployment(TRAIN, timeout=0)
        flow_run_id = started.id

        def training_open():  # an MLflow run of the train stage is open: the crash is mid-stage
            return [r for r in runs_of(pool, flow_run_id) if r.info.status == "RUNNING"]

        deadline = time.monotonic() + RUN_SECONDS
        while not training_open():
            assert time.monotonic() < deadline, f"the train stage never started: {flow_run(flow_run_id).state}"
            assert not flow_run(flow_run_id).state.is_final(), flow_run(flow_run_id).state
            time.sleep(2)
        (victim,) = pool.ran_on(flow_run_id)
        pool.hosts[victim].kill_all()
        abandoned = {r.info.run_id for r in training_open()}  # the dead attempt's, still marked RUNNING
        killed_at = time.monotonic()
        done = wait_final(pool, flow_run_id)
        print(f"killed on {victim}; completed {time.monotonic() - killed_at:.0f} s later")
        with get_client(sync_client=True) as client:
            history = [(s.type.value, s.name) for s in client.read_flow_run_states(flow_run_id)]
    assert done.state.is_completed() and done.state.message.startswith("trained"), done.state.message
    crashed = history.index(("CRASHED", "Crashed"))
    assert ("SCHEDULED", "AwaitingRetry") in history[crashed:], history
    assert done.run_count == 2
    (other,) = set(pool.workers) - {victim}
    assert pool.ran_on(flow_run_id) == sorted([victim, other]), "the other host completed it"
    (ended,) = run_logs(pool, flow_run_id, "of the crashed attempt")
    assert ended.startswith("Attempt 2: ended") and all(i in ended for i in abandoned), ended
    # The killed attempt's MLflow runs are ended, not left looking alive; the retry's runs finished.
    runs = {r.info.run_id: r.info.status for r in runs_of(pool, flow_run_id)}
    assert {runs[i] for i in abandoned} == {"KILLED"}, runs
    assert {s for i, s in runs.items() if i not in abandoned} == {"FINISHED"}, runs
    # Candidates the killed attempt had sent to the Dask workers trained on there (Dask cannot stop a running
    # task), ahead of the retry's work on those one-thread workers: none is left looking alive.
    orphans = {r.info.run_id: r.info.status for i in abandoned for r in children_of(pool, i)}
    print(f"the killed attempt's candidates on Dask: {orphans}")
    assert "RUNNING" not in orphans.values(), orphans
    aliases = assert_registry_consistent(pool)
    champion = mlflow_client(pool).get_model_version("agegender", aliases["champion"])
    assert champion.run_id not in abandoned | set(orphans), "the champion is the retry's"
    pool.start_worker(victim)  # the host is back


@pytest.mark.timeout(900)
def test_a_waiting_worker_reconnects_after_the_prefect_server_restarts(pool: Pool):
    from prefect.deployments import run_deployment

    from agegender.stack import stop_services

    stop_services(pool.stack.root, ["prefect"])
    time.sleep(10)  # the workers poll a server that is gone
    pool.hosts["server"].run(["agegender", "stack", "up", "--params", pool.stack.params], cwd=pool.folder)
    with api(pool):
        started = run_deployment(RETRAIN, timeout=0)
        done = wait_final(pool, started.id, seconds=600)
    assert done.state.name == "Skipped", done.state.message
    assert len(pool.ran_on(done.id)) == 1
    assert all(worker.poll() is None for worker in pool.workers.values()), "no worker exited"


@pytest.mark.timeout(1200)
def test_one_model_trains_across_both_worker_hosts_from_the_multiworker_deployment(pool: Pool):
    """`agegender flow multiworker`: a run per worker host, each with its TF_CONFIG; the chief registers."""
    import re

    from tests.e2e.test_multiworker import PORT

    # Candidates train across the TF_CONFIG hosts or on Dask, not both: the team deploys a commit without Dask.
    set_params(pool.repo, {"scale": {"dask_scheduler": None}, "candidates": [{"name": "default", "train": {}}]})
    run("git", "commit", "-qam", "one candidate, no Dask: for multi-worker training", cwd=pool.repo)
    deployed = run("git", "rev-parse", "HEAD", cwd=pool.repo).stdout.strip()
    deploy = run("agegender", "flow", "deploy", cwd=pool.repo, env=pool.stack.env)
    assert "agegender-training/train-multiworker" in deploy.stderr, deploy.stderr
    versions = len(mlflow_client(pool).search_model_versions("name = 'agegender'"))

    workers = [f"{pool.hosts[name].address}:{PORT}" for name in ("worker1", "worker2")]
    unknown = run("agegender", "flow", "multiworker", workers[0], "10.9.9.9:1", cwd=pool.repo, env=pool.stack.env,
                  check=False)  # fmt: skip
    assert unknown.returncode == 1 and "has no work queue 10.9.9.9: on each of those hosts" in unknown.stderr
    started = run("agegender", "flow", "multiworker", *workers, cwd=pool.repo, env=pool.stack.env)
    chief_id, member_id = re.findall(r"\(([0-9a-f-]{36})\) on work queue", started.stderr)
    with api(pool):
        chief, member = wait_final(pool, chief_id), wait_final(pool, member_id)
    assert chief.state.is_completed() and chief.state.message.startswith("trained"), chief.state.message
    assert member.state.is_completed(), member.state.message
    assert member.state.message.startswith(f"trained as worker 1 of 2; the chief {workers[0]}"), member.state.message
    assert (pool.ran_on(chief.id), pool.ran_on(member.id)) == (["worker1"], ["worker2"]), "each on its own host"
    with api(pool):
        assert run_logs(pool, member.id, "as worker 1 of 2"), "the member's `agegender train` joined the cluster"
    # The chief alone tracked the training in MLflow: one parent run, its candidate trained by two workers.
    (parent,) = [r for r in runs_of(pool, chief.id) if r.data.tags.get("role") == "parent"]
    assert parent.data.tags["git_commit"] == deployed
    (child,) = children_of(pool, parent.info.run_id)
    assert child.data.params["distribute.workers"] == "2"
    assert not runs_of(pool, member.id), "a non-chief worker tracks nothing"
    assert len(mlflow_client(pool).search_model_versions("name = 'agegender'")) == versions + 1
    assert_registry_consistent(pool)
