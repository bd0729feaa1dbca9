"""`dvc repro` killed mid-training on real UTKFace images leaves no model and resumes from DVC's cache.

(The whole pipeline to a champion, a worse model that is not promoted, promote and rollback
run once, through the Prefect flow, in tests/e2e/test_flows.py.)"""

import os
import signal
import subprocess
import time

import pytest

from tests.conftest import OPEN_GATES, TINY, copy_repo, run, set_params

pytestmark = [pytest.mark.slow, pytest.mark.e2e]


def test_a_run_killed_mid_training_leaves_no_model_and_resumes_from_the_cache(trained_template, tmp_path):
    import mlflow

    repo = copy_repo(trained_template, tmp_path / "repo")
    one = [{"name": "default", "train": {}}]
    set_params(
        repo, {"train": {**TINY["train"], "epochs": 200, "patience": 200}, "candidates": one, "gates": OPEN_GATES}
    )
    repro = subprocess.Popen(
        ["dvc", "repro"], cwd=repo, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    client = mlflow.MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("agegender")
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        time.sleep(2)
        if any(
            r.info.status == "RUNNING" and r.data.tags.get("candidate")
            for r in client.search_runs([experiment.experiment_id])
        ):
            break
    else:
        raise AssertionError("training never started")
    time.sleep(5)  # well inside the first epochs
    os.killpg(repro.pid, signal.SIGKILL)
    repro.wait()

    # DVC removes a stage's outputs before it runs the stage: no model, and no half-written one.
    assert not (repo / "artifacts/model/model.keras").exists()
    assert client.search_registered_models() == []

    set_params(repo, {"train": {**TINY["train"], "epochs": 3}})
    resumed = run("dvc", "repro", cwd=repo)
    assert "Stage 'preprocess' didn't change" in resumed.stdout or "Stage 'preprocess' is cached" in resumed.stdout
    assert "Running stage 'train'" in resumed.stdout
    assert not list((repo / "artifacts").glob(".model-*")), "the killed run's staging folder was left"
    champion = client.get_model_version_by_alias("agegender", "champion")
    assert str(champion.version) == "1"
