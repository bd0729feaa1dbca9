"""`dvc repro` killed mid-training on real UTKFace images leaves nothing half-written and resumes.

(The whole pipeline to a champion, a worse model that is not promoted, promote and rollback
run once, through the Prefect flow, in tests/e2e/test_flows.py.)"""

import pytest

from tests.conftest import run, set_params
from tests.integration.test_training_stages import TINY

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

LOOSE_GATES = {
    "max_age_mae": 60.0,
    "min_gender_accuracy": 0.0,
    "max_group_gap": 100.0,
    "min_improvement": 0.5,
    "max_gender_accuracy_drop": 0.0,
}


def test_a_run_killed_mid_training_leaves_no_model_and_resumes_from_the_cache(project_repo, utk_subset):
    import os
    import signal
    import subprocess
    import time

    import mlflow

    set_params(project_repo, {**TINY, "train": {**TINY["train"], "epochs": 200, "patience": 200}, "gates": LOOSE_GATES})
    run("agegender", "data", "ingest", str(utk_subset), cwd=project_repo)
    repro = subprocess.Popen(
        ["dvc", "repro"], cwd=project_repo, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    client = mlflow.MlflowClient(f"sqlite:///{project_repo / 'mlflow.db'}")
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        time.sleep(2)
        experiment = (project_repo / "mlflow.db").exists() and client.get_experiment_by_name("agegender")
        if experiment and any(
            r.info.status == "RUNNING" and r.data.tags.get("candidate")
            for r in client.search_runs([experiment.experiment_id])
        ):
            break
    else:
        raise AssertionError("training never started")
    time.sleep(5)  # well inside the first epochs
    os.killpg(repro.pid, signal.SIGKILL)
    repro.wait()

    assert not (project_repo / "artifacts/model/model.keras").exists()
    assert client.search_registered_models() == []

    set_params(project_repo, {"train": {**TINY["train"], "epochs": 2}})
    resumed = run("dvc", "repro", cwd=project_repo)
    assert "Stage 'preprocess' didn't change" in resumed.stdout or "Stage 'preprocess' is cached" in resumed.stdout
    assert "Running stage 'train'" in resumed.stdout
    assert not list((project_repo / "artifacts").glob(".model-*")), "the killed run's staging folder was left"
    champion = client.get_model_version_by_alias("agegender", "champion")
    assert str(champion.version) == "1"
