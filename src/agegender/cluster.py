"""Work on a Dask cluster (scale.dask_scheduler): the client, and face detection in shards.

The images' bytes travel inside each task, so workers need this package and its environment
(uv.lock), not the project's files. Dask re-runs the task of a lost worker on another one.
"""

from __future__ import annotations

import functools
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from distributed import Client, as_completed
from rich.progress import track

from agegender.config import PreprocessParams
from agegender.faces import Detector, make_detector

CONNECT_SECONDS = 30  # a scheduler that does not answer in this long is taken as unreachable
WORKER_SECONDS = 120  # a cluster with no worker after this long would wait forever: fail instead


class ClusterError(RuntimeError, ValueError):
    """scale.dask_scheduler names no usable cluster: a bad setting to every stage command that reports one."""


def connect(address: str) -> Client:
    """A client of the scheduler at `address` with at least one worker; a clear error otherwise."""
    try:
        client = Client(address, timeout=CONNECT_SECONDS, set_as_default=False)
    except (OSError, TimeoutError) as err:
        raise ClusterError(f"cannot reach the Dask scheduler at {address} (scale.dask_scheduler): {err}") from None
    try:
        client.wait_for_workers(1, timeout=WORKER_SECONDS)
    except TimeoutError:
        client.close()
        raise ClusterError(
            f"the Dask scheduler at {address} (scale.dask_scheduler) has no worker after {WORKER_SECONDS} s; "
            f"start one with `dask worker {address} --nthreads 1`"
        ) from None
    return client


@functools.cache
def worker_detector(name: str) -> Detector:
    """The detector of this worker process, built by its first shard and kept for the others."""
    return make_detector(name)


def crop_shard(images: list[tuple[str, bytes]], params: PreprocessParams) -> tuple[np.ndarray, np.ndarray]:
    """A Dask task: (name, image bytes) pairs -> their crops and which ones fell back, in order."""
    from agegender.preprocess import crop_image

    detector = worker_detector(params.detector)
    results = [crop_image(detector, name, data, params) for name, data in images]
    return np.stack([crop for crop, _ in results]), np.array([used for _, used in results])


def crop_on_cluster(
    address: str, files: list[Path], params: PreprocessParams, shard_images: int
) -> tuple[np.ndarray, np.ndarray]:
    """crop_all on the cluster's workers: shards of `shard_images` files, results in the files' order."""
    shards = [files[start : start + shard_images] for start in range(0, len(files), shard_images)]
    crops = np.empty((len(files), params.image_size, params.image_size, 3), np.uint8)
    fallback = np.empty(len(files), bool)
    with connect(address) as client:
        done = track(
            finished_shards(client, shards, params),
            total=len(shards),
            description=f"Detecting and cropping faces on the Dask cluster at {address}",
        )
        for index, (shard_crops, shard_fallback) in done:
            start = index * shard_images
            crops[start : start + len(shard_crops)] = shard_crops
            fallback[start : start + len(shard_crops)] = shard_fallback
    return crops, fallback


def finished_shards(
    client: Client, shards: list[list[Path]], params: PreprocessParams
) -> Iterator[tuple[int, tuple[np.ndarray, np.ndarray]]]:
    """(shard index, result) as shards finish. Two shards per worker thread are in flight, so the
    images read into memory stay bounded however many there are, and no worker waits for work."""
    window = 2 * max(1, sum(client.nthreads().values()))
    run = uuid.uuid4().hex[:8]  # keys unique to this run: another run on the cluster has other images
    todo = iter(enumerate(shards))
    index_of: dict[str, int] = {}

    def submit_next(pending: as_completed) -> None:
        for index, paths in todo:
            images = [(str(path), path.read_bytes()) for path in paths]
            future = client.submit(crop_shard, images, params, key=f"crop-shard-{run}-{index}")
            index_of[future.key] = index
            pending.add(future)
            return

    pending = as_completed(loop=client.loop)
    for _ in range(window):
        submit_next(pending)
    for future in pending:
        result = future.result()  # re-raises a shard's error, naming the image
        yield index_of.pop(future.key), result
        future.release()
        submit_next(pending)
