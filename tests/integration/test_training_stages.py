"""`dvc repro` through training on real UTKFace images, with a tiny model, checked in MLflow.

The repository is trained once per module; each test works on its own copy.
"""

import hashlib
import json

import numpy as np
import pandas as pd
import pytest
import yaml

from tests.conftest import TEMPLATE_CHIPS, copy_repo, run, set_params

pytestmark = pytest.mark.slow


@pytest.fixture
def trained_repo(trained_template, tmp_path):
    """A copy of the session's trained repository."""
    return copy_repo(trained_template, tmp_path / "repo")


def mlflow_client(repo):
    import mlflow

    uri = f"sqlite:///{repo / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    return mlflow.MlflowClient(uri)


def test_repro_trains_and_tracks_in_mlflow(trained_repo):
    import mlflow

    stats = json.loads((trained_repo / "artifacts/prepared/stats.json").read_text())
    assert stats["rows"] == TEMPLATE_CHIPS and stats["detector_hit_rate"] > 0.5
    card = json.loads((trained_repo / "artifacts/model/card.json").read_text())
    assert card["trained_on"] == "real" and card["split_sizes"]["train"] == stats["splits"]["train"]["count"]

    client = mlflow_client(trained_repo)
    experiment = client.get_experiment_by_name("agegender")
    runs = client.search_runs([experiment.experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("role") == "parent"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.data.tags["candidate"] for r in children) == ["small", "wider"]
    candidates = json.loads((trained_repo / "artifacts/model/candidates.json").read_text())
    (winner,) = [c for c in candidates if c["winner"]]
    assert winner["val_age_mae"] == min(c["val_age_mae"] for c in candidates)
    assert parent.data.tags["winner_run_id"] == winner["run_id"]
    run_info = client.get_run(winner["run_id"])
    assert run_info.info.status == "FINISHED"
    assert run_info.data.params["train.width"] == ("8" if winner["name"] == "small" else "12")
    assert run_info.data.params["preprocess.image_size"] == "32"
    data_md5 = yaml.safe_load((trained_repo / "data.dvc").read_text())["outs"][0]["md5"].removesuffix(".dir")
    assert run_info.data.tags["data_version"] == data_md5
    assert run_info.data.tags["git_commit"] != "unknown"
    assert run_info.data.tags["cpu_kernels"] == "default"
    history = client.get_metric_history(run_info.info.run_id, "val_age_mae")
    # One point per epoch (steps 0, 1), then the restored best model's score.
    assert [m.step for m in sorted(history, key=lambda m: m.step)] == [0, 1, 2]
    assert {"val_gender_accuracy", "train_images_per_s", "train_seconds"} <= set(run_info.data.metrics)

    # The run's model is the whole predictor: image bytes in, the service's answer out.
    model = mlflow.pyfunc.load_model(f"runs:/{run_info.info.run_id}/model")
    files = sorted((trained_repo / "data/images").iterdir())[:3]
    answers = model.predict(pd.DataFrame({"image": [f.read_bytes() for f in files]}))
    assert len(answers) == 3 and all(a["width"] == 200 and a["height"] == 200 for a in answers)
    faces = [face for a in answers for face in a["faces"]]
    assert faces and all(0 <= face["age"] <= 120 and face["gender"] in ("female", "male") for face in faces)


def test_repro_reruns_only_what_changed(trained_repo):
    again = run("dvc", "repro", "train", cwd=trained_repo)
    assert "Running stage" not in again.stdout

    set_params(trained_repo, {"train": {"learning_rate": 0.001}})
    planned = run("dvc", "repro", "--dry", "train", cwd=trained_repo)
    assert "Running stage 'train'" in planned.stdout
    assert "Running stage 'preprocess'" not in planned.stdout and "Running stage 'validate'" not in planned.stdout


def test_dvc_experiments_metrics_and_plots(trained_repo):
    run("git", "add", "-A", cwd=trained_repo)
    run("git", "commit", "-qm", "baseline", cwd=trained_repo)
    # Up to train, the stage the changed params touch (evaluate and register are the pipeline tests' subject).
    run("dvc", "exp", "run", "train", "-S", "train.learning_rate=0.01", "-S", "train.epochs=1", cwd=trained_repo)
    shown = run("dvc", "exp", "show", "--json", cwd=trained_repo).stdout
    assert "0.01" in shown
    metrics = run("dvc", "metrics", "show", "--json", cwd=trained_repo).stdout
    assert "val_age_mae" in metrics
    plots = run("dvc", "plots", "show", "--json", cwd=trained_repo).stdout
    assert "val_age_mae" in plots


def test_bad_training_input_replaces_no_model(trained_repo):
    model = trained_repo / "artifacts/model"
    before = {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in model.iterdir()}

    # The input checks themselves are unit tests (tests/unit/test_training.py); here, one that
    # only shows in training: a corrupt label cache makes the loss nan.
    cache = trained_repo / "artifacts/prepared/train.npz"
    split = dict(np.load(cache))
    split["age"][:] = np.nan  # a corrupt label cache: the loss cannot be finite
    np.savez(cache, **split)
    nan = run("agegender", "train", cwd=trained_repo, check=False)
    assert nan.returncode == 1 and "loss became nan" in nan.stderr and "No model was written" in nan.stderr
    assert {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in model.iterdir()} == before
    assert sorted(p.name for p in model.parent.iterdir()) == ["model", "prepared", "validation"], "no staging left"
