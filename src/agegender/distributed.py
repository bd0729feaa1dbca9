"""Synchronous training across hosts with tf.distribute.MultiWorkerMirroredStrategy.

Every worker host runs the same `agegender train` with its own TF_CONFIG (a Prefect deployment's
job variables set it), naming all workers and this one's index:

    {"cluster": {"worker": ["10.0.0.11:12345", "10.0.0.12:12345"]}, "task": {"type": "worker", "index": 0}}

Worker 0 is the chief: it alone tracks the run in MLflow and writes artifacts/model. The others
take part in every training step and write nothing. Without TF_CONFIG nothing changes.
TensorFlow is imported only inside `strategy_for`, so parsing TF_CONFIG stays cheap.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from dataclasses import dataclass


@dataclass(frozen=True)
class Cluster:
    """The workers of one multi-worker training (host:port each, the chief first) and this process's index."""

    workers: tuple[str, ...]
    index: int

    @property
    def is_chief(self) -> bool:
        return self.index == 0

    @property
    def size(self) -> int:
        return len(self.workers)


def tf_config(workers: list[str], index: int) -> str:
    """The TF_CONFIG of worker `index` in a cluster of these workers (host:port each, the chief first)."""
    return json.dumps({"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}})


def cluster_from_tf_config(text: str | None) -> Cluster | None:
    """The cluster TF_CONFIG describes; None without TF_CONFIG. A malformed one is a ValueError naming the problem."""
    if not text:
        return None
    try:
        config = json.loads(text)
        workers, task = config["cluster"]["worker"], config["task"]
        kind, index = task["type"], task["index"]
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(
            'TF_CONFIG must be JSON like {"cluster": {"worker": ["host:port", ...]}, '
            f'"task": {{"type": "worker", "index": 0}}}}; got {text!r} ({err!r})'
        ) from None
    if set(config["cluster"]) != {"worker"} or kind != "worker":
        raise ValueError(f"TF_CONFIG: only 'worker' tasks are supported (worker 0 is the chief); got {text!r}")
    if not isinstance(workers, list) or not workers or not all(isinstance(w, str) and ":" in w for w in workers):
        raise ValueError(f"TF_CONFIG: cluster.worker must be a list of 'host:port'; got {workers!r}")
    if not isinstance(index, int) or not 0 <= index < len(workers):
        raise ValueError(f"TF_CONFIG: task.index must be 0..{len(workers) - 1}; got {index!r}")
    return Cluster(workers=tuple(workers), index=index)


# Sleeps, then says why and stops the waiting worker; killed once the worker joined.
WATCHDOG = "import os, sys, time; time.sleep(float(sys.argv[2])); print(sys.argv[3], file=sys.stderr); os.kill(int(sys.argv[1]), 9)"


def join(cluster: Cluster, seconds: float) -> None:
    """Set up this worker's part of the cluster, waiting at most `seconds` for the other workers.

    TensorFlow waits for a missing worker without end (one whose host died before training never
    comes) while holding Python's GIL, so no thread of this process can stop the wait: a watchdog
    process names the workers it waited for and stops this one before anything was tracked or written.
    """
    others = ", ".join(w for i, w in enumerate(cluster.workers) if i != cluster.index)
    message = (
        f"error: worker {cluster.index} of {cluster.size} waited scale.join_seconds = {seconds:g} s for the "
        f"other workers ({others}) and not all of them started; nothing was trained or written"
    )
    watchdog = subprocess.Popen([sys.executable, "-I", "-c", WATCHDOG, str(os.getpid()), str(seconds), message])
    try:
        strategy_for(cluster)
    finally:
        watchdog.kill()
        watchdog.wait()


@functools.cache
def strategy_for(cluster: Cluster | None):
    """The tf.distribute strategy to train under: the default one, or MultiWorkerMirroredStrategy for a cluster.

    Cached: collective ops can be set up once per process, and every candidate trains under the same one.
    """
    import tensorflow as tf

    if cluster is None:
        return tf.distribute.get_strategy()
    resolver = tf.distribute.cluster_resolver.SimpleClusterResolver(
        tf.train.ClusterSpec({"worker": list(cluster.workers)}),
        task_type="worker",
        task_id=cluster.index,
        rpc_layer="grpc",
    )
    # One all-reduce of all gradients per step: unpacked, each of the network's ~100 small
    # gradients is a round trip of its own between the hosts.
    packing = tf.distribute.experimental.CommunicationOptions(bytes_per_pack=64 * 2**20)
    return tf.distribute.MultiWorkerMirroredStrategy(cluster_resolver=resolver, communication_options=packing)


def fit_for_multi_worker(fit_model) -> None:
    """Let Keras 3.15 fit a compiled model (built under a MultiWorkerMirroredStrategy scope) with that strategy.

    Keras' fit breaks under it twice (keras-team/keras#20585): its symbolic build averages an
    (images, targets) batch across workers, which tf.distribute cannot do with a nested batch, and
    each step averages its scalar logs across workers along an axis they do not have. Forgetting
    the model's strategy defers the build to the first step, under the strategy of the scope fit is
    called in; each step's logs then stay the worker's own (only the progress bar shows them). The
    epoch's logs (early stopping, MLflow) are read from the metrics, which sum over all workers.
    """
    import keras
    from keras.src.backend.tensorflow import trainer

    fit_model._distribute_strategy = None
    trainer._collective_all_reduce_multi_worker = lambda strategy: False
    # BatchNorm on each worker's share alone normalises with other statistics than one worker on
    # the whole batch: two workers ended 0.4-0.6 years of val MAE away from one. Global statistics
    # keep training what one worker would train (the saved model is built without this).
    for layer in layers_of(fit_model):
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.synchronized = True


def layers_of(layer) -> list:
    """The layer and every layer inside it."""
    return [layer] + [inner for sub in getattr(layer, "layers", []) for inner in layers_of(sub)]
