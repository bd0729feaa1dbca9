"""The cost of monitoring: the service's latency with and without it, and the drift check on 100,000 records.

Needs a folder with a registered champion trained since drift references exist (its run has
outputs/reference.csv) and the data it was trained on: a project after `dvc repro`, or
`benchmarks/train_quality.py --keep DIR`.
Run: .venv/bin/python benchmarks/monitoring.py --store DIR [--seconds 30] [--records 100000]

  * `bentoml serve` with monitor.enabled false and true, alternated (off, on, off, on) so a
    change in the machine's load hits both: p50/p95 at 1 and 8 clients on three-face scenes
    (benchmarks/scenes.py), and the records written;
  * 100,000 served-input records (faces drawn from the champion's reference, ages shifted for
    the second half of the day) written by the service's RecordWriter, then the drift check's
    parts: reading the window, comparing it with the reference, the HTML report; and the
    whole Prefect drift flow (its temporary Prefect server included).
Writes benchmarks/results/monitoring.json. Clients run on the same 2-core machine as the server.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.service import load, make_scenes, ready  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "monitoring.json"
BIN = Path(sys.executable).parent


def serve_and_measure(store: Path, scenes: list[dict], enabled: bool, seconds: float, work: Path, port: int) -> dict:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["monitor"].update({"enabled": enabled, "records": str(work / f"records-{port}")})
    params_file = work / f"params-{port}.yaml"
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{store / 'mlflow.db'}"}
    log = (work / f"serve-{port}.log").open("w")
    command = [str(BIN / "bentoml"), "serve", "service.service:AgeGender", "--host", "127.0.0.1", "--port", str(port)]
    process = subprocess.Popen(
        [*command, "--arg", f"params={params_file}"], cwd=ROOT, env=env, stdout=log, stderr=log, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 300
        while not ready(url):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"bentoml serve did not start; see {log.name}")
            time.sleep(1)
        load(url, scenes, 4, 5)  # warm-up: graph tracing, connection pools
        runs = {"monitoring": enabled}
        for clients in (1, 8):
            print(f"  monitor.enabled={enabled}: {clients} clients for {seconds} s", flush=True)
            runs[str(clients)] = load(url, scenes, clients, seconds)
    finally:
        os.killpg(process.pid, 15)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, 9)
            process.wait(timeout=30)
    records = sum(len(f.read_text().splitlines()) for f in (work / f"records-{port}").rglob("*.jsonl"))
    return runs | {"records_written": records}


def service_cost(store: Path, scenes: list[dict], seconds: float, work: Path) -> dict:
    rounds = [serve_and_measure(store, scenes, on, seconds, work, 3800 + i) for i, on in enumerate([0, 1, 0, 1])]
    summary = {}
    for clients in ("1", "8"):
        off = statistics.median(r[clients]["p50_ms"] for r in rounds if not r["monitoring"])
        on = statistics.median(r[clients]["p50_ms"] for r in rounds if r["monitoring"])
        summary[f"{clients}_clients"] = {
            "p50_ms_off": off,
            "p50_ms_on": on,
            "p50_cost_percent": round(100 * (on - off) / off, 1),
        }
    return {"rounds": rounds, "summary": summary}


def synthetic_records(reference: pd.DataFrame, count: int, version: str) -> list[dict]:
    """`count` one-face records over the last hour, faces resampled from the reference; the later
    half of the hour serves older faces (predicted ages +15 years), so the window has drift to find."""
    rng = np.random.default_rng(0)
    rows = reference.sample(n=count, replace=True, random_state=0).reset_index(drop=True)
    start = datetime.now(UTC) - timedelta(hours=1)
    records = []
    for index, row in rows.iterrows():
        shifted = index >= count // 2
        face = {
            "side": int(rng.integers(60, 400)),
            "score": round(float(rng.uniform(0.9, 1.0)), 4),
            "age": round(float(row["age"]) + (15.0 if shifted else 0.0), 1),
            **{k: float(row[k]) for k in ("brightness", "contrast", "sharpness", "female")},
        }
        when = start + timedelta(seconds=3600 * index / count)
        records.append(
            {
                "time": when.isoformat(timespec="milliseconds"),
                "request": f"r{index}",
                "route": "predict",
                "model_version": version,
                "data_version": "bench",
                "width": 640,
                "height": 480,
                "faces": [face],
            }
        )
    return records


def drift_cost(store: Path, count: int, work: Path) -> dict:
    import mlflow

    from agegender.config import load_params
    from agegender.drift import check_drift, report_html
    from agegender.drift_flow import drift_flow
    from agegender.monitoring import RecordWriter, faces_table, read_records
    from agegender.registry import resolve_version
    from agegender.tracking import configure_tracking

    configure_tracking(store, f"sqlite:///{store / 'mlflow.db'}")
    version = resolve_version(mlflow.MlflowClient(), "models:/agegender@champion")
    reference = pd.read_csv(
        mlflow.artifacts.download_artifacts(run_id=version.run_id, artifact_path="outputs/reference.csv")
    )
    records = synthetic_records(reference, count, str(version.version))
    folder = work / "records-100k"
    settings = load_params(ROOT / "params.yaml").monitor

    started = time.perf_counter()
    writer = RecordWriter(str(folder), batch_records=settings.batch_records, flush_seconds=settings.flush_seconds)
    for record in records:
        writer.add(record)
    writer.close()
    write_s = time.perf_counter() - started

    since, until = datetime.now(UTC) - timedelta(hours=2), datetime.now(UTC)
    started = time.perf_counter()
    window = faces_table(read_records(str(folder), since=since, until=until))
    read_s = time.perf_counter() - started
    started = time.perf_counter()
    report = check_drift(reference, window, settings.drift, model="bench", start="", end="")
    compare_s = time.perf_counter() - started
    started = time.perf_counter()
    page = report_html(report, reference, window)
    html_s = time.perf_counter() - started

    # The whole flow, as `agegender monitor drift` runs it, in a project whose records are these.
    project = work / "project"
    project.mkdir()
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["monitor"]["records"] = str(folder)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{store / 'mlflow.db'}"
    started = time.perf_counter()
    state = drift_flow(project_root=str(project), window_hours=2.0, retrain=False, return_state=True)
    flow_s = time.perf_counter() - started
    return {
        "records": count,
        "files": len(list(folder.rglob("*.jsonl"))),
        "megabytes": round(sum(f.stat().st_size for f in folder.rglob("*.jsonl")) / 2**20, 1),
        "write_s": round(write_s, 2),
        "read_window_s": round(read_s, 2),
        "compare_s": round(compare_s, 3),
        "html_report_s": round(html_s, 2),
        "html_report_kb": round(len(page) / 1024, 1),
        "library_total_s": round(read_s + compare_s + html_s, 2),
        "flow_total_s": round(flow_s, 1),
        "flow_state": state.name,
        "reference_faces": len(reference),
        "decision": report.summary,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, required=True, help="a project folder with mlflow.db and a champion")
    parser.add_argument("--seconds", type=float, default=30.0, help="load time per round and client count")
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--scenes", type=int, default=30)
    args = parser.parse_args()
    store = args.store.resolve()
    work = Path(tempfile.mkdtemp(prefix="agegender-monitoring-bench-"))
    try:
        results = {"machine": {"cpus": os.cpu_count()}, "store": str(store)}
        results["service"] = service_cost(store, make_scenes(store, args.scenes), args.seconds, work)
        print(json.dumps(results["service"]["summary"], indent=2), flush=True)
        results["drift_check"] = drift_cost(store, args.records, work)
        print(json.dumps(results["drift_check"], indent=2), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
