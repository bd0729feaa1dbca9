"""The whole pipeline on real UTKFace images: dvc repro to a registered champion, then a worse model."""

import json

import pytest
import yaml

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


def aliases(repo) -> dict[str, str]:
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    found = {}
    for version in client.search_model_versions("name='agegender'"):
        for alias in client.get_model_version("agegender", version.version).aliases:
            found[alias] = str(version.version)
    return found


def test_repro_registers_a_champion_and_never_promotes_a_worse_model(project_repo, utk_subset):
    set_params(project_repo, {**TINY, "train": {**TINY["train"], "epochs": 4}, "gates": LOOSE_GATES})
    run("agegender", "data", "ingest", str(utk_subset), cwd=project_repo)
    run("dvc", "repro", cwd=project_repo)

    gate = json.loads((project_repo / "artifacts/eval/gate.json").read_text())
    assert gate["has_champion"] is False and gate["full_pass"] is True
    metrics = json.loads((project_repo / "artifacts/eval/metrics.json").read_text())
    assert {"age_mae", "age_rmse", "age_cs5", "gender_accuracy", "gender_f1", "gender_roc_auc"} <= set(metrics)
    assert (project_repo / "artifacts/eval/plots/age_scatter.png").exists()
    assert aliases(project_repo) == {"champion": "1", "challenger": "1"}

    # A deliberately worse candidate: one epoch. It is scored against the champion on the same test split.
    set_params(project_repo, {"train": {**TINY["train"], "epochs": 1, "learning_rate": 0.0001}})
    run("dvc", "repro", cwd=project_repo)
    gate = json.loads((project_repo / "artifacts/eval/gate.json").read_text())
    assert gate["has_champion"] is True and gate["full_pass"] is False
    assert aliases(project_repo)["champion"] == "1"

    listed = run("agegender", "registry", "list", cwd=project_repo).stdout
    assert "champion" in listed

    # Nothing changed: nothing re-runs, nothing new is registered.
    again = run("dvc", "repro", cwd=project_repo)
    assert "Running stage" not in again.stdout

    run("agegender", "registry", "promote", "2", cwd=project_repo)
    assert aliases(project_repo)["champion"] == "2"
    run("agegender", "registry", "rollback", cwd=project_repo)
    assert aliases(project_repo)["champion"] == "1"
    nothing = run("agegender", "registry", "promote", "99", cwd=project_repo, check=False)
    assert nothing.returncode == 1 and "99" in nothing.stderr
    data_md5 = yaml.safe_load((project_repo / "data.dvc").read_text())["outs"][0]["md5"].removesuffix(".dir")
    import mlflow

    version = mlflow.MlflowClient(f"sqlite:///{project_repo / 'mlflow.db'}").get_model_version("agegender", "1")
    assert version.tags["data_version"] == data_md5


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
    assert not list((project_repo / "artifacts").glob(".model-*")), "a half-written model folder was left"
    assert client.search_registered_models() == []

    set_params(project_repo, {"train": {**TINY["train"], "epochs": 2}})
    resumed = run("dvc", "repro", cwd=project_repo)
    assert "Stage 'preprocess' didn't change" in resumed.stdout or "Stage 'preprocess' is cached" in resumed.stdout
    assert "Running stage 'train'" in resumed.stdout
    assert aliases(project_repo)["champion"] == "1"
