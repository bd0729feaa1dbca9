"""TF_CONFIG, as `agegender train` and `agegender flow multiworker` read and write it (no TensorFlow)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from agegender.cli import app
from agegender.deployments import work_queue_of
from agegender.distributed import Cluster, cluster_from_tf_config, tf_config
from tests.conftest import PROJECT

WORKERS = ["10.0.0.11:12345", "10.0.0.12:12345"]


def test_each_workers_tf_config_names_the_cluster_and_its_index():
    assert cluster_from_tf_config(tf_config(WORKERS, 0)) == Cluster(workers=tuple(WORKERS), index=0)
    member = cluster_from_tf_config(tf_config(WORKERS, 1))
    assert (member.is_chief, member.size, member.index) == (False, 2, 1)
    assert cluster_from_tf_config(None) is None and cluster_from_tf_config("") is None
    assert [work_queue_of(w) for w in WORKERS] == ["10.0.0.11", "10.0.0.12"]


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("not json", "must be JSON like"),
        ('{"cluster": {"worker": ["a:1"]}}', "must be JSON like"),
        ('{"cluster": {"worker": ["a:1"], "ps": ["b:1"]}, "task": {"type": "worker", "index": 0}}', "only 'worker'"),
        ('{"cluster": {"worker": ["no-port"]}, "task": {"type": "worker", "index": 0}}', "list of 'host:port'"),
        (tf_config(WORKERS, 2), "task.index must be 0..1"),
    ],
)
def test_a_malformed_tf_config_is_refused_naming_the_problem(text: str, named: str):
    with pytest.raises(ValueError, match=named):
        cluster_from_tf_config(text)


def test_train_refuses_a_cluster_and_a_dask_scheduler_together(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    params = yaml.safe_load((PROJECT / "params.yaml").read_text())
    params["scale"]["dask_scheduler"] = "tcp://10.0.0.7:8786"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.setenv("TF_CONFIG", tf_config(WORKERS, 0))
    result = CliRunner().invoke(app, ["train", "--params", str(tmp_path / "params.yaml")])
    assert result.exit_code == 1
    assert "TF_CONFIG names a multi-worker cluster and scale.dask_scheduler is tcp://10.0.0.7:8786" in result.stderr


def test_train_refuses_a_malformed_tf_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("TF_CONFIG", '{"cluster": {}}')
    result = CliRunner().invoke(app, ["train", "--params", str(PROJECT / "params.yaml")])
    assert result.exit_code == 1 and "error: TF_CONFIG must be JSON like" in result.stderr, result.stderr
