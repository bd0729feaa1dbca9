"""The team stack's speed: DVC, MLflow artifacts, the training flow and the service's cold start against its servers.

Run: .venv/bin/python benchmarks/team_stack.py [--images N] [--flow-images N] [--rounds N]
Starts its own stack with `agegender stack up` in a temporary folder on free ports, as a user
would, and stops it at the end. Times: stack up (first and second start) and down; `dvc push`
of the whole dataset to the stack's S3 bucket and, for comparison, to a local folder remote;
`dvc pull` from S3 into a fresh clone with an empty cache; an MLflow artifact round trip
(one 20 MB file and 50 small files) through the server; `agegender flow run` in a fresh clone
against the stack (Prefect server, MLflow server, S3 remote) and with the local default (sqlite,
a folder remote, Prefect's temporary server) on a spread of utkface-part1 with a small model,
alternating, each round a registered model of its own; and `bentoml serve` until /readyz with the
champion loaded from the MLflow server and from the local sqlite store.
Writes benchmarks/results/team_stack.json.
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
import urllib.request
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
UTKFACE = ROOT.parent / "shared" / "datasets" / "utkface-part1"
RESULTS = ROOT / "benchmarks" / "results" / "team_stack.json"
BIN = Path(sys.executable).parent
sys.path.insert(0, str(ROOT))
from tests.conftest import set_params, stack_ports, stop  # noqa: E402


def run(*args: str, cwd: Path, env: dict | None = None) -> tuple[subprocess.CompletedProcess, float]:
    start = time.perf_counter()
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(args)} exited {result.returncode}\n{result.stdout}\n{result.stderr}")
    return result, seconds


def make_repo(repo: Path, stack_dir: Path) -> None:
    """A git + DVC project whose params.yaml puts the stack in stack_dir on free ports."""
    repo.mkdir()
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["stack"].update({"dir": str(stack_dir), "ports": stack_ports()})
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


# Small enough to run in minutes on 2 cores; the same for both modes, written to the results. Open
# gates: a model this small must still become champion, so that the service has one to load.
FLOW_PARAMS = {
    "preprocess": {"image_size": 48},
    "train": {"width": 16, "epochs": 3, "batch_size": 32, "warmup_epochs": 0, "patience": 3},
    "gates": {"max_age_mae": 100.0, "min_gender_accuracy": 0.0, "max_group_gap": 100.0},
}


def spread(count: int, folder: Path) -> Path:
    """Every k-th image of utkface-part1 by name: all ages and both genders."""
    folder.mkdir()
    files = sorted(UTKFACE.glob("*.jpg"))
    for path in files[:: max(len(files) // count, 1)][:count]:
        shutil.copyfile(path, folder / path.name)
    return folder


def flow_origin(repo: Path, bench_repo: Path, tmp: Path, env: dict, images: int) -> None:
    """A project with the flow's data committed and pushed to both the S3 and a folder remote."""
    repo.mkdir()
    shutil.copyfile(bench_repo / "params.yaml", repo / "params.yaml")  # names the running stack
    run("git", "init", "-q", cwd=repo)
    run("dvc", "init", "-q", cwd=repo)
    (repo / "src").symlink_to(ROOT / "src")  # dvc.yaml names the library modules as deps
    (repo / "service").symlink_to(ROOT / "service")
    for name in ("dvc.yaml", ".gitignore"):
        shutil.copyfile(ROOT / name, repo / name)
    set_params(repo, FLOW_PARAMS)
    run("dvc", "remote", "add", "team", "s3://agegender-dvc", cwd=repo)
    run("dvc", "remote", "modify", "team", "endpointurl", env["FSSPEC_S3_ENDPOINT_URL"], cwd=repo)
    run("dvc", "remote", "add", "folder", str(tmp / "flow-folder-remote"), cwd=repo)
    run("agegender", "data", "ingest", str(spread(images, tmp / "flow-images")), cwd=repo, env=env)
    run("dvc", "push", "-r", "team", cwd=repo, env=env)
    run("dvc", "push", "-r", "folder", cwd=repo, env=env)
    run("git", "add", "-A", cwd=repo)
    run("git", "commit", "-qm", "flow benchmark project", cwd=repo)


def local_env(env: dict) -> dict:
    """The embedded default: no stack variables (sqlite store, Prefect's temporary server)."""
    stack_vars = ("MLFLOW_TRACKING_URI", "PREFECT_API_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
    local = {key: value for key, value in env.items() if key not in (*stack_vars, "FSSPEC_S3_ENDPOINT_URL")}
    # The temporary server's 20 s start-up limit is too short on a busy 2-core machine.
    return {**local, "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180"}


def flow_clone(origin: Path, folder: Path, remote: str, model_name: str) -> Path:
    run("git", "clone", "-q", str(origin), str(folder), cwd=origin.parent)
    run("dvc", "remote", "default", remote, cwd=folder)
    set_params(
        folder, {"registry": {"model_name": model_name}, "serve": {"model_uri": f"models:/{model_name}@champion"}}
    )
    return folder


def measure_flow(origin: Path, tmp: Path, env: dict, rounds: int) -> tuple[dict, dict]:
    """`agegender flow run` in fresh clones, local and stack alternating; the last clones' champions for serving."""
    seconds: dict[str, list[float]] = {"local": [], "stack": []}
    clones = {}
    for index in range(rounds):
        for mode, remote, mode_env in (("local", "folder", local_env(env)), ("stack", "team", env)):
            clone = flow_clone(origin, tmp / f"flow-{mode}-{index}", remote, f"bench-{mode}-{index}")
            result, wall = run("agegender", "flow", "run", cwd=clone, env=mode_env)
            if "trained" not in result.stderr:
                raise SystemExit(f"the {mode} flow did not train:\n{result.stderr[-3000:]}")
            seconds[mode].append(round(wall, 1))
            clones[mode] = (clone, mode_env)
    best = {mode: min(values) for mode, values in seconds.items()}
    return {
        "seconds": seconds,
        "best_local_s": best["local"],
        "best_stack_s": best["stack"],
        "stack_over_local": round(best["stack"] / best["local"], 2),
        "goal": "stack_over_local <= 1.2",
    }, clones


def measure_cold_start(clone: Path, env: dict, log: Path) -> float:
    """Seconds from `bentoml serve` to a ready service (champion downloaded, loaded and warmed up)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    args = [str(BIN / "bentoml"), "serve", "service.service:AgeGender", "--host", "127.0.0.1", "--port", str(port)]
    start = time.perf_counter()
    with log.open("w") as out:
        process = subprocess.Popen(
            args, cwd=clone, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        while time.perf_counter() - start < 300:
            if process.poll() is not None:
                raise SystemExit(f"bentoml serve exited {process.returncode}; see {log}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as response:
                    if response.status == 200:
                        return round(time.perf_counter() - start, 1)
            except OSError:
                pass
            time.sleep(0.2)
        raise SystemExit(f"bentoml serve not ready within 300 s; see {log}")
    finally:
        stop(process)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=0, help="DVC: use only the first N images (0: all)")
    parser.add_argument("--flow-images", type=int, default=400, help="the training flow's images (a spread)")
    parser.add_argument("--rounds", type=int, default=2, help="flow runs per mode (the best is compared)")
    args = parser.parse_args()
    os.environ["PATH"] = f"{BIN}{os.pathsep}{os.environ['PATH']}"  # agegender, dvc, bentoml of this environment
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
            env = {**stack_env(repo), "PREFECT_HOME": str(tmp / "prefect-home")}  # no profile of the user's
            dvc = measure_dvc(repo, tmp, env, source)
            run(str(BIN / "python"), "-c", MLFLOW_ROUND_TRIP, str(tmp / "mlflow.json"), cwd=tmp, env=env)
            mlflow_artifacts = json.loads((tmp / "mlflow.json").read_text())
            flow_origin(tmp / "flow-origin", repo, tmp, env, args.flow_images)
            flow, clones = measure_flow(tmp / "flow-origin", tmp, env, args.rounds)
            print(json.dumps(flow), flush=True)  # kept in the output if a later step fails
            cold = {mode: measure_cold_start(c, e, tmp / f"serve-{mode}.log") for mode, (c, e) in clones.items()}
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
        "flow": {
            "what": "`agegender flow run` in a fresh clone: dvc pull, validate, preprocess, train, evaluate, register",
            "dataset": f"{args.flow_images} images, every k-th of utkface-part1 by name",
            "params": FLOW_PARAMS,
            "local": "sqlite MLflow store, folder DVC remote, Prefect's temporary server",
            "stack": "the stack's MLflow server (PostgreSQL + S3), S3 DVC remote, Prefect server",
            **flow,
        },
        "service_cold_start_s": {
            "what": "`bentoml serve service.service:AgeGender` until /readyz answers 200: champion loaded, warmed up",
            "from_stack_mlflow_server": cold["stack"],
            "from_local_sqlite_store": cold["local"],
        },
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "note": "all servers and clients on one shared machine over 127.0.0.1, other work running; "
        "dvc seconds are whole commands (about 3 s of DVC start-up each)",
    }
    RESULTS.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))
    print(f"written to {RESULTS}")


if __name__ == "__main__":
    main()
