"""The team stack's speed: DVC push/pull of utkface-part1 through its S3 store, MLflow artifacts through its server.

Run: .venv/bin/python benchmarks/team_stack.py [--images N]
Starts its own stack with `agegender stack up` in a temporary folder on free ports, as a user
would, and stops it at the end. Times: stack up (first and second start) and down; `dvc push`
of the whole dataset to the stack's S3 bucket and, for comparison, to a local folder remote;
`dvc pull` from S3 into a fresh clone with an empty cache; an MLflow artifact round trip
(one 20 MB file and 50 small files) through the server. Writes benchmarks/results/team_stack.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
UTKFACE = ROOT.parent / "shared" / "datasets" / "utkface-part1"
RESULTS = ROOT / "benchmarks" / "results" / "team_stack.json"
BIN = Path(sys.executable).parent


def run(*args: str, cwd: Path, env: dict | None = None) -> tuple[subprocess.CompletedProcess, float]:
    start = time.perf_counter()
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(args)} exited {result.returncode}\n{result.stdout}\n{result.stderr}")
    return result, seconds


def free_ports(count: int) -> list[int]:
    """`count` consecutive free ports on 127.0.0.1."""
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            first = sock.getsockname()[1]
        try:
            for port in range(first, first + count):
                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", port))
        except OSError:
            continue
        return list(range(first, first + count))


def make_repo(repo: Path, stack_dir: Path) -> None:
    """A git + DVC project whose params.yaml puts the stack in stack_dir on free ports."""
    repo.mkdir()
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    postgres, s3, mlflow, prefect = free_ports(4)
    seaweed = free_ports(7)[0]
    ports = {"postgres": postgres, "s3": s3, "mlflow": mlflow, "prefect": prefect, "seaweed": seaweed}
    params["stack"].update({"dir": str(stack_dir), "ports": ports})
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run("git", "init", "-q", cwd=repo)
    run("dvc", "init", "-q", cwd=repo)


def stack_env(repo: Path) -> dict:
    result, _ = run("agegender", "stack", "env", cwd=repo)
    exported = {}
    for line in result.stdout.splitlines():
        if line.startswith("export "):
            key, _, value = line.removeprefix("export ").partition("=")
            exported[key] = shlex.split(value)[0]
    return {**os.environ, **exported}


def folder_size(folder: Path) -> tuple[int, int]:
    files = [p for p in folder.rglob("*") if p.is_file()]
    return len(files), sum(p.stat().st_size for p in files)


def rate(files: int, size: int, seconds: float) -> dict:
    return {
        "seconds": round(seconds, 1),
        "files_per_s": round(files / seconds, 1),
        "mb_per_s": round(size / 2**20 / seconds, 2),
    }


def measure_dvc(repo: Path, tmp: Path, env: dict, source: Path) -> dict:
    run("agegender", "data", "ingest", str(source), cwd=repo, env=env)  # no default remote yet: not pushed
    files, size = folder_size(repo / "data")
    run("git", "add", "-A", cwd=repo)
    run("git", "commit", "-qm", "data", cwd=repo)
    s3 = env["FSSPEC_S3_ENDPOINT_URL"]
    run("dvc", "remote", "add", "team", "s3://agegender-dvc", cwd=repo)
    run("dvc", "remote", "modify", "team", "endpointurl", s3, cwd=repo)
    run("dvc", "remote", "add", "folder", str(tmp / "folder-remote"), cwd=repo)
    run("git", "commit", "-qam", "remotes", cwd=repo)
    _, push_s3 = run("dvc", "push", "-r", "team", cwd=repo, env=env)
    _, push_folder = run("dvc", "push", "-r", "folder", cwd=repo, env=env)
    clone = tmp / "clone"
    run("git", "clone", "-q", str(repo), str(clone), cwd=tmp)
    _, pull_s3 = run("dvc", "pull", "-r", "team", cwd=clone, env=env)
    if folder_size(clone / "data") != (files, size):
        raise SystemExit("dvc pull did not bring back the same files")
    return {
        "files": files,
        "mb": round(size / 2**20, 1),
        "jobs": 4 * (os.cpu_count() or 1),  # DVC's default for S3
        "push_s3": rate(files, size, push_s3),
        "push_local_folder": rate(files, size, push_folder),
        "pull_s3_fresh_clone": rate(files, size, pull_s3),
    }


MLFLOW_ROUND_TRIP = """
import json, os, sys, tempfile, time
from pathlib import Path
import mlflow

tmp = Path(tempfile.mkdtemp())
big = tmp / "big"; big.mkdir(); (big / "weights.bin").write_bytes(os.urandom(20 * 2**20))
small = tmp / "small"; small.mkdir()
for i in range(50):
    (small / f"plot{i:02d}.json").write_bytes(os.urandom(10 * 2**10))
mlflow.set_experiment("team-stack-benchmark")
out = {}
with mlflow.start_run() as run:
    for name, folder in (("one_20mb_file", big), ("50_files_of_10kb", small)):
        start = time.perf_counter(); mlflow.log_artifacts(str(folder), artifact_path=name); up = time.perf_counter() - start
        start = time.perf_counter()
        mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path=name, dst_path=str(tmp / "dl"))
        down = time.perf_counter() - start
        mb = sum(f.stat().st_size for f in folder.iterdir()) / 2**20
        out[name] = {"upload_s": round(up, 2), "download_s": round(down, 2),
                     "upload_mb_per_s": round(mb / up, 1), "download_mb_per_s": round(mb / down, 1)}
Path(sys.argv[1]).write_text(json.dumps(out))  # stdout carries MLflow's own messages
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=0, help="use only the first N images (0: all)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="agegender-stack-bench-") as name:
        tmp = Path(name)
        tmp.chmod(0o711)  # PostgreSQL runs as the postgres user and must reach the stack's folder
        source = UTKFACE
        if args.images:
            source = tmp / "subset"
            source.mkdir()
            for path in sorted(UTKFACE.iterdir())[: args.images]:
                shutil.copyfile(path, source / path.name)
        repo = tmp / "repo"
        make_repo(repo, tmp / "stack")
        try:
            _, up_first = run("agegender", "stack", "up", cwd=repo)
            env = stack_env(repo)
            dvc = measure_dvc(repo, tmp, env, source)
            run(str(BIN / "python"), "-c", MLFLOW_ROUND_TRIP, str(tmp / "mlflow.json"), cwd=tmp, env=env)
            mlflow_artifacts = json.loads((tmp / "mlflow.json").read_text())
            _, down = run("agegender", "stack", "down", cwd=repo)
            _, up_again = run("agegender", "stack", "up", cwd=repo)
        finally:
            subprocess.run(["agegender", "stack", "down"], cwd=repo, capture_output=True)
    out = {
        "dataset": str(source.relative_to(ROOT.parent))
        if source == UTKFACE
        else f"first {args.images} of utkface-part1",
        "stack_seconds": {"up_first": round(up_first, 1), "down": round(down, 1), "up_again": round(up_again, 1)},
        "dvc": dvc,
        "mlflow_artifacts": mlflow_artifacts,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "note": "all servers and clients on one shared machine over 127.0.0.1, other work running; "
        "dvc seconds are whole commands (about 3 s of DVC start-up each)",
    }
    RESULTS.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))
    print(f"written to {RESULTS}")


if __name__ == "__main__":
    main()
