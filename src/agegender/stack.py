"""The team stack on one machine: PostgreSQL, an S3 store, an MLflow server and a Prefect server.

`agegender stack up|env|status|down` calls these. Everything the stack keeps is in one folder
(`stack.dir`): the PostgreSQL cluster, SeaweedFS's volumes (the S3 store), logs, pid files and
`secrets.env` (mode 0600), the credentials generated at the first `up` and reused after.
No secret goes on a command line: servers get theirs from their environment or a 0600 file.

    PostgreSQL 15 (Debian)   databases `mlflow` and `prefect`, each with its own role
    SeaweedFS (`weed`)       S3 with one access key; buckets for DVC and MLflow artifacts
    mlflow server            backend store in PostgreSQL, artifacts proxied to the S3 bucket
    prefect server           its database in PostgreSQL

Daemons run in sessions of their own, so they outlive the command that started them; pid
files and /proc tell whether they still run (Linux only, like Debian's PostgreSQL).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path

from agegender.config import StackParams

SERVICES = ("postgres", "s3", "mlflow", "prefect")  # start order; stopped in reverse
DAEMONS = {"s3": "weed", "mlflow": "mlflow", "prefect": "prefect"}  # service -> program in its command line
BIN = Path(sys.executable).parent  # weed, mlflow and prefect come with this environment
SECRETS_FILE = "secrets.env"
START_SECONDS = {"postgres": 60, "s3": 60, "mlflow": 120, "prefect": 180}  # first starts run migrations
STOP_SECONDS = 30  # SeaweedFS's filer waits up to 15 s for its gRPC streams before it exits
PG_ROLES = ("mlflow", "prefect")  # one database per role, owned by it
SAMEHOST_RULE = "host all all samehost scram-sha-256"  # pg_hba.conf: clients on the server's own addresses


class StackError(RuntimeError):
    """The stack cannot start, stop or answer; the message names the service, port or log to read."""


def log_path(root: Path, service: str) -> Path:
    if service == "postgres":
        return root / "postgres" / "postgres.log"  # written by the postgres user, so in its folder
    return root / "logs" / f"{service}.log"


def pid_path(root: Path, service: str) -> Path:
    return root / "run" / f"{service}.pid"


def urls(cfg: StackParams) -> dict[str, str]:
    """Where each server answers (no credentials in them)."""
    host, ports = cfg.host, cfg.ports
    return {
        "postgres": f"postgresql://{host}:{ports.postgres}",
        "s3": f"http://{host}:{ports.s3}",
        "mlflow": f"http://{host}:{ports.mlflow}",
        "prefect": f"http://{host}:{ports.prefect}",
    }


# --- credentials -------------------------------------------------------------------------


def ensure_secrets(root: Path) -> dict[str, str]:
    """The stack's credentials, generated on first use into root/secrets.env (mode 0600)."""
    path = root / SECRETS_FILE
    if path.exists():
        return read_secrets(root)
    values = {
        "POSTGRES_PASSWORD": secrets.token_urlsafe(24),
        "MLFLOW_DB_PASSWORD": secrets.token_urlsafe(24),
        "PREFECT_DB_PASSWORD": secrets.token_urlsafe(24),
        # S3 access keys look like AWS's: 20 upper-case characters and a 40-character secret.
        "S3_ACCESS_KEY": "AK" + "".join(secrets.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ234567") for _ in range(18)),
        "S3_SECRET_KEY": secrets.token_urlsafe(30),
    }
    _write_private(path, "".join(f"{key}={value}\n" for key, value in values.items()))
    return values


def read_secrets(root: Path) -> dict[str, str]:
    path = root / SECRETS_FILE
    if not path.exists():
        raise StackError(f"{path}: not found; start the stack first with `agegender stack up`")
    lines = (line.partition("=") for line in path.read_text().splitlines() if "=" in line)
    return {key.strip(): value.strip() for key, _, value in lines}


def _write_private(path: Path, text: str) -> None:
    """Write a file only its owner can read, created that way (never briefly world-readable)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    tmp.replace(path)


def client_env(root: Path, cfg: StackParams) -> dict[str, str]:
    """What clients export to use the stack (`eval "$(agegender stack env)"`)."""
    values = read_secrets(root)
    where = urls(cfg)
    return {
        "MLFLOW_TRACKING_URI": where["mlflow"],  # artifacts go through the server: no S3 settings needed
        "PREFECT_API_URL": f"{where['prefect']}/api",
        "AWS_ACCESS_KEY_ID": values["S3_ACCESS_KEY"],  # DVC's S3 remote and s3:// ingest
        "AWS_SECRET_ACCESS_KEY": values["S3_SECRET_KEY"],
        "FSSPEC_S3_ENDPOINT_URL": where["s3"],  # s3fs (s3:// ingest) reads its endpoint from here
    }


# --- up, status, down ----------------------------------------------------------------------


def stack_up(root: Path, cfg: StackParams, *, base_env: Mapping[str, str], report: Callable[[str], None]) -> None:
    """Start every service that is not running; on failure stop the ones this call started."""
    root.mkdir(parents=True, exist_ok=True)
    root.chmod(0o711)  # the postgres user must reach its folder inside; nobody else may list it
    values = ensure_secrets(root)
    missing = [name for name in SERVICES if not is_running(root, name)]
    check_ports(cfg, missing)
    started, processes = [], {}
    try:
        for name in SERVICES:  # PostgreSQL first; the other three then start side by side
            if name in missing:
                report(f"starting {name} ...")
                processes[name] = STARTERS[name](root, cfg, values, base_env)
                started.append(name)
            else:
                report(f"{name} is already running at {urls(cfg)[name]}")
            if name == "postgres":
                create_databases(cfg, values)
        for name in started:
            if name in READY_PATHS:
                _wait_ready(root, cfg, name, processes[name])
            report(f"{name} is up at {urls(cfg)[name]} (log: {log_path(root, name)})")
        create_buckets(cfg, values)
    except BaseException:
        stop_services(root, started)
        raise


def stack_status(root: Path, cfg: StackParams) -> list[dict]:
    """One row per service: running (process alive), answering (its port takes connections), url, log."""
    rows = []
    for name in SERVICES:
        port = getattr(cfg.ports, name)
        rows.append(
            {
                "service": name,
                "running": is_running(root, name),
                "answering": _answers(cfg.host, port),
                "url": urls(cfg)[name],
                "log": str(log_path(root, name)),
            }
        )
    return rows


def stack_down(root: Path, report: Callable[[str], None]) -> None:
    """Stop every service of the stack (data, credentials and logs stay in root)."""
    running = [name for name in SERVICES if is_running(root, name)]
    for name in SERVICES:
        if name not in running:
            report(f"{name} is not running")
    if running:
        report(f"stopping {', '.join(reversed(running))} ...")
        stop_services(root, running)
        report("stopped")


def is_running(root: Path, service: str) -> bool:
    if service == "postgres":
        data = root / "postgres" / "data"
        if not (data / "PG_VERSION").exists():
            return False
        return _run_as_postgres([_pg_bin("pg_ctl"), "status", "-D", data], cwd=root / "postgres").returncode == 0
    return _alive(_read_pid(root, service), DAEMONS[service])


def stop_services(root: Path, services: list[str]) -> None:
    """Stop the daemons among services together (SIGTERM, then SIGKILL), then PostgreSQL if named."""
    import psutil

    pids = {name: _read_pid(root, name) for name in services if name in DAEMONS}

    def alive() -> dict[str, int]:
        return {name: pid for name, pid in pids.items() if _alive(pid, DAEMONS[name])}

    # Children that left the process group would outlive it holding the service's port.
    family = [child for pid in alive().values() for child in _descendants(pid)]
    for sig, grace in ((signal.SIGTERM, STOP_SECONDS), (signal.SIGKILL, 10)):
        for pid in alive().values():
            # The whole process group: the MLflow and Prefect servers run their web servers as children.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, sig)
        deadline = time.monotonic() + grace
        while alive() and time.monotonic() < deadline:
            time.sleep(0.2)
    if stuck := alive():
        raise StackError(f"did not stop even after SIGKILL: {stuck}")
    for child in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()
    psutil.wait_procs(family, timeout=10)
    for name in pids:
        pid_path(root, name).unlink(missing_ok=True)
    if "postgres" in services:
        folder = root / "postgres"
        result = _run_as_postgres(
            [_pg_bin("pg_ctl"), "stop", "-D", folder / "data", "-m", "fast", "-w", "-t", "60"], cwd=folder
        )
        if result.returncode != 0 and is_running(root, "postgres"):
            raise StackError(f"postgres did not stop: {result.stderr.strip()} (log: {log_path(root, 'postgres')})")


def check_ports(cfg: StackParams, services: list[str]) -> None:
    """Refuse to start when another process holds a port the services need, naming it."""
    names = cfg.ports.named()
    for service in services:
        ports = [getattr(cfg.ports, service)]
        if service == "s3":  # SeaweedFS's master, volume and filer servers listen too
            ports += [port for port, what in names.items() if what.startswith("SeaweedFS")]
        for port in ports:
            if _port_taken(cfg.host, port):
                raise StackError(
                    f"port {port} on {cfg.host} is already taken by another process; it is needed for "
                    f"{names[port]}. Stop that process or choose another port in params.yaml."
                )


def _port_taken(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a recently closed port is free
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def _answers(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=2).close()
    except OSError:
        return False
    return True


# --- PostgreSQL ----------------------------------------------------------------------------


def start_postgres(root: Path, cfg: StackParams, values: dict[str, str], base_env: Mapping[str, str]) -> None:
    folder = root / "postgres"
    data = folder / "data"
    if not (data / "PG_VERSION").exists():
        _init_postgres(folder, values)
    # Rewritten at every start so a changed host or port in params.yaml takes effect.
    conf = data / "agegender.conf"
    conf.write_text(f"listen_addresses = '{cfg.host}'\nport = {cfg.ports.postgres}\nunix_socket_directories = ''\n")
    _give_to_postgres(conf)
    _allow_same_host(data / "pg_hba.conf")
    log = log_path(root, "postgres")
    result = _run_as_postgres(
        [_pg_bin("pg_ctl"), "start", "-D", data, "-l", log, "-w", "-t", str(START_SECONDS["postgres"])], cwd=folder
    )
    if result.returncode != 0:
        raise StackError(f"postgres did not start: {result.stderr.strip() or result.stdout.strip()}\n{_tail(log)}")


def _allow_same_host(hba: Path) -> None:
    """Let the MLflow and Prefect servers log in over stack.host when it is not 127.0.0.1: a client on the
    server's own machine connects from that address, which initdb's rules (loopback only) refuse.
    `samehost` matches only the server's own addresses, so other hosts are still refused."""
    if SAMEHOST_RULE not in hba.read_text():
        with hba.open("a") as handle:
            handle.write(SAMEHOST_RULE + "\n")


def _init_postgres(folder: Path, values: dict[str, str]) -> None:
    """A new cluster owned by the postgres user (initdb refuses root), password auth only."""
    folder.mkdir(mode=0o700, exist_ok=True)
    _give_to_postgres(folder)
    if _run_as_postgres(["test", "-w", folder], cwd="/").returncode != 0:
        raise StackError(
            f"the postgres user cannot write to {folder}: every folder above it must be searchable "
            "by others (chmod o+x), or set stack.dir in params.yaml to a folder that is"
        )
    password_file = folder / "superuser-password"
    _write_private(password_file, values["POSTGRES_PASSWORD"] + "\n")
    _give_to_postgres(password_file)
    try:
        result = _run_as_postgres(
            [
                _pg_bin("initdb"),
                *("-D", folder / "data", "-U", "postgres", f"--pwfile={password_file}"),
                *("--auth-local=scram-sha-256", "--auth-host=scram-sha-256", "-E", "UTF8", "--no-locale"),
            ],
            cwd=folder,
        )
    finally:
        password_file.unlink(missing_ok=True)
    if result.returncode != 0:
        raise StackError(f"initdb failed in {folder / 'data'}:\n{result.stderr.strip()}")
    with (folder / "data" / "postgresql.conf").open("a") as handle:
        handle.write("include_if_exists = 'agegender.conf'  # listen address and port, from params.yaml\n")


def create_databases(cfg: StackParams, values: dict[str, str]) -> None:
    """A role and a database of its own for MLflow and for Prefect (kept if they exist)."""
    import psycopg2

    conn = psycopg2.connect(
        host=cfg.host,
        port=cfg.ports.postgres,
        user="postgres",
        password=values["POSTGRES_PASSWORD"],
        dbname="postgres",
        connect_timeout=10,
    )
    conn.autocommit = True  # CREATE DATABASE cannot run inside a transaction
    try:
        with conn.cursor() as cur:
            for role in PG_ROLES:
                cur.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,))
                if not cur.fetchone():
                    cur.execute(f"CREATE ROLE {role} LOGIN PASSWORD %s", (values[f"{role.upper()}_DB_PASSWORD"],))
                cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (role,))
                if not cur.fetchone():
                    cur.execute(f"CREATE DATABASE {role} OWNER {role}")
    finally:
        conn.close()


def _pg_bin(name: str) -> str:
    """A PostgreSQL server program: Debian keeps them out of PATH, under /usr/lib/postgresql/VERSION/bin."""
    found = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"), key=lambda p: int(p.parts[-3]))
    if found:
        return str(found[-1])
    if path := shutil.which(name):
        return path
    raise StackError(f"PostgreSQL's {name} not found: install Debian's postgresql package (make system-deps)")


def _run_as_postgres(args: list, cwd: Path | str) -> subprocess.CompletedProcess:
    """Run a PostgreSQL program as the postgres user when we are root (it refuses root)."""
    prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    return subprocess.run(
        [*prefix, *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        start_new_session=True,  # the server pg_ctl starts must not share our terminal's signals
    )


def _give_to_postgres(path: Path) -> None:
    if os.geteuid() == 0:
        shutil.chown(path, "postgres", "postgres")


# --- S3 (SeaweedFS) ------------------------------------------------------------------------


def start_s3(root: Path, cfg: StackParams, values: dict[str, str], base_env: Mapping[str, str]) -> subprocess.Popen:
    (root / "seaweed").mkdir(exist_ok=True)
    config = root / "seaweed-s3.json"
    identity = {
        "name": "agegender",
        "credentials": [{"accessKey": values["S3_ACCESS_KEY"], "secretKey": values["S3_SECRET_KEY"]}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
    }
    _write_private(config, json.dumps({"identities": [identity]}, indent=2))  # with an identity, no anonymous access
    first = cfg.ports.seaweed
    args = [
        str(BIN / "weed"),
        "server",
        f"-dir={root / 'seaweed'}",
        f"-ip={cfg.host}",
        f"-ip.bind={cfg.host}",
        *(f"-master.port={first}", f"-master.port.grpc={first + 1}"),
        *(f"-volume.port={first + 2}", f"-volume.port.grpc={first + 3}"),
        *(f"-filer.port={first + 4}", f"-filer.port.grpc={first + 5}"),
        *("-s3", f"-s3.port={cfg.ports.s3}", f"-s3.port.grpc={first + 6}", f"-s3.config={config}"),
        "-s3.port.iceberg=0",  # catalogs we do not use: no more ports
        "-s3.port.lance=0",
        "-master.telemetry=false",
        "-master.electionTimeout=1s",  # a single master: no peers to wait for after a restart
        "-volume.preStopSeconds=1",  # and no peers to hand over to before stopping
        "-volume.max=0",  # as many volumes as the disk holds: each bucket takes 7, the default allows 8
        "-master.volumeSizeLimitMB=1024",
    ]
    return _spawn(root, "s3", args, dict(base_env))


def create_buckets(cfg: StackParams, values: dict[str, str]) -> None:
    """The DVC and MLflow buckets; returns once a write to each succeeds (volumes may still be joining)."""
    import boto3
    from botocore.exceptions import BotoCoreError, ClientError

    client = boto3.client(
        "s3",
        endpoint_url=urls(cfg)["s3"],
        aws_access_key_id=values["S3_ACCESS_KEY"],
        aws_secret_access_key=values["S3_SECRET_KEY"],
        region_name="us-east-1",
    )
    deadline = time.monotonic() + START_SECONDS["s3"]
    for bucket in (cfg.buckets.dvc, cfg.buckets.mlflow):
        while True:
            try:
                if bucket not in {b["Name"] for b in client.list_buckets()["Buckets"]}:
                    client.create_bucket(Bucket=bucket)
                client.put_object(Bucket=bucket, Key=".agegender-stack-probe", Body=b"ok")
                client.delete_object(Bucket=bucket, Key=".agegender-stack-probe")
                break
            except (BotoCoreError, ClientError) as err:
                if time.monotonic() > deadline:
                    raise StackError(f"the S3 store does not accept writes to bucket {bucket}: {err}") from err
                time.sleep(1)


# --- MLflow and Prefect servers ------------------------------------------------------------


def start_mlflow(root: Path, cfg: StackParams, values: dict[str, str], base_env: Mapping[str, str]) -> subprocess.Popen:
    pg = f"{cfg.host}:{cfg.ports.postgres}"
    env = {
        **base_env,
        "MLFLOW_BACKEND_STORE_URI": f"postgresql+psycopg2://mlflow:{values['MLFLOW_DB_PASSWORD']}@{pg}/mlflow",
        # The server reads and writes artifacts in S3 for its clients (proxied artifact access).
        "MLFLOW_S3_ENDPOINT_URL": urls(cfg)["s3"],
        "AWS_ACCESS_KEY_ID": values["S3_ACCESS_KEY"],
        "AWS_SECRET_ACCESS_KEY": values["S3_SECRET_KEY"],
        # MLflow's job runner (GenAI scorers, prompt optimisation) is unused here and costs 8 processes.
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    }
    args = [
        str(BIN / "mlflow"),
        "server",
        *("--host", cfg.host, "--port", str(cfg.ports.mlflow), "--workers", "1"),
        *("--artifacts-destination", f"s3://{cfg.buckets.mlflow}"),
    ]
    return _spawn(root, "mlflow", args, env)


def start_prefect(
    root: Path, cfg: StackParams, values: dict[str, str], base_env: Mapping[str, str]
) -> subprocess.Popen:
    (root / "prefect").mkdir(exist_ok=True)
    pg = f"{cfg.host}:{cfg.ports.postgres}"
    env = {
        **base_env,
        "PREFECT_HOME": str(root / "prefect"),
        "PREFECT_SERVER_DATABASE_CONNECTION_URL": f"postgresql+asyncpg://prefect:{values['PREFECT_DB_PASSWORD']}@{pg}/prefect",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }
    args = [str(BIN / "prefect"), "server", "start", "--host", cfg.host, "--port", str(cfg.ports.prefect)]
    return _spawn(root, "prefect", args, env)


STARTERS = {"postgres": start_postgres, "s3": start_s3, "mlflow": start_mlflow, "prefect": start_prefect}
READY_PATHS = {"s3": "/", "mlflow": "/health", "prefect": "/api/health"}  # PostgreSQL: pg_ctl start -w waits


# --- processes -----------------------------------------------------------------------------


def _spawn(root: Path, service: str, args: list[str], env: dict[str, str]) -> subprocess.Popen:
    """Start a daemon in a session of its own, output appended to its log, its pid in run/."""
    log = log_path(root, service)
    log.parent.mkdir(exist_ok=True)
    pid_path(root, service).parent.mkdir(exist_ok=True)
    with log.open("a") as handle:  # the child keeps its own copy of the descriptor
        process = subprocess.Popen(
            args,
            cwd=root,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    pid_path(root, service).write_text(f"{process.pid}\n")
    return process


def _wait_ready(root: Path, cfg: StackParams, service: str, process: subprocess.Popen) -> None:
    url = urls(cfg)[service] + READY_PATHS[service]
    log = log_path(root, service)
    deadline = time.monotonic() + START_SECONDS[service]
    while time.monotonic() < deadline:
        if (code := process.poll()) is not None:  # our own child: its exit status is certain
            raise StackError(f"{service} exited with {code} while starting; last lines of {log}:\n{_tail(log)}")
        if _http_answers(url, any_status=service == "s3"):  # S3 answers anonymous requests with 403
            return
        time.sleep(0.5)
    raise StackError(f"{service} did not answer {url} within {START_SECONDS[service]} s; see {log}")


def _http_answers(url: str, any_status: bool) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status == 200
    except urllib.error.HTTPError:
        return any_status
    except OSError:
        return False


def _descendants(pid: int) -> list:
    import psutil

    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _read_pid(root: Path, service: str) -> int | None:
    try:
        return int(pid_path(root, service).read_text())
    except (FileNotFoundError, ValueError):
        return None


def _alive(pid: int | None, program: str) -> bool:
    """The pid runs `program` and is not a zombie (a pid file can outlive its process, or be reused)."""
    if pid is None:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state != "Z" and program in cmdline


def _tail(log: Path, lines: int = 20) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"({log} is not readable)"
