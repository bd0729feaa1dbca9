"""The cost of monitoring: the service's latency with and without it, and the drift check on 100,000 records.

Needs a folder with a registered champion trained since drift references exist (its run has
outputs/reference.csv) and the data it was trained on: a project after `dvc repro`, or
`benchmarks/train_quality.py --store DIR --register`.
Run: .venv/bin/python benchmarks/monitoring.py --store DIR [--seconds 15] [--rounds 6] [--records 100000]

  * two `bentoml serve`, monitor.enabled false and true, both up and asked in turns (off, on,
    on, off, ...) so a change in the machine's load hits both: p50/p95 at 1 and 8 clients on
    three-face scenes (benchmarks/scenes.py), the cost per round and its median; and in
    process, without HTTP and the machine's noise, the milliseconds monitoring adds per scene;
  * 100,000 served-input records (faces drawn from the champion's reference, ages shifted for
    the second half of the day) written by the service's RecordWriter, then the drift check's
    parts: reading the window, comparing it with the reference, the HTML report; and the
    whole Prefect drift flow (its temporary Prefect server included).
Writes benchmarks/results/monitoring.json. Clients run on the same 2-core machine as the server.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
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
from benchmarks.service import bentoml_serve, load, make_scenes  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "monitoring.json"


@contextlib.contextmanager
def serving(store: Path, enabled: bool, work: Path, port: int):
    """A `bentoml serve` of the store's champion with monitor.enabled as given; yields its URL."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["monitor"].update({"enabled": enabled, "records": str(work / f"records-{port}")})
    params_file = work / f"params-{port}.yaml"
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))
    url = f"http://127.0.0.1:{port}"
    # Each server a BENTOML_HOME of its own: a start empties the home's Prometheus folder.
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": f"sqlite:///{store / 'mlflow.db'}",
        "BENTOML_HOME": str(work / f"bentoml-{port}"),
    }
    with bentoml_serve(params_file, port, env, work / f"serve-{port}.log"):
        yield url


def service_cost(store: Path, scenes: list[dict], seconds: float, rounds: int, work: Path) -> dict:
    """Both servers up (idle when not asked), asked in turns, so a change in the machine's load hits both."""
    results = {False: {"1": [], "8": []}, True: {"1": [], "8": []}}
    with serving(store, False, work, 3801) as off, serving(store, True, work, 3802) as on:
        for url in (off, on):
            load(url, scenes, 4, 5)  # warm-up: graph tracing, connection pools
        for index in range(rounds):
            order = [(False, off), (True, on)] if index % 2 == 0 else [(True, on), (False, off)]
            for enabled, url in order:
                for clients in (1, 8):
                    print(f"  round {index + 1}: monitor.enabled={enabled}, {clients} clients", flush=True)
                    results[enabled][str(clients)].append(load(url, scenes, clients, seconds))
    records = sum(len(f.read_text().splitlines()) for f in (work / "records-3802").rglob("*.jsonl"))
    summary = {"rounds": rounds, "seconds_per_turn": seconds, "records_written_with_monitoring": records}
    for clients in ("1", "8"):
        pairs = zip(results[False][clients], results[True][clients], strict=True)
        costs = [100 * (b["p50_ms"] - a["p50_ms"]) / a["p50_ms"] for a, b in pairs]
        summary[f"{clients}_clients"] = {
            "p50_ms_off": [r["p50_ms"] for r in results[False][clients]],
            "p50_ms_on": [r["p50_ms"] for r in results[True][clients]],
            "p95_ms_off": [r["p95_ms"] for r in results[False][clients]],
            "p95_ms_on": [r["p95_ms"] for r in results[True][clients]],
            "errors": sum(r["errors"] for r in results[False][clients] + results[True][clients]),
            "error_statuses": sorted(
                {c for r in results[False][clients] + results[True][clients] for c in r["error_statuses"]}
            ),
            "p50_cost_percent_per_round": [round(c, 1) for c in costs],
            "p50_cost_percent_median": round(statistics.median(costs), 1),
        }
    return summary


def in_process_cost(store: Path, scenes: list[dict], work: Path, repeats: int = 60) -> dict:
    """What monitoring adds per request without HTTP: the crop statistics and the front's part
    (metrics and the record), each timed on its own; and, as a check, the model path with and
    without the statistics, timed in turns so the machine's load hits both."""
    import cv2

    from agegender.faces import crop_face
    from agegender.inference import Predictor
    from agegender.monitoring import RecordWriter, crop_stats, image_record, service_metrics
    from agegender.tracking import configure_tracking

    configure_tracking(store, f"sqlite:///{store / 'mlflow.db'}")
    predictor = Predictor.from_registry("models:/agegender@champion")
    images = [cv2.imdecode(np.frombuffer(s["jpeg"], np.uint8), cv2.IMREAD_COLOR) for s in scenes]
    predictor.predict_images(images[:1])  # warm-up
    times = {False: [], True: []}
    for index in range(repeats):
        for observe in (False, True) if index % 2 == 0 else (True, False):
            started = time.perf_counter()
            predictor.predict_images([images[index % len(images)]], observe=observe)
            times[observe].append(time.perf_counter() - started)
    plain, observed = (statistics.median(times[flag]) * 1000 for flag in (False, True))

    faces = predictor.predict_images(images[:1], observe=True)[0]
    boxes = predictor.detector.detect(images[0])
    size, margin = predictor.spec.image_size, predictor.spec.margin
    crops = np.stack([crop_face(images[0], box, margin=margin, size=size) for box in boxes])
    started = time.perf_counter()
    for _ in range(500):
        crop_stats(crops)
    stats = (time.perf_counter() - started) / 500 * 1000
    metrics, model = service_metrics(), predictor.describe()
    writer = RecordWriter(str(work / "records-in-process"), batch_records=200, flush_seconds=60)
    started = time.perf_counter()
    for _ in range(2000):
        metrics.observe([(640, 480)], [faces], model, 0.001)
        writer.add(image_record(request="r", route="predict", width=640, height=480, faces=faces, model=model))
    front = (time.perf_counter() - started) / 2000 * 1000
    writer.close()
    return {
        "faces_per_scene": len(faces),
        "crop_px": size,
        "crop_stats_ms": round(stats, 3),
        "metrics_and_record_ms": round(front, 3),
        "monitoring_ms": round(stats + front, 3),
        "predict_ms": round(plain, 2),
        "monitoring_percent_of_predict": round(100 * (stats + front) / plain, 2),
        "check_predict_with_crop_stats_ms": round(observed, 2),
    }


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
    report = check_drift(
        reference, window, settings.drift, model=f"agegender v{version.version}", start=str(since), end=str(until)
    )
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
    parser.add_argument("--seconds", type=float, default=15.0, help="load time per turn (server, client count)")
    parser.add_argument("--rounds", type=int, default=6, help="turns of each server at 1 and 8 clients")
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--scenes", type=int, default=30)
    args = parser.parse_args()
    store = args.store.resolve()
    work = Path(tempfile.mkdtemp(prefix="agegender-monitoring-bench-"))
    try:
        results = {"machine": {"cpus": os.cpu_count()}, "store": str(store)}
        scenes = make_scenes(store, args.scenes)
        results["in_process"] = in_process_cost(store, scenes, work)
        print(json.dumps(results["in_process"], indent=2), flush=True)
        results["service"] = service_cost(store, scenes, args.seconds, args.rounds, work)
        print(json.dumps(results["service"], indent=2), flush=True)
        results["drift_check"] = drift_cost(store, args.records, work)
        print(json.dumps(results["drift_check"], indent=2), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
