"""The whole pipeline on real UTKFace images: dvc repro to a registered champion, then a worse model."""

import json

import pytest
import yaml

from tests.conftest import run
from tests.integration.test_training_stages import TINY, set_params

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
