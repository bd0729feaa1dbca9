"""Scale out over Dask (README: Scale out): the scheduler and two workers on three test hosts
(network namespaces); the `agegender` stages run in the tests' own namespace, as a
user's machine would, with scale.dask_scheduler naming the scheduler.

- Face detection in shards on both workers gives the crops and split of single-process preprocessing.
- A worker killed mid-preprocessing: its shards are recomputed on the other, the result unchanged.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import cloudpickle
import numpy as np
import pytest

from tests.conftest import (
    BIN,
    TINY,
    copy_utk_subset,
    make_project_repo,
    run,
    set_params,
    tail,
)
from tests.hosts import Host, network_hosts

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import the tests' modules

IMAGES = 160  # real utkface-part1 chips (plus the two malformed ones validation quarantines)
DASK_PORT = 8786  # each host has its own ports: no clash with other tests


class Cluster:
    """The test hosts and what runs on them."""

    def __init__(self, hosts: dict[str, Host], logs: Path) -> None:
        self.hosts, self.logs = hosts, logs
        self.scheduler = f"tcp://{hosts['scheduler'].address}:{DASK_PORT}"

    def start_worker(self, name: str) -> subprocess.Popen:
        # One thread per worker process, as README says: one detector, one candidate at a time.
        args = [BIN / "dask", "worker", self.scheduler, "--nthreads", "1", "--name", name, "--no-dashboard"]
        return self.hosts[name].start(args, cwd=self.logs, env=dask_env(self.logs), log=self.logs / f"{name}.log")

    def client(self):
        from distributed import Client

        return Client(self.scheduler, timeout=30, set_as_default=False)

    def wait_for_workers(self, count: int) -> None:
        with self.client() as client:
            client.wait_for_workers(count, timeout=120)


def dask_env(folder: Path) -> dict:
    """The environment of a Dask process: its scratch files in the test's folder (a killed process leaves them)."""
    return {**os.environ, "DASK_TEMPORARY_DIRECTORY": str(folder)}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    logs = tmp_path_factory.mktemp("cluster")
    with network_hosts(["scheduler", "worker1", "worker2"]) as hosts:
        c = Cluster(hosts, logs)
        scheduler = hosts["scheduler"].start(
            [BIN / "dask", "scheduler", "--host", hosts["scheduler"].address, "--port", DASK_PORT, "--no-dashboard"],
            cwd=logs,
            env=dask_env(logs),
            log=logs / "scheduler.log",
        )
        c.start_worker("worker1"), c.start_worker("worker2")
        c.wait_for_workers(2)
        assert scheduler.poll() is None, tail(logs / "scheduler.log")
        yield c
    # network_hosts killed every process in the hosts and removed them, also on failure


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A project with the chips ingested and validated, and their single-process preprocessing kept aside."""
    base = tmp_path_factory.mktemp("scale-out")
    repo = make_project_repo(base)
    set_params(repo, TINY)
    run("agegender", "data", "ingest", str(copy_utk_subset(base / "utk", IMAGES)), cwd=repo)
    run("agegender", "validate", cwd=repo)
    run("agegender", "preprocess", cwd=repo)  # scale.dask_scheduler: null, the default
    shutil.copytree(repo / "artifacts/prepared", base / "single-process")
    return repo


def single_process(repo: Path) -> Path:
    return repo.parent / "single-process"


def assert_same_preprocessing(prepared: Path, expected: Path) -> None:
    """Same crops byte for byte, same labels, same split; stats equal but for the speed."""
    for split in ("train", "val", "test"):
        with np.load(prepared / f"{split}.npz") as got, np.load(expected / f"{split}.npz") as want:
            assert got.files == want.files
            for key in want.files:
                assert got[key].dtype == want[key].dtype and np.array_equal(got[key], want[key]), (split, key)
    assert (prepared / "split.csv").read_bytes() == (expected / "split.csv").read_bytes()
    got, want = (json.loads((folder / "stats.json").read_text()) for folder in (prepared, expected))
    assert {**got, "images_per_s": 0} == {**want, "images_per_s": 0}


def detector_use(cluster: Cluster) -> dict[str, tuple[int, int]]:
    """Per worker: (detectors built, shards cropped) since the worker started."""
    with cluster.client() as client:
        return client.run(worker_use)


def worker_use() -> tuple[int, int]:
    from agegender.cluster import worker_detector

    info = worker_detector.cache_info()
    return info.misses, info.misses + info.hits


@pytest.mark.timeout(600)
def test_preprocessing_sharded_over_two_workers_equals_single_process(cluster: Cluster, repo: Path):
    before = detector_use(cluster)
    set_params(repo, {"scale": {"dask_scheduler": cluster.scheduler, "shard_images": 20}})
    try:
        result = run("agegender", "preprocess", cwd=repo)
    finally:
        set_params(repo, {"scale": {"dask_scheduler": None}})
    assert "Dask cluster" in result.stderr + result.stdout
    assert_same_preprocessing(repo / "artifacts/prepared", single_process(repo))
    after = detector_use(cluster)
    shards = {worker: after[worker][1] - before.get(worker, (0, 0))[1] for worker in after}
    assert sorted(shards.values())[0] > 0, f"one worker got no shard: {shards}"
    rows = len((repo / "artifacts/prepared/split.csv").read_text().splitlines()) - 1
    assert sum(shards.values()) == math.ceil(rows / 20)
    assert all(built == 1 for built, _ in after.values()), f"a detector per worker process, built once: {after}"


@pytest.mark.timeout(600)
def test_worker_killed_mid_preprocessing_its_shards_are_recomputed(cluster: Cluster, repo: Path, tmp_path: Path):
    before = detector_use(cluster)
    worker1 = next(w for w in before if cluster.hosts["worker1"].address in w)
    set_params(repo, {"scale": {"dask_scheduler": cluster.scheduler, "shard_images": 2}})
    log = tmp_path / "preprocess.log"
    try:
        with log.open("w") as handle:
            stage = subprocess.Popen(
                [BIN / "agegender", "preprocess"], cwd=repo, stdout=handle, stderr=subprocess.STDOUT
            )
        try:
            # Kill worker1 (nanny and worker, SIGKILL: a crashed host) once it has cropped a few shards.
            with cluster.client() as client:
                deadline = time.monotonic() + 300
                while client.run(worker_use, workers=[worker1])[worker1][1] - before[worker1][1] < 2:
                    assert stage.poll() is None and time.monotonic() < deadline, tail(log)
                    time.sleep(0.05)
                cluster.hosts["worker1"].kill_all()
            assert stage.poll() is None, "the stage finished before the kill: nothing was left to recompute"
            assert stage.wait(timeout=300) == 0, tail(log)
        finally:
            with contextlib.suppress(ProcessLookupError):
                stage.kill()
        assert_same_preprocessing(repo / "artifacts/prepared", single_process(repo))
        assert worker1 not in detector_use(cluster)  # the scheduler saw worker1 go
    finally:
        set_params(repo, {"scale": {"dask_scheduler": None}})
        cluster.start_worker("worker1")  # for any test after this one
        cluster.wait_for_workers(2)
