"""Soak: `bentoml serve` under mixed valid and hostile traffic for minutes; 5xx, latency, memory growth.

Needs a registered champion: --store DIR, a folder with mlflow.db (benchmarks/train_quality.py
--store DIR --register, or a project repository after `dvc repro`). Served with the project's params.yaml.
Run: .venv/bin/python benchmarks/soak.py --store DIR [--minutes 10] [--clients 32]

Each client cycles through the same mix: valid scenes (three UTKFace chips on a background) to
/predict, /annotate and /predict_batch, and hostile requests (a URL in a text field, non-image
bytes, a truncated JPEG, a decompression bomb, a 300-byte file name, two files for /predict,
a wrong content type). Records every status per kind (no 5xx but 503 load shedding), p50/p95 of the valid
requests, and the RSS of every service process every 15 s: growth per 1,000 requests is the
slope after the first fifth of the run (warm-up). Writes benchmarks/results/soak.json.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import cv2
import numpy as np
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.scenes import compose  # noqa: E402
from benchmarks.service import bentoml_serve  # noqa: E402
from tests.conftest import utkface_files  # noqa: E402
from tests.unit.test_decode import bomb_png  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "soak.json"
SAMPLE_SECONDS = 15


def multipart(parts: list[tuple[str, str | None, bytes]]) -> tuple[bytes, str]:
    """(body, content type) of a form; a part with no file name is a text field."""
    boundary = uuid.uuid4().hex
    body = b""
    for name, filename, data in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        body += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + data + b"\r\n"
    return body + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def make_mix(scenes: list[bytes]) -> list[tuple[str, str, bytes, str, bool]]:
    """(kind, route, body, content type, valid) for one pass of a client."""
    chip = utkface_files(1)[0].read_bytes()
    mix = []
    for index, scene in enumerate(scenes):
        mix.append(("predict", "predict", *multipart([("image", "scene.jpg", scene)]), True))
        if index % 3 == 0:
            mix.append(("annotate", "annotate", *multipart([("image", "scene.jpg", scene)]), True))
        if index % 4 == 0:
            batch = [("images", f"{i}.jpg", s) for i, s in enumerate(scenes[index : index + 3])]
            mix.append(("predict_batch", "predict_batch", *multipart(batch), True))
    hostile = {
        "url in a text field": [("image", None, b"http://127.0.0.1:9/photo.jpg")],
        "not an image": [("image", "a.jpg", b"%PDF-1.4 not an image")],
        "truncated jpeg": [("image", "a.jpg", chip[: len(chip) // 2])],
        "decompression bomb": [("image", "a.png", bomb_png(30000))],
        "300-byte file name": [("image", "a" * 296 + ".jpg", chip)],
        "two files for /predict": [("image", "a.jpg", chip), ("image", "b.jpg", chip)],
    }
    for kind, parts in hostile.items():
        mix.append((kind, "predict", *multipart(parts), kind == "300-byte file name"))
    mix.append(("wrong content type", "predict", chip, "image/jpeg", False))
    return mix


def post(url: str, route: str, body: bytes, content_type: str) -> int:
    request = urllib.request.Request(f"{url}/{route}", data=body, method="POST")
    request.add_header("Content-Type", content_type)
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            response.read()
            return response.status
    except urllib.error.HTTPError as err:
        err.read()
        return err.code
    except OSError:
        return 599  # no HTTP answer at all (reset, timeout): counted as a server failure


def service_processes(arbiter: int) -> dict[str, psutil.Process]:
    """The arbiter and each worker, named by the service it runs."""
    named = {"arbiter": psutil.Process(arbiter)}
    for child in named["arbiter"].children(recursive=True):
        command = " ".join(child.cmdline())
        named[next((s for s in ("FaceModel", "AgeGender") if s in command), f"pid {child.pid}")] = child
    return named


def rss_mb(processes: dict[str, psutil.Process]) -> dict[str, float]:
    return {name: round(p.memory_info().rss / 2**20, 1) for name, p in processes.items()}


def soak(url: str, mix: list, clients: int, seconds: float, processes: dict) -> dict:
    statuses: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    latencies, lock, done = [], threading.Lock(), [0]
    deadline = time.monotonic() + seconds

    def client(offset: int) -> None:
        index = offset
        while time.monotonic() < deadline:
            kind, route, body, content_type, valid = mix[index % len(mix)]
            started = time.perf_counter()
            status = post(url, route, body, content_type)
            with lock:
                statuses[kind][status] += 1
                done[0] += 1
                if valid and status == 200:
                    latencies.append(time.perf_counter() - started)
            index += 1

    threads = [threading.Thread(target=client, args=(i * 7,)) for i in range(clients)]
    samples, started = [], time.monotonic()
    for thread in threads:
        thread.start()
    while any(thread.is_alive() for thread in threads):
        with lock:
            count = done[0]
        samples.append({"s": round(time.monotonic() - started), "requests": count, "rss_mb": rss_mb(processes)})
        time.sleep(min(SAMPLE_SECONDS, max(deadline - time.monotonic(), 0) + 1))
    for thread in threads:
        thread.join()
    samples.append({"s": round(time.monotonic() - started), "requests": done[0], "rss_mb": rss_mb(processes)})
    ms = np.array(latencies) * 1000
    by_kind = {kind: dict(sorted(counts.items())) for kind, counts in sorted(statuses.items())}
    return {
        "requests": done[0],
        "requests_per_s": round(done[0] / (time.monotonic() - started), 2),
        **count_5xx(by_kind),
        "statuses_by_kind": by_kind,
        "valid_p50_ms": round(float(np.percentile(ms, 50)), 1),
        "valid_p95_ms": round(float(np.percentile(ms, 95)), 1),
        "rss_samples": samples,
        "rss_growth_kb_per_1000_requests_after_warmup": growth(samples),
    }


def count_5xx(by_kind: dict[str, dict[int, int]]) -> dict[str, int]:
    """Server faults (5xx other than 503; must be 0) apart from requests shed under load (503 + Retry-After)."""
    codes = [(int(code), n) for counts in by_kind.values() for code, n in counts.items()]
    return {
        "status_5xx_faults": sum(n for code, n in codes if code >= 500 and code != 503),
        "status_503_shed": sum(n for code, n in codes if code == 503),
    }


def growth(samples: list[dict]) -> dict[str, float]:
    """Per process, the least-squares slope of RSS over requests served, past the first fifth (warm-up)."""
    later = samples[len(samples) // 5 :]
    requests = np.array([s["requests"] for s in later], float)
    slopes = {}
    for name in later[0]["rss_mb"]:
        rss_kb = np.array([s["rss_mb"][name] * 1024 for s in later])
        slopes[name] = round(float(np.polyfit(requests, rss_kb, 1)[0] * 1000), 1) if np.ptp(requests) else 0.0
    return slopes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, required=True, help="a folder with mlflow.db and a champion")
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--port", type=int, default=3790)
    args = parser.parse_args()
    store = args.store.resolve()
    rng = np.random.default_rng(0)
    chips = [cv2.imread(str(p)) for p in utkface_files(36, offset=5)]
    scenes = [
        cv2.imencode(".jpg", compose(chips[i : i + 3], rng)[0], [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes()
        for i in range(0, len(chips), 3)
    ]
    mix = make_mix(scenes)
    url = f"http://127.0.0.1:{args.port}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{store / 'mlflow.db'}"}
    log_path = store / "soak-serve.log"
    with bentoml_serve(ROOT / "params.yaml", args.port, env, log_path) as process:
        processes = service_processes(process.pid)
        print(f"Soaking {url} with {args.clients} clients for {args.minutes} min; RSS {rss_mb(processes)}", flush=True)
        result = soak(url, mix, args.clients, args.minutes * 60, processes)
        result["server_alive_after"] = process.poll() is None
    result = {
        "model": f"models:/agegender@champion in {store.name}",
        "minutes": args.minutes,
        "clients": args.clients,
        "mix_per_pass": collections.Counter(kind for kind, *_ in mix),
        **result,
        "machine": {"cpus": os.cpu_count(), "load_average_at_end": os.getloadavg()},
        "note": "clients share the 2 cores with the server",
    }
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "rss_samples"}, indent=2))


if __name__ == "__main__":
    main()
