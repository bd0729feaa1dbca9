"""Multi-worker training (tf.distribute.MultiWorkerMirroredStrategy) on two test hosts.

`agegender train` runs on a chief and a worker host (network namespaces, each with its own copy of
the trained template's prepared real chips) with TF_CONFIG naming both hosts' bridge addresses,
as a Prefect deployment's job variables would set it. They train one model together: the chief
tracks it in MLflow and writes artifacts/model, the worker writes nothing. Its validation age
MAE is within 0.3 years of one worker's on the same data, epochs and global batch. A worker whose
peers never start gives up after scale.join_seconds, having written nothing.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import mlflow
import pytest

from agegender.distributed import tf_config
from tests.conftest import BIN, copy_repo, free_port, run, set_params, tail
from tests.hosts import network_hosts

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

PORT = 12345  # each host has its own network stack, so one port serves both
# One candidate, a few more epochs than the template's two: past the first epochs' large swings.
SETTINGS = {"train": {"epochs": 4, "patience": 4}, "candidates": [{"name": "default", "train": {}}]}


def files_of(repo: Path) -> dict[str, float]:
    """Every file under repo (not following the src symlink) with its modification time."""
    found = {}
    for folder, _, names in os.walk(repo):
        for name in names:
            path = Path(folder) / name
            found[str(path.relative_to(repo))] = path.lstat().st_mtime
    return found


def val_age_mae(repo: Path) -> float:
    return json.loads((repo / "artifacts" / "model" / "metrics.json").read_text())["val_age_mae"]


@pytest.mark.timeout(900)
def test_two_hosts_train_one_model_as_well_as_one_worker(trained_template: Path, tmp_path: Path):
    repos = {}
    for name in ("single", "chief", "worker"):
        repos[name] = copy_repo(trained_template, tmp_path / name)
        set_params(repos[name], SETTINGS)
    before = files_of(repos["worker"])

    run(str(BIN / "agegender"), "train", cwd=repos["single"])

    with network_hosts(["chief", "worker"]) as hosts:
        workers = [f"{hosts[name].address}:{PORT}" for name in ("chief", "worker")]
        processes, logs = {}, {}
        for index, name in enumerate(("chief", "worker")):
            logs[name] = tmp_path / f"{name}.log"
            env = {**os.environ, "TF_CONFIG": tf_config(workers, index)}
            processes[name] = hosts[name].start([BIN / "agegender", "train"], cwd=repos[name], env=env, log=logs[name])
        for name, process in processes.items():
            try:
                code = process.wait(timeout=600)
            except subprocess.TimeoutExpired:
                code = "no exit within 600 s"
            assert code == 0, f"{name}: {code}\n{tail(logs[name])}"

    assert "as worker 1 of 2" in logs["worker"].read_text()
    assert files_of(repos["worker"]) == before, "a non-chief worker wrote into its project"

    chief = repos["chief"]
    [candidate] = json.loads((chief / "artifacts" / "model" / "candidates.json").read_text())
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{chief / 'mlflow.db'}")
    params = client.get_run(candidate["run_id"]).data.params
    assert params["distribute.workers"] == "2"
    single_store = mlflow.MlflowClient(tracking_uri=f"sqlite:///{repos['single'] / 'mlflow.db'}")
    [single_run] = single_store.search_runs(
        [single_store.get_experiment_by_name("agegender").experiment_id], "tags.candidate = 'default'"
    )
    assert single_run.data.params["distribute.workers"] == "1"

    multi, single = val_age_mae(chief), val_age_mae(repos["single"])
    print(f"val age MAE: two workers {multi}, one worker {single}")
    assert abs(multi - single) <= 0.3


@pytest.mark.timeout(300)
def test_a_worker_whose_peers_never_start_gives_up_and_writes_nothing(trained_template: Path, tmp_path: Path):
    repo = copy_repo(trained_template, tmp_path / "repo")
    set_params(repo, {"scale": {"join_seconds": 20}})
    before = files_of(repo)
    workers = [f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"]  # nothing will listen on the second
    env = {**os.environ, "TF_CONFIG": tf_config(workers, 0)}
    alone = run(str(BIN / "agegender"), "train", cwd=repo, env=env, check=False)
    assert alone.returncode != 0, alone.stderr[-2000:]
    assert f"waited scale.join_seconds = 20 s for the other workers ({workers[1]})" in alone.stderr, alone.stderr
    assert files_of(repo) == before, "nothing tracked in MLflow or written"
