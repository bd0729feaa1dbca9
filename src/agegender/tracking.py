"""MLflow set-up: one experiment for the project, one store for every process.

The default store is `sqlite:///mlflow.db` with artifacts in `mlartifacts/`, both in
the project and resolved to absolute paths once, so the CLI, Prefect workers and the
service all see the same runs and models. A remote tracking server works unchanged:
pass its URI (the CLI reads MLFLOW_TRACKING_URI).
"""

from __future__ import annotations

import subprocess
from collections.abc import Collection
from pathlib import Path

EXPERIMENT = "agegender"


def resolve_tracking_uri(project_root: Path, uri: str | None) -> str:
    """The tracking URI with a relative sqlite path made absolute against the project."""
    uri = uri or "sqlite:///mlflow.db"
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        return prefix + str((project_root / uri.removeprefix(prefix)).resolve())
    return uri


def configure_tracking(project_root: Path, uri: str | None) -> str:
    """Point MLflow at the store and select the project's experiment; returns the URI used."""
    import mlflow

    uri = resolve_tracking_uri(project_root, uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    if mlflow.get_experiment_by_name(EXPERIMENT) is None:
        # A local store keeps artifacts in the project; a server decides for itself.
        local = uri.startswith(("sqlite:", "file:")) or "://" not in uri
        location = (project_root / "mlartifacts").resolve().as_uri() if local else None
        mlflow.create_experiment(EXPERIMENT, artifact_location=location)
    mlflow.set_experiment(EXPERIMENT)
    return uri


def git_commit(project_root: Path) -> str:
    """HEAD's commit, with '-dirty' when tracked files have uncommitted changes; 'unknown' outside git."""

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=project_root, capture_output=True, text=True).stdout.strip()

    commit = git("rev-parse", "HEAD")
    if not commit:
        return "unknown"
    return commit + ("-dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


def flatten(params: dict, prefix: str = "") -> dict[str, str]:
    """{'train': {'augment': {'flip': True}}} -> {'train.augment.flip': 'True'} for mlflow.log_params."""
    flat = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, prefix=f"{name}."))
        else:
            flat[name] = str(value)
    return flat


def end_dead_runs(filter_string: str, *, alive: Collection[str] = ()) -> list[str]:
    """End as KILLED the runs still RUNNING that match filter_string, except those in `alive`.

    For runs whose process died (a crashed flow attempt's stages, a lost Dask worker's candidate):
    MLflow cannot tell, and the UI would show them running forever. Returns the ended run ids.
    """
    import mlflow

    found = mlflow.search_runs(
        search_all_experiments=True,
        filter_string=f"{filter_string} and attributes.status = 'RUNNING'",
        output_format="list",
    )
    ended = [run.info.run_id for run in found if run.info.run_id not in alive]
    for run_id in ended:
        mlflow.MlflowClient().set_terminated(run_id, status="KILLED")
    return ended
