"""The registry against a real MLflow sqlite store: aliases, history, crash recovery.

The models are trivial pyfunc models (no TensorFlow); the store holding them is built
once per module and copied for each test, so every test starts from the same three
logged models and an empty registry.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from datetime import datetime
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.tracking._model_registry import utils as registry_utils
from mlflow.tracking._tracking_service import utils as tracking_utils

from agegender import paths
from agegender.config import Params
from agegender.files import write_json
from agegender.registry import (
    COMPLETE_TAG,
    HISTORY_TAG,
    ChampionInfo,
    RegistrationResult,
    RegistryError,
    champion,
    champion_info,
    champion_uri,
    find_version,
    hash_params,
    list_versions,
    promote,
    register_candidate,
    resolve_version,
    rollback,
    run_register_stage,
)

NAME = "agegender"
FULL = {
    "absolute_pass": True,
    "full_pass": True,
    "has_champion": True,
    "checks": [],
    "summary": "passed all 5 checks",
}
ABSOLUTE_ONLY = {
    "absolute_pass": True,
    "full_pass": False,
    "has_champion": True,
    "checks": [],
    "summary": "failed min_improvement: 0.0 < 0.1",
}
FAILED = {
    "absolute_pass": False,
    "full_pass": False,
    "has_champion": True,
    "checks": [],
    "summary": "failed max_age_mae: 12.0 > 10.0",
}


class Echo(mlflow.pyfunc.PythonModel):
    def predict(self, context, model_input: list[int], params=None) -> list[int]:
        return model_input


class Killed(Exception):
    """Stands in for the process dying."""


@contextmanager
def mlflow_store(uri: str) -> Iterator[MlflowClient]:
    """Point MLflow's process-wide tracking and registry URIs at `uri`, then restore them.

    set_tracking_uri / set_registry_uri write module globals and environment variables;
    recording all four first makes the restore exact, unset ones included.
    """
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tracking_utils, "_tracking_uri", tracking_utils._tracking_uri)
        patch.setattr(registry_utils, "_registry_uri", registry_utils._registry_uri)
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        patch.setenv("MLFLOW_REGISTRY_URI", uri)
        mlflow.set_tracking_uri(uri)
        mlflow.set_registry_uri(uri)
        yield MlflowClient(tracking_uri=uri, registry_uri=uri)


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """A sqlite store with three runs that each logged a model named "model"."""
    root = tmp_path_factory.mktemp("mlflow")
    db = root / "template.db"
    with mlflow_store(f"sqlite:///{db}") as client:
        experiment = client.create_experiment("registry", artifact_location=(root / "art").as_uri())
        run_ids = []
        for _ in range(3):
            with mlflow.start_run(experiment_id=experiment) as run:
                mlflow.pyfunc.log_model(name="model", python_model=Echo(), pip_requirements=["mlflow"])
            run_ids.append(run.info.run_id)
    return db, run_ids


@pytest.fixture
def runs(template: tuple[Path, list[str]]) -> list[str]:
    return template[1]


@pytest.fixture
def client(template: tuple[Path, list[str]], tmp_path: Path) -> Iterator[MlflowClient]:
    """A private copy of the template store in tmp_path, set as MLflow's store for the test."""
    db = tmp_path / "mlflow.db"
    # the backup API copies consistently even while MLflow's cached engine holds the template
    with closing(sqlite3.connect(template[0])) as source, closing(sqlite3.connect(db)) as copy:
        source.backup(copy)
    with mlflow_store(f"sqlite:///{db}") as store_client:
        yield store_client


def register(
    client: MlflowClient,
    run_id: str,
    decision: dict,
    *,
    model_uri: str | None = None,
    before_alias: Callable[[], None] | None = None,
) -> RegistrationResult:
    return register_candidate(
        client,
        model_name=NAME,
        model_uri=model_uri or f"runs:/{run_id}/model",
        run_id=run_id,
        tags={
            "data_version": f"data-{run_id[:6]}",
            "git_commit": "0123abc",
            "params_hash": "feedbeef",
            "test_age_mae": "5.25",
            "test_gender_accuracy": "0.91",
        },
        decision=decision,
        before_alias=before_alias,
    )


def aliases(client: MlflowClient) -> dict[str, int]:
    return {alias: int(v) for alias, v in client.get_registered_model(NAME).aliases.items()}


def test_first_full_pass_becomes_champion_and_challenger(client, runs):
    result = register(client, runs[0], FULL)

    assert (result.version, result.aliases) == (1, ["challenger", "champion"])
    assert (result.champion, result.previous_champion) == (1, None)
    assert "Version 1 is the first champion" in result.summary
    assert json.loads(json.dumps(result.as_dict()))["summary"] == result.summary
    assert aliases(client) == {"champion": 1, "challenger": 1}
    version = champion(client, NAME)
    assert version is not None and str(version.version) == "1"
    assert version.status == "READY" and version.run_id == runs[0]
    assert version.tags["model_id"].startswith("m-")
    assert version.tags | {"model_id": "-"} == {
        "data_version": f"data-{runs[0][:6]}",
        "git_commit": "0123abc",
        "params_hash": "feedbeef",
        "test_age_mae": "5.25",
        "test_gender_accuracy": "0.91",
        "run_id": runs[0],
        "model_id": "-",
        "gate_summary": "passed all 5 checks",
        "absolute_pass": "true",
        "full_pass": "true",
        COMPLETE_TAG: "true",
    }
    # the alias URI loads the logged model's files
    assert mlflow.pyfunc.load_model(champion_uri(NAME)).predict([1, 2]) == [1, 2]


def test_absolute_pass_moves_challenger_only(client, runs):
    register(client, runs[0], FULL)
    result = register(client, runs[1], ABSOLUTE_ONLY)

    assert (result.version, result.aliases) == (2, ["challenger"])
    assert result.champion == result.previous_champion == 1
    assert "Champion stays at version 1" in result.summary
    assert aliases(client) == {"champion": 1, "challenger": 2}


def test_failed_gate_registers_and_tags_but_moves_no_alias(client, runs):
    first = register(client, runs[0], FAILED)
    assert (first.version, first.aliases, first.champion) == (1, [], None)
    assert "no alias (the gate failed)" in first.summary and "No champion yet" in first.summary
    assert champion(client, NAME) is None

    register(client, runs[1], FULL)
    third = register(client, runs[2], FAILED)

    assert aliases(client) == {"champion": 2, "challenger": 2}
    tags = client.get_model_version(NAME, str(third.version)).tags
    assert tags["absolute_pass"] == tags["full_pass"] == "false"
    assert tags["gate_summary"] == "failed max_age_mae: 12.0 > 10.0"
    assert tags[COMPLETE_TAG] == "true"


def test_full_pass_records_previous_champion_for_rollback(client, runs):
    register(client, runs[0], FULL)
    result = register(client, runs[1], FULL)
    assert "Champion moved from version 1 to 2" in result.summary

    restored = rollback(client, NAME)

    assert str(restored.version) == "1"
    assert aliases(client) == {"champion": 1, "challenger": 2}
    with pytest.raises(RegistryError, match="no previous champion"):
        rollback(client, NAME)


def test_promote_then_rollbacks_walk_back_through_history(client, runs):
    register(client, runs[0], FULL)
    register(client, runs[1], FAILED)
    register(client, runs[2], ABSOLUTE_ONLY)

    # a hand promotion may pick a version that failed its gate
    assert str(promote(client, NAME, 2).version) == "2"
    promote(client, NAME, "3")
    promote(client, NAME, 3)  # already champion: history unchanged
    assert aliases(client) == {"champion": 3, "challenger": 3}

    assert str(rollback(client, NAME).version) == "2"
    assert str(rollback(client, NAME).version) == "1"
    with pytest.raises(RegistryError, match=r"no previous champion .*current champion: 1"):
        rollback(client, NAME)
    assert aliases(client) == {"champion": 1, "challenger": 3}


def test_rollback_without_any_champion_errors(client):
    with pytest.raises(RegistryError, match=r"agegender has no previous champion .*none"):
        rollback(client, NAME)


def test_promote_refuses_a_version_that_does_not_exist(client, runs):
    register(client, runs[0], FULL)

    with pytest.raises(RegistryError, match="agegender version 99 does not exist"):
        promote(client, NAME, 99)
    with pytest.raises(RegistryError, match="other version 1 does not exist"):
        promote(client, "other", 1)
    assert aliases(client) == {"champion": 1, "challenger": 1}


def test_crash_before_aliasing_keeps_champion_and_is_cleaned_next_time(client, runs):
    register(client, runs[0], FULL)

    def die() -> None:
        raise Killed

    with pytest.raises(Killed):
        register(client, runs[1], FULL, before_alias=die)

    # version 2 exists, READY and tagged, but unfinished: nothing points at it
    assert aliases(client) == {"champion": 1, "challenger": 1}
    orphan = client.get_model_version(NAME, "2")
    assert orphan.status == "READY" and orphan.tags["full_pass"] == "true"
    assert COMPLETE_TAG not in orphan.tags
    assert [row["version"] for row in list_versions(client, NAME)] == [1]
    with pytest.raises(RegistryError, match="version 2 never finished registering"):
        promote(client, NAME, 2)

    result = register(client, runs[2], FULL)

    assert (result.version, result.removed, result.finished) == (3, [2], [])
    assert "Removed incomplete versions [2]" in result.summary
    with pytest.raises(MlflowException, match="not found"):
        client.get_model_version(NAME, "2")
    assert aliases(client) == {"champion": 3, "challenger": 3}
    assert [row["version"] for row in list_versions(client, NAME)] == [3, 1]
    assert str(rollback(client, NAME).version) == "1"


def test_crash_while_setting_aliases_is_finished_not_deleted(client, runs):
    register(client, runs[0], FULL)

    def challenger_set_then_die() -> None:
        # as if the process died right after the first alias write of version 2
        client.set_registered_model_alias(NAME, "challenger", "2")
        raise Killed

    with pytest.raises(Killed):
        register(client, runs[1], FULL, before_alias=challenger_set_then_die)
    assert aliases(client) == {"champion": 1, "challenger": 2}
    # READY and fully tagged before any alias moved, so it is listed (and servable)
    assert [row["version"] for row in list_versions(client, NAME)] == [2, 1]

    result = register(client, runs[2], ABSOLUTE_ONLY)

    # deleting version 2 would drop its alias; its recorded full pass is applied instead
    assert (result.finished, result.removed) == ([2], [])
    assert "Finished interrupted registrations of versions [2]" in result.summary
    assert client.get_model_version(NAME, "2").tags[COMPLETE_TAG] == "true"
    assert aliases(client) == {"champion": 2, "challenger": 3}
    assert str(rollback(client, NAME).version) == "1"


def test_interrupted_champion_moves_leave_history_consistent(client, runs):
    register(client, runs[0], FULL)
    register(client, runs[1], FULL)
    # a move away from champion 2 that died after pushing 2, before moving the alias
    client.set_registered_model_tag(NAME, HISTORY_TAG, json.dumps([1, 2]))

    assert str(rollback(client, NAME).version) == "1"

    # a rollback to 1 that died after moving the alias, before popping 1
    client.set_registered_model_tag(NAME, HISTORY_TAG, json.dumps([1]))
    with pytest.raises(RegistryError, match="no previous champion"):
        rollback(client, NAME)
    promote(client, NAME, 2)
    assert client.get_registered_model(NAME).tags[HISTORY_TAG] == "[1]"


def test_list_versions_reports_provenance_metrics_and_gate(client, runs):
    model_id = client.get_run(runs[1]).outputs.model_outputs[0].model_id
    register(client, runs[0], FULL)
    register(client, runs[1], FAILED, model_uri=f"models:/{model_id}")

    newest, oldest = list_versions(client, NAME)

    assert newest == {
        "version": 2,
        "aliases": [],
        "run_id": runs[1],
        "data_version": f"data-{runs[1][:6]}",
        "git_commit": "0123abc",
        "metrics": {"age_mae": 5.25, "gender_accuracy": 0.91},
        "absolute_pass": False,
        "full_pass": False,
        "gate_summary": "failed max_age_mae: 12.0 > 10.0",
        "created": newest["created"],
    }
    assert (oldest["version"], oldest["aliases"]) == (1, ["challenger", "champion"])
    assert oldest["absolute_pass"] and oldest["full_pass"]
    assert datetime.fromisoformat(oldest["created"]).tzinfo is not None
    assert list_versions(client, "unknown") == []


def test_register_rejects_inconsistent_input_before_writing(client, runs):
    model_id = client.get_run(runs[0]).outputs.model_outputs[0].model_id
    with pytest.raises(ValueError, match=f"logged by run {runs[0]}, not {runs[1]}"):
        register(client, runs[1], FULL, model_uri=f"models:/{model_id}")
    with pytest.raises(ValueError, match="0 logged models named 'other'"):
        register(client, runs[0], FULL, model_uri=f"runs:/{runs[0]}/other")
    with pytest.raises(ValueError, match="full_pass without absolute_pass"):
        register(client, runs[0], {**FAILED, "full_pass": True})
    with pytest.raises(ValueError, match=r"\['full_pass'\] are written by the registry"):
        register_candidate(
            client,
            model_name=NAME,
            model_uri=f"runs:/{runs[0]}/model",
            run_id=runs[0],
            tags={"full_pass": "true"},
            decision=FULL,
        )
    assert list_versions(client, NAME) == []
    assert champion(client, NAME) is None


def test_champion_uri_names_the_alias():
    assert champion_uri("agegender") == "models:/agegender@champion"
    assert champion_uri() == "models:/agegender@champion"


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("models:/agegender@champion", 2),
        ("models:/agegender@challenger", 3),
        ("models:/agegender/1", 1),
        ("models:/agegender@nobody", None),
        ("models:/agegender/9", None),
        ("models:/unknown@champion", None),
        ("models:/unknown/1", None),
    ],
)
def test_find_version_resolves_aliases_and_numbers(client, runs, uri, expected):
    register(client, runs[0], FULL)
    register(client, runs[1], FULL)
    register(client, runs[2], ABSOLUTE_ONLY)

    found = find_version(client, uri)
    assert (None if found is None else int(found.version)) == expected
    if expected is None:
        with pytest.raises(RegistryError, match="no such model version"):
            resolve_version(client, uri)
    else:
        assert found.name == NAME and int(resolve_version(client, uri).version) == expected


@pytest.mark.parametrize("uri", ["runs:/abc/model", "agegender@champion", "models:/agegender", "models:/agegender/x"])
def test_find_version_refuses_other_uris(client, uri):
    with pytest.raises(RegistryError, match="expected models:/NAME@ALIAS or models:/NAME/VERSION"):
        find_version(client, uri)


def test_champion_info_carries_the_data_version(client, runs):
    assert champion_info(client, NAME) is None
    register(client, runs[0], FULL)
    assert champion_info(client, NAME) == ChampionInfo(version=1, run_id=runs[0], data_version=f"data-{runs[0][:6]}")


def test_champion_info_falls_back_to_the_runs_data_version(client, runs):
    register(client, runs[0], FULL)
    client.delete_model_version_tag(NAME, "1", "data_version")
    client.set_tag(runs[0], "data_version", "from-the-run")
    assert champion_info(client, NAME).data_version == "from-the-run"


def test_register_stage_registers_what_evaluate_decided(client, runs, tmp_path):
    root = tmp_path / "project"
    card = {
        "mlflow_run_id": runs[0],
        "data_version": "abc123",
        "model": "agegender (compact, dldl age head, 64px)",
        "trained_on": "real",
        "intended_use": "Research only.",
    }
    write_json(root / paths.MODEL / paths.MODEL_CARD, card)
    write_json(root / paths.EVAL / paths.GATE, FULL)
    by_race = {
        "White": {"n_samples": 20, "age_mae": 4.5, "gender_accuracy": 0.95},
        "Black": {"n_samples": 10, "age_mae": 6.75, "gender_accuracy": 0.8},
    }
    metrics = {"age_mae": 5.25, "n_samples": 30, "gender_accuracy": 0.9, "by_race": by_race}
    metrics |= {"age_mae_group_gap": 2.25, "gender_accuracy_group_gap": 0.15}
    write_json(root / paths.EVAL / paths.TEST_METRICS, metrics)

    result = run_register_stage(root, Params(), tracking_uri=mlflow.get_tracking_uri())

    assert (result.model_name, result.version, result.champion) == (NAME, 1, 1)
    assert json.loads((root / paths.REGISTRY / paths.REGISTRATION).read_text()) == result.as_dict()
    tags = client.get_model_version(NAME, "1").tags
    assert tags["data_version"] == "abc123" and tags["git_commit"] == "unknown"
    assert (tags["test_age_mae"], tags["test_n_samples"]) == ("5.25", "30") and "test_by_race" not in tags
    assert tags["params_hash"] == hash_params(Params()) != hash_params(Params(registry={"model_name": "other"}))
    # The card and the per-group test metrics travel with the version: its description and card/ files.
    description = client.get_model_version(NAME, "1").description
    assert "Research only." in description and "| Black | 10 | 6.75 | 0.8 |" in description
    assert "age MAE 2.25 years (gate: at most 10)" in description
    attached = mlflow.artifacts.download_artifacts(f"models:/{NAME}/1")
    assert json.loads((Path(attached) / "card" / paths.MODEL_CARD).read_text()) == card
    assert json.loads((Path(attached) / "card" / paths.TEST_METRICS).read_text())["by_race"] == by_race
