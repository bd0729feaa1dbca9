"""What production sees: crop statistics, the service's Prometheus metrics, served-input records.

The crop statistics are computed by one function on the model's input, so the service (on
every face it answers) and training (on the training crops, the drift reference) measure
the same thing. A record is one served image: its size, the model version, and per face the
box side, detector score, crop statistics and predictions; never pixels, unless
`monitor.store_uploads` says so. Records are written in batches (JSON Lines) to a folder or
any fsspec URL (s3://... in team mode) by a background thread, so a request never waits for
storage and a storage failure never fails a request.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

log = logging.getLogger(__name__)

CROP_STATS = ("brightness", "contrast", "sharpness")
# BT.601 luma weights in OpenCV's BGR order, as cv2.cvtColor(..., COLOR_BGR2GRAY) uses.
LUMA_BGR = np.float32([0.114, 0.587, 0.299])
RECORD_SUFFIX = ".jsonl"


def crop_stats(crops: np.ndarray) -> dict[str, np.ndarray]:
    """Per crop (uint8 BGR, N x S x S x 3): brightness (mean gray level, 0..255), contrast (its
    standard deviation) and sharpness (variance of the Laplacian: blur and low resolution lower it)."""
    gray = np.asarray(crops, np.float32) @ LUMA_BGR
    if len(gray) == 0:
        return {name: np.zeros(0, np.float32) for name in CROP_STATS}
    return {
        "brightness": gray.mean(axis=(1, 2)),
        "contrast": gray.std(axis=(1, 2)),
        "sharpness": np.array([cv2.Laplacian(g, cv2.CV_32F).var() for g in gray], np.float32),
    }


def reference_table(crops: np.ndarray, ages: np.ndarray, female: np.ndarray) -> pd.DataFrame:
    """The drift reference: crop statistics and predictions, one row per training crop."""
    table = pd.DataFrame({name: values.round(3) for name, values in crop_stats(crops).items()})
    table["age"], table["female"] = np.round(ages, 2), np.round(female, 4)
    return table


def face_observation(stats: dict[str, np.ndarray], index: int, female: float) -> dict[str, float]:
    """What a record keeps of one face's crop beyond the answer: its statistics and P(female)."""
    return {name: round(float(stats[name][index]), 3) for name in CROP_STATS} | {"female": round(female, 4)}


def image_record(*, request: str, route: str, width: int, height: int, faces: list[dict], model: dict) -> dict:
    """One served image as a record; `faces` are the model service's, each with its `observed` statistics."""
    return {
        "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
        "request": request,
        "route": route,
        "model_version": model["version"],
        "data_version": model["data_version"],
        "width": width,
        "height": height,
        "faces": [
            {"side": max(f["box"][2], f["box"][3]), "score": f["detection_score"], "age": f["age"], **f["observed"]}
            for f in faces
        ],
    }


def faces_table(records: list[dict]) -> pd.DataFrame:
    """One row per served face: the record's time and model version, the face's statistics and predictions."""
    rows = [{"time": r["time"], "model_version": r["model_version"], **face} for r in records for face in r["faces"]]
    return pd.DataFrame(rows, columns=["time", "model_version", "side", "score", "age", *CROP_STATS, "female"])


class RecordWriter:
    """Buffers records and writes them in batches from a background thread.

    A batch of at most `batch_records` records is written when it is full or its first
    record is `flush_seconds` old, and on close. Each batch is one file
    `URL/YYYY-MM-DD/<UTC time>-<id>.jsonl`; a folder gets it by rename, so readers never
    see half a file (an object store writes objects whole anyway). A failed write is
    logged and its batch dropped (`on_drop` gets the count): memory stays bounded and
    serving goes on.
    """

    def __init__(
        self, url: str, *, batch_records: int, flush_seconds: float, on_drop: Callable[[int], object] = lambda n: None
    ) -> None:
        import fsspec

        self.fs, self.root = fsspec.core.url_to_fs(url)
        self.local = "file" in self.fs.protocol
        self.batch_records, self.flush_seconds = batch_records, flush_seconds
        self.pending: list[tuple[dict, bytes | None]] = []
        self.first_at = 0.0
        self.closing = False
        self.on_drop = on_drop
        self.cond = threading.Condition()
        self.thread = threading.Thread(target=self.run, daemon=True, name="record-writer")
        self.thread.start()

    def add(self, record: dict, upload: bytes | None = None) -> None:
        """Queue a record (and the uploaded bytes, when they are to be stored); never blocks on storage."""
        if upload is not None:
            record["upload"] = f"uploads/{record['time'][:10]}/{uuid.uuid4().hex}"
        with self.cond:
            if not self.pending:
                self.first_at = time.monotonic()
            self.pending.append((record, upload))
            if len(self.pending) in (1, self.batch_records):  # the first starts the batch's clock
                self.cond.notify()

    def run(self) -> None:
        while True:
            with self.cond:
                while not self.closing and not self.due():
                    left = self.first_at + self.flush_seconds - time.monotonic() if self.pending else None
                    self.cond.wait(timeout=left)
                batch, self.pending = self.pending[: self.batch_records], self.pending[self.batch_records :]
                self.first_at = time.monotonic()  # the rest's clock starts now
                closing = self.closing and not self.pending
            if batch:
                self.write(batch)
            if closing:
                return

    def due(self) -> bool:
        full = len(self.pending) >= self.batch_records
        return full or bool(self.pending) and time.monotonic() - self.first_at >= self.flush_seconds

    def write(self, batch: list[tuple[dict, bytes | None]]) -> None:
        now = datetime.now(UTC)
        name = f"{now:%Y-%m-%d}/{now:%Y%m%dT%H%M%S.%f}-{uuid.uuid4().hex[:8]}{RECORD_SUFFIX}"
        data = "".join(json.dumps(r, separators=(",", ":")) + "\n" for r, _ in batch).encode()
        try:
            for record, upload in batch:
                if upload is not None:
                    self.put(record["upload"], upload)
            self.put(name, data)
        except Exception:  # storage must never take serving down: log, count, go on
            self.on_drop(len(batch))
            log.exception("could not write %d served-input records to %s", len(batch), self.root)

    def put(self, name: str, data: bytes) -> None:
        path = f"{self.root}/{name}"
        if not self.local:
            self.fs.pipe_file(path, data)
            return
        folder = os.path.dirname(path)
        self.fs.makedirs(folder, exist_ok=True)
        staging = f"{folder}/.{os.path.basename(path)}.tmp"
        self.fs.pipe_file(staging, data)
        self.fs.mv(staging, path)

    def close(self, timeout: float = 60.0) -> None:
        """Write what is pending and stop the thread."""
        with self.cond:
            self.closing = True
            self.cond.notify()
        self.thread.join(timeout)


def read_records(url: str, *, since: datetime, until: datetime) -> list[dict]:
    """The records served between `since` and `until` (aware datetimes), oldest first."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(url)
    since, until = since.astimezone(UTC), until.astimezone(UTC)  # records hold UTC times, compared as text
    files = []
    day = since.date()
    while day <= until.date() + timedelta(days=1):  # a batch is written after its records: maybe the next day
        folder = f"{root}/{day:%Y-%m-%d}"
        if fs.isdir(folder):
            files += [f for f in fs.ls(folder, detail=False) if f.endswith(RECORD_SUFFIX)]
        day += timedelta(days=1)
    low, high = since.isoformat(timespec="milliseconds"), until.isoformat(timespec="milliseconds")
    records = []
    for path in sorted(files):
        with fs.open(path, "rb") as handle:
            records += [r for r in map(json.loads, handle) if low <= r["time"] <= high]
    return sorted(records, key=lambda r: r["time"])


def records_url(url: str, root: Path) -> str:
    """monitor.records as a URL or absolute path: a relative folder is the project's."""
    return url if "://" in url else str((root / url).resolve())


# Prometheus histogram buckets, in the units of each metric.
FACE_SIDE_BUCKETS = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 1024)
AGE_BUCKETS = (3, 6, 10, 14, 18, 25, 30, 35, 40, 50, 60, 70, 80, 100)
SCORE_BUCKETS = (0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999, 1.0)
MEGAPIXEL_BUCKETS = (0.01, 0.05, 0.1, 0.3, 0.5, 1, 2, 4, 8, 12, 20, 40)
COUNT_BUCKETS = (0, 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)
QUEUE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class ServiceMetrics:
    """The project's own metrics, beside BentoML's on the service's /metrics.

    prometheus_client is imported here, at first use in a serving worker: BentoML sets up
    its multiprocess mode (PROMETHEUS_MULTIPROC_DIR) before that, so every worker's values
    reach /metrics.
    """

    def __init__(self) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        self.images = Histogram("agegender_images_per_request", "Images in a request", buckets=COUNT_BUCKETS[1:])
        self.faces = Histogram("agegender_faces_per_request", "Faces found in a request", buckets=COUNT_BUCKETS)
        self.score = Histogram("agegender_detection_score", "Face detector score of each face", buckets=SCORE_BUCKETS)
        self.side = Histogram("agegender_face_side_pixels", "Face box side, image pixels", buckets=FACE_SIDE_BUCKETS)
        self.age = Histogram("agegender_predicted_age_years", "Predicted age of each face", buckets=AGE_BUCKETS)
        self.gender = Counter("agegender_predicted_gender", "Faces by predicted gender", ["gender"])
        self.megapixels = Histogram("agegender_image_megapixels", "Decoded image size", buckets=MEGAPIXEL_BUCKETS)
        self.refusals = Counter("agegender_refusals", "Requests refused, by reason", ["reason", "status"])
        self.queue = Histogram("agegender_queue_seconds", "Upload received to worker start", buckets=QUEUE_BUCKETS)
        self.answered = Counter("agegender_images_answered", "Images answered, by model version", ["version"])
        self.version = Gauge("agegender_model_version", "Registered version of the model answering", multiprocess_mode="mostrecent")  # fmt: skip
        self.dropped = Counter("agegender_records_dropped", "Served-input records that could not be written")

    def observe(self, images: list[tuple[int, int]], answers: list[list[dict]], model: dict, queue_s: float) -> None:
        """One answered request: its images' (width, height) and each image's faces."""
        self.images.observe(len(images))
        self.faces.observe(sum(map(len, answers)))
        self.queue.observe(queue_s)
        for width, height in images:
            self.megapixels.observe(width * height / 1e6)
        for face in (f for faces in answers for f in faces):
            self.score.observe(face["detection_score"])
            self.side.observe(max(face["box"][2], face["box"][3]))
            self.age.observe(face["age"])
            self.gender.labels(face["gender"]).inc()
        version = str(model["version"])
        self.answered.labels(version).inc(len(images))
        if version.isdigit():
            self.version.set(int(version))

    def refused(self, reason: str, status: int) -> None:
        self.refusals.labels(reason, str(status)).inc()


@functools.cache
def service_metrics() -> ServiceMetrics:
    """The process's one set of metrics (a metric name may be registered only once per process)."""
    return ServiceMetrics()
