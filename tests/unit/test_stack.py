"""agegender.stack without servers: the credentials file, client settings, port and process checks."""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

import pytest

from agegender.config import ConfigError, StackParams, StackPorts, load_params
from agegender.stack import StackError, _alive, check_ports, client_env, ensure_secrets, read_secrets
from tests.conftest import stack_ports


def test_secrets_are_generated_once_and_readable_only_by_their_owner(tmp_path: Path):
    first = ensure_secrets(tmp_path)
    assert (tmp_path / "secrets.env").stat().st_mode & 0o777 == 0o600
    assert ensure_secrets(tmp_path) == first == read_secrets(tmp_path)
    assert len(set(first.values())) == len(first)  # every credential its own


def test_clients_get_urls_and_s3_keys_but_no_database_password(tmp_path: Path):
    values = ensure_secrets(tmp_path)
    cfg = StackParams(ports=StackPorts(s3=9001, mlflow=9002, prefect=9003))
    env = client_env(tmp_path, cfg)
    assert env["MLFLOW_TRACKING_URI"] == "http://127.0.0.1:9002"
    assert env["PREFECT_API_URL"] == "http://127.0.0.1:9003/api"
    assert env["FSSPEC_S3_ENDPOINT_URL"] == "http://127.0.0.1:9001"
    assert env["AWS_ACCESS_KEY_ID"] == values["S3_ACCESS_KEY"]
    assert not {values["POSTGRES_PASSWORD"], values["MLFLOW_DB_PASSWORD"]} & set(env.values())


def test_env_before_the_stack_was_ever_up_says_how_to_start_it(tmp_path: Path):
    with pytest.raises(StackError, match="agegender stack up"):
        client_env(tmp_path, StackParams())


@pytest.mark.parametrize(
    ("service", "key", "offset"),
    [
        ("postgres", "postgres", 0),
        ("s3", "s3", 0),
        ("mlflow", "mlflow", 0),
        ("prefect", "prefect", 0),
        ("s3", "seaweed", 4),  # SeaweedFS's filer, one of its internal ports
    ],
)
def test_a_taken_port_is_named_with_its_setting(service: str, key: str, offset: int):
    ports = stack_ports()  # one block: a free port drawn alone could fall among SeaweedFS's seven
    taken = ports[key] + offset
    cfg = StackParams(ports=StackPorts(**ports))
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", taken))
        holder.listen()
        with pytest.raises(StackError, match=rf"port {taken} on 127\.0\.0\.1 is already taken.*stack\.ports\.{key}"):
            check_ports(cfg, [service])
        others = [name for name in ("postgres", "s3", "mlflow", "prefect") if name != service]
        check_ports(cfg, others)  # a service that is already running keeps its port


def test_ports_that_overlap_seaweeds_range_are_refused(tmp_path: Path):
    params = tmp_path / "params.yaml"
    params.write_text("stack:\n  ports: {mlflow: 19335, seaweed: 19333}\n")
    with pytest.raises(ConfigError, match=r"stack\.ports: ports must all differ, and seaweed uses 19333\.\.19339"):
        load_params(params)


def wait_for(condition, seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline
        time.sleep(0.02)


def test_a_pid_counts_only_while_it_runs_the_program_and_is_no_zombie():
    process = subprocess.Popen(["sleep", "30"])
    try:
        wait_for(lambda: _alive(process.pid, "sleep"))  # until the fork has exec'd sleep
        assert not _alive(process.pid, "weed")  # a pid file pointing at a reused pid
        process.kill()
        wait_for(lambda: Path(f"/proc/{process.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z")
        assert not _alive(process.pid, "sleep")  # dead but not reaped yet
    finally:
        process.kill()
        process.wait()
    assert not _alive(process.pid, "sleep")
    assert not _alive(None, "sleep")
