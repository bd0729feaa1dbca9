"""MLflow runs whose process died are ended, and only those."""

from __future__ import annotations

from pathlib import Path

from agegender.tracking import configure_tracking, end_dead_runs


def test_dead_child_runs_are_ended_as_killed_and_the_others_left_alone(tmp_path: Path):
    import mlflow

    configure_tracking(tmp_path, f"sqlite:///{tmp_path / 'mlflow.db'}")
    client = mlflow.MlflowClient()
    experiment = mlflow.get_experiment_by_name("agegender").experiment_id

    def child_of(parent: str) -> str:
        return client.create_run(experiment, tags={"mlflow.parentRunId": parent}).info.run_id  # RUNNING

    parent, other_parent = child_of("none"), child_of("none")
    alive, dead, finished, elsewhere = child_of(parent), child_of(parent), child_of(parent), child_of(other_parent)
    client.set_terminated(finished, status="FINISHED")

    ended = end_dead_runs(f"tags.`mlflow.parentRunId` = '{parent}'", alive={alive})

    assert ended == [dead]
    status = {run_id: client.get_run(run_id).info.status for run_id in (alive, dead, finished, elsewhere, parent)}
    assert status == {alive: "RUNNING", dead: "KILLED", finished: "FINISHED", elsewhere: "RUNNING", parent: "RUNNING"}
