"""`bentoml serve` under load, and the full detect -> crop -> predict path on real faces.

Needs a registered real-data champion: run `benchmarks/train_quality.py --store DIR --register` first.
Run: .venv/bin/python benchmarks/service.py --store DIR [--seconds 20] [--scenes 60]

Scenes: test-split UTKFace chips of that model, three per image, pasted at known positions
onto 600x240 backgrounds (benchmarks/scenes.py). Measures:
  * in-process Predictor on one scene (decode included) vs the service's p50 at 1 client;
  * 1, 8 and 32 concurrent clients for a bounded time, with adaptive batching on
    (serve.max_batch_size from params.yaml) and off (max_batch_size 1): p50/p95/p99,
    requests/s, errors, and the throughput gain of batching at 32 clients;
  * detection recall, age MAE and gender accuracy through the service's path on the scenes,
    against the same chips scored as the test split is (the gap).
Writes benchmarks/results/service.json. Clients run on the same 2-core machine as the server.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.scenes import compose, match_faces  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "service.json"
BIN = Path(sys.executable).parent


def make_scenes(store: Path, count: int) -> list[dict]:
    """`count` scenes of three test-split chips each, with their labels and positions."""
    split = pd.read_csv(store / "artifacts/prepared/split.csv")
    test = split[split["split"] == "test"].sample(n=count * 3, random_state=0).reset_index(drop=True)
    rng = np.random.default_rng(0)
    scenes = []
    for index in range(count):
        rows = test.iloc[index * 3 : index * 3 + 3]
        chips = [cv2.imread(str(store / "data" / f)) for f in rows["file"]]
        image, boxes = compose(chips, rng)
        scenes.append(
            {
                "jpeg": cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes(),
                "boxes": boxes,
                "chips": chips,
                "age": rows["age"].tolist(),
                "gender": rows["gender"].tolist(),
            }
        )
    return scenes


def post_image(url: str, data: bytes) -> tuple[int, bytes]:
    boundary = uuid.uuid4().hex
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="scene.jpg"\r\n'
            "Content-Type: image/jpeg\r\n\r\n"
        ).encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )
    request = urllib.request.Request(f"{url}/predict", data=body, method="POST")
    request.add_header("Content-Type", f"multipart/form-data; boundary={boundary}")
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()
    except OSError as err:
        return 599, str(err).encode()


def load(url: str, scenes: list[dict], clients: int, seconds: float) -> dict:
    """`clients` threads posting scenes back to back for `seconds`."""
    latencies, errors, lock = [], [], threading.Lock()
    deadline = time.perf_counter() + seconds

    def client(offset: int) -> None:
        index = offset
        while time.perf_counter() < deadline:
            start = time.perf_counter()
            status, body = post_image(url, scenes[index % len(scenes)]["jpeg"])
            elapsed = time.perf_counter() - start
            with lock:
                (latencies if status == 200 else errors).append(elapsed if status == 200 else status)
            index += clients

    started = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    ms = np.array(latencies) * 1000
    return {
        "clients": clients,
        "requests": len(latencies),
        "errors": len(errors),
        "error_statuses": sorted(set(errors)),
        "requests_per_s": round(len(latencies) / wall, 2),
        "p50_ms": round(float(np.percentile(ms, 50)), 1) if len(ms) else None,
        "p95_ms": round(float(np.percentile(ms, 95)), 1) if len(ms) else None,
        "p99_ms": round(float(np.percentile(ms, 99)), 1) if len(ms) else None,
    }


def ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/readyz", timeout=5) as response:
            return response.status == 200
    except OSError:
        return False


@contextlib.contextmanager
def bentoml_serve(params_file: Path, port: int, env: dict, log_path: Path) -> Iterator[subprocess.Popen]:
    """`bentoml serve` of the repository's service on 127.0.0.1:port, yielded once /readyz answers; stopped on exit."""
    command = [str(BIN / "bentoml"), "serve", "service.service:AgeGender", "--host", "127.0.0.1", "--port", str(port)]
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [*command, "--arg", f"params={params_file}"],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 300
        while not ready(f"http://127.0.0.1:{port}"):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"bentoml serve did not start; see {log_path}")
            time.sleep(1)
        yield process
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:  # bentoml 1.4 sometimes hangs in shutdown after heavy load
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)


def serve_and_load(store: Path, scenes: list[dict], max_batch_size: int, seconds: float, work: Path) -> dict:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["serve"]["max_batch_size"] = max_batch_size
    params_file = work / f"params-batch{max_batch_size}.yaml"
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))
    port = 3700 + max_batch_size
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{store / 'mlflow.db'}"}
    with bentoml_serve(params_file, port, env, work / f"serve-batch{max_batch_size}.log") as process:
        load(url, scenes, 4, 5)  # warm-up: graph tracing, connection pools
        runs = {}
        for clients in (1, 8, 32):
            print(f"  max_batch_size={max_batch_size}: {clients} clients for {seconds} s", flush=True)
            runs[str(clients)] = load(url, scenes, clients, seconds)
        runs["server_alive_after"] = process.poll() is None
        return runs


def path_quality(predictor, scenes: list[dict]) -> dict:
    """Recall, age MAE and gender accuracy through detect -> crop -> predict vs the same chips as chips."""
    from agegender.evaluation import compute_metrics
    from agegender.images import FILE_LIMITS, decode_image

    found, ages, true_age, genders, true_gender, n = 0, [], [], [], [], 0
    for scene in scenes:
        faces = predictor.predict_image(decode_image(scene["jpeg"], FILE_LIMITS))
        for match, age, gender in zip(match_faces(faces, scene["boxes"]), scene["age"], scene["gender"], strict=True):
            n += 1
            if match is None:
                continue
            found += 1
            ages.append(match["age"])
            true_age.append(age)
            genders.append(1 if match["gender"] == "female" else 0)
            true_gender.append(gender)
    chip_images = [chip for scene in scenes for chip in scene["chips"]]
    chip_age, chip_female = predictor.predict_chips(chip_images)
    labels_age = np.array([a for s in scenes for a in s["age"]], float)
    labels_gender = np.array([g for s in scenes for g in s["gender"]], int)
    chips = compute_metrics(
        age_true=labels_age,
        age_pred=chip_age,
        gender_true=labels_gender,
        female_prob=chip_female,
        race=np.full(len(labels_age), -1),
        age_buckets=[0, 100],
    )
    scene_mae = float(np.mean(np.abs(np.array(ages) - np.array(true_age))))
    scene_acc = float(np.mean(np.array(genders) == np.array(true_gender)))
    return {
        "faces": n,
        "detection_recall": round(found / n, 4),
        "scenes": {"age_mae": round(scene_mae, 3), "gender_accuracy": round(scene_acc, 4)},
        "same_faces_as_chips": {"age_mae": chips["age_mae"], "gender_accuracy": chips["gender_accuracy"]},
        "gap_age_mae": round(scene_mae - chips["age_mae"], 3),
        "gap_gender_accuracy": round(scene_acc - chips["gender_accuracy"], 4),
    }


def in_process_ms(predictor, scene: dict, repeats: int = 40) -> float:
    from agegender.images import FILE_LIMITS, decode_image

    def once() -> None:
        predictor.predict_image(decode_image(scene["jpeg"], FILE_LIMITS))

    for _ in range(3):
        once()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        once()
        times.append(time.perf_counter() - start)
    return round(statistics.median(times) * 1000, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--store", type=Path, required=True, help="folder made by train_quality.py --store DIR --register"
    )
    parser.add_argument("--seconds", type=float, default=20.0, help="load time per concurrency level")
    parser.add_argument("--scenes", type=int, default=60)
    args = parser.parse_args()
    store = args.store.resolve()
    work = store / "service-bench"
    work.mkdir(exist_ok=True)

    from agegender.inference import Predictor
    from agegender.tracking import configure_tracking

    print(f"Composing {args.scenes} scenes from the test split in {store}", flush=True)
    scenes = make_scenes(store, args.scenes)
    configure_tracking(store, f"sqlite:///{store / 'mlflow.db'}")
    predictor = Predictor.from_registry("models:/agegender@champion")
    print("Scoring the detect -> crop -> predict path in process", flush=True)
    quality = path_quality(predictor, scenes)
    local_ms = in_process_ms(predictor, scenes[0])
    del predictor

    batched = serve_and_load(store, scenes, 32, args.seconds, work)
    single = serve_and_load(store, scenes, 1, args.seconds, work)
    result = {
        "model": f"models:/agegender@champion in {store.name} (benchmarks/train_quality.py --store --register)",
        "scene": "3 test-split chips at 160 px on a 600x240 background, JPEG",
        "seconds_per_level": args.seconds,
        "in_process_p50_ms": local_ms,
        "batching_on": batched,
        "batching_off": single,
        "ratio_service_p50_c1_over_in_process": round(batched["1"]["p50_ms"] / local_ms, 2),
        "batching_gain_requests_per_s_at_32": round(
            batched["32"]["requests_per_s"] / single["32"]["requests_per_s"], 2
        ),
        "path_quality": quality,
        "machine": {"cpus": os.cpu_count(), "load_average_at_end": os.getloadavg()},
        "note": "clients share the 2 cores with the server",
    }
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
