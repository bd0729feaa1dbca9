"""Train the multi-task model on the cached crops and track the run in MLflow.

Writes artifacts/model/ (model.keras, spec.json, card.json, card.md, metrics.json,
history.csv, curves.png) only after a successful fit; the MLflow run gets the params,
per-epoch metrics, data version, git commit, curves and the model: the whole predictor as an
MLflow pyfunc (image bytes -> faces) with the network and spec.json as its artifacts.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import tensorflow as tf

from agegender import paths
from agegender.config import ModelSpec, Params, TrainParams
from agegender.distributed import Cluster, fit_for_multi_worker, join, strategy_for
from agegender.files import atomic_dir, write_json
from agegender.labels import ADULT_AGE, GENDER_THRESHOLD
from agegender.model import age_logits_loss, build_model, mirror_averaged, training_view
from agegender.monitoring import reference_table
from agegender.preprocess import load_split
from agegender.tracking import configure_tracking, end_dead_runs, flatten, git_commit


class TrainingError(RuntimeError):
    """Training could not produce a usable model; nothing was written."""


@dataclass(frozen=True)
class CandidateRun:
    """One trained candidate; its outputs are in `folder` until the winner's are moved into place."""

    name: str
    run_id: str
    metrics: dict
    folder: Path


@dataclass(frozen=True)
class CandidateResult:
    """One row of candidates.json, as the train stage reports it."""

    name: str
    run_id: str
    winner: bool
    val_age_mae: float
    val_gender_accuracy: float
    train_seconds: float


@dataclass(frozen=True)
class TrainResult:
    """What the train stage did: one MLflow parent run, a child run per candidate, the winner in artifacts/model."""

    run_name: str
    tracking_uri: str
    data_version: str
    candidates: list[CandidateResult]

    @property
    def summary(self) -> str:
        names = ", ".join(c.name for c in self.candidates)
        lines = [f"Trained run {self.run_name!r} (candidates: {names}), tracked in MLflow at {self.tracking_uri}"]
        lines += [
            f"{'winner' if c.winner else '      '} {c.name}: val age MAE {c.val_age_mae}, val gender accuracy "
            f"{c.val_gender_accuracy}, {c.train_seconds} s, run {c.run_id}"
            for c in self.candidates
        ]
        lines.append(f"Winner's model, card and {paths.CANDIDATES} in {paths.MODEL}/")
        return "\n".join(lines)


def run_train_stage(
    root: Path, params: Params, *, tracking_uri: str | None, cluster: Cluster | None = None
) -> TrainResult | WorkerResult:
    """The train stage: every candidate on artifacts/prepared, tracked in MLflow; the winner to artifacts/model.

    The run is named after the model and the data version in data.dvc, and tagged with
    both and the git commit. `tracking_uri` is the store to track in (None: the project's own).
    In a multi-worker `cluster` the chief does all that; any other worker only trains with it.
    """
    from agegender.data.versioning import data_version

    if cluster is not None and params.scale.dask_scheduler is not None:
        raise TrainingError(
            f"TF_CONFIG names a multi-worker cluster and scale.dask_scheduler is {params.scale.dask_scheduler}: "
            "candidates train either across the TF_CONFIG hosts or on the Dask workers; unset one of them"
        )
    if cluster is not None:
        join(cluster, params.scale.join_seconds)
        if not cluster.is_chief:
            return train_as_worker(root / paths.PREPARED, params, cluster)
    uri = configure_tracking(root, tracking_uri)
    version = data_version(root / paths.DATA_DVC)
    run_name = f"{params.train.backbone}-{params.train.age_head}-{params.preprocess.image_size}px-data{version[:8]}"
    rows = train_candidates(
        root / paths.PREPARED,
        root / paths.MODEL,
        params,
        data_version=version,
        git_commit=git_commit(root),
        run_name=run_name,
        cluster=cluster,
    )
    candidates = [
        CandidateResult(
            name=row["name"],
            run_id=row["run_id"],
            winner=row["winner"],
            val_age_mae=row["val_age_mae"],
            val_gender_accuracy=row["val_gender_accuracy"],
            train_seconds=row["train_seconds"],
        )
        for row in rows
    ]
    return TrainResult(run_name=run_name, tracking_uri=uri, data_version=version, candidates=candidates)


def train_candidates(
    prepared_dir: Path,
    out_dir: Path,
    params: Params,
    *,
    data_version: str,
    git_commit: str,
    run_name: str,
    cluster: Cluster | None = None,
) -> list[dict]:
    """Train every candidate as a child run of one parent run; the lowest val age MAE wins.

    Only the validation split is used to choose (the test split is left for evaluation).
    The winner's outputs go to out_dir; candidates.json beside it lists all of them.
    """
    import mlflow

    train, val = load_split(prepared_dir, "train"), load_split(prepared_dir, "val")
    check_inputs(train, val, params.preprocess.image_size, params.train.batch_size)
    stats = json.loads((prepared_dir / paths.PREPARED_STATS).read_text())
    results: list[CandidateRun] = []
    with atomic_dir(out_dir) as staging:
        with mlflow.start_run(run_name=run_name) as parent:
            mlflow.set_tags({"data_version": data_version, "git_commit": git_commit, "role": "parent"})
            mlflow.log_params(flatten(params.model_settings(exclude=frozenset({"candidates"}))))
            if params.scale.dask_scheduler is None:  # one after another, in this process
                for candidate in params.candidates:
                    cfg = params.candidate_train(candidate)
                    check_inputs(train, val, params.preprocess.image_size, cfg.batch_size)
                    results.append(
                        train_one(
                            candidate.name,
                            cfg,
                            params,
                            train,
                            val,
                            stats,
                            # a dot name cannot clash with an output file name
                            staging / f".candidate-{candidate.name}",
                            data_version=data_version,
                            git_commit=git_commit,
                            run_name=f"{run_name}/{candidate.name}",
                            cluster=cluster,
                        )
                    )
            else:
                results = train_on_dask(
                    params.scale.dask_scheduler,
                    params,
                    train,
                    val,
                    stats,
                    staging,
                    parent_run_id=parent.info.run_id,
                    data_version=data_version,
                    git_commit=git_commit,
                    run_name=run_name,
                )
            winner = min(results, key=lambda r: r.metrics["val_age_mae"])
            mlflow.set_tags({"winner": winner.name, "winner_run_id": winner.run_id})
            mlflow.log_metrics({k: v for k, v in winner.metrics.items() if isinstance(v, int | float)})
        summary = [
            {
                "name": r.name,
                "run_id": r.run_id,
                "parent_run_id": parent.info.run_id,
                "winner": r is winner,
                **r.metrics,
            }
            for r in results
        ]
        for item in winner.folder.iterdir():
            item.rename(staging / item.name)
        for result in results:
            shutil.rmtree(result.folder)
        write_json(staging / paths.CANDIDATES, summary)
    return summary


def train_on_dask(
    address: str,
    params: Params,
    train: dict,
    val: dict,
    stats: dict,
    staging: Path,
    *,
    parent_run_id: str,
    data_version: str,
    git_commit: str,
    run_name: str,
) -> list[CandidateRun]:
    """Every candidate at once, each a task on a worker of the Dask cluster at `address`.

    Each trains in its own child run of `parent_run_id` and sends its outputs back into
    staging/.candidate-NAME, as train_one writes them in the serial path.
    """
    import mlflow
    from distributed import as_completed
    from rich.progress import track

    from agegender.cluster import connect

    uri = mlflow.get_tracking_uri()
    if not uri.startswith(("http://", "https://")):
        raise TrainingError(
            f"candidates on the Dask cluster at {address} (scale.dask_scheduler) are tracked from the workers: "
            f"set MLFLOW_TRACKING_URI to an MLflow server they reach (now {uri})"
        )
    for candidate in params.candidates:
        check_inputs(train, val, params.preprocess.image_size, params.candidate_train(candidate).batch_size)
    experiment_id = mlflow.get_run(parent_run_id).info.experiment_id
    with connect(address) as client:
        # Every worker holds the splits, so the scheduler places candidates on idle workers, not near the data.
        [data] = client.scatter([(train, val, stats)], broadcast=True)
        futures = [
            client.submit(
                train_on_worker,
                candidate.name,
                params.candidate_train(candidate),
                params,
                data,
                tracking_uri=uri,
                experiment_id=experiment_id,
                parent_run_id=parent_run_id,
                data_version=data_version,
                git_commit=git_commit,
                run_name=f"{run_name}/{candidate.name}",
                key=f"candidate-{parent_run_id}-{candidate.name}",
            )
            for candidate in params.candidates
        ]
        results = {}
        description = f"Training candidates on the Dask cluster at {address}"
        for future in track(as_completed(futures, loop=client.loop), total=len(futures), description=description):
            name, run_id, metrics, outputs = future.result()  # re-raises a candidate's TrainingError
            folder = staging / f".candidate-{name}"
            for relative, content in outputs.items():
                (folder / relative).parent.mkdir(parents=True, exist_ok=True)
                (folder / relative).write_bytes(content)
            results[name] = CandidateRun(name=name, run_id=run_id, metrics=metrics, folder=folder)
    # A candidate whose worker died was run again elsewhere; the lost attempt's child run is still RUNNING.
    lost = end_dead_runs(f"tags.`mlflow.parentRunId` = '{parent_run_id}'", alive={r.run_id for r in results.values()})
    if lost:
        print(f"ended the child runs of candidates lost with their Dask worker as KILLED: {', '.join(lost)}")
    return [results[candidate.name] for candidate in params.candidates]


def train_on_worker(
    name: str,
    cfg: TrainParams,
    params: Params,
    data: tuple[dict, dict, dict],
    *,
    tracking_uri: str,
    experiment_id: str,
    parent_run_id: str,
    data_version: str,
    git_commit: str,
    run_name: str,
) -> tuple[str, str, dict, dict[str, bytes]]:
    """A Dask task: train_one on this worker; (name, run id, metrics, output files by relative path)."""
    import mlflow
    from distributed import get_worker

    train, val, stats = data
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_experiment(experiment_id=experiment_id)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "outputs"
        run = train_one(
            name,
            cfg,
            params,
            train,
            val,
            stats,
            folder,
            data_version=data_version,
            git_commit=git_commit,
            run_name=run_name,
            parent_run_id=parent_run_id,
        )
        outputs = {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    mlflow.MlflowClient().set_tag(run.run_id, "dask_worker", get_worker().address)
    return name, run.run_id, run.metrics, outputs


def train_one(
    name: str,
    cfg: TrainParams,
    params: Params,
    train: dict,
    val: dict,
    stats: dict,
    folder: Path,
    *,
    data_version: str,
    git_commit: str,
    run_name: str,
    parent_run_id: str | None = None,
    cluster: Cluster | None = None,
) -> CandidateRun:
    """Fit one candidate in a child run; its outputs go to `folder`. In a multi-worker `cluster`, only the chief calls this."""
    import mlflow

    from agegender.pyfunc import log_predictor

    spec = ModelSpec(
        image_size=params.preprocess.image_size,
        margin=params.preprocess.margin,
        align=params.preprocess.align,
        detector=params.preprocess.detector,
        backbone=cfg.backbone,
        age_head=cfg.age_head,
        data_version=data_version,
        trained_on="demo" if stats.get("sources") == ["demo"] else "real",
    )
    # parent_run_id: the parent when it is not this thread's active run (a candidate on a Dask worker)
    with mlflow.start_run(run_name=run_name, nested=True, parent_run_id=parent_run_id) as run:
        mlflow.log_params(
            flatten(
                {
                    "candidate": name,
                    "train": cfg.model_dump(mode="json"),
                    **params.model_settings(exclude=frozenset({"train", "candidates"})),
                }
            )
        )
        mlflow.set_tags(
            {
                "data_version": data_version,
                "git_commit": git_commit,
                "trained_on": spec.trained_on,
                "candidate": name,
                "cpu_kernels": cpu_kernels(),  # "default" ones are bit for bit reproducible, oneDNN's faster
                "mlflow.note.content": describe_run(spec, stats),
            }
        )
        mlflow.log_params(
            {
                "split.train": len(train["age"]),
                "split.val": len(val["age"]),
                "split.rows": stats["rows"],
                "distribute.workers": cluster.size if cluster else 1,
            }
        )
        start = time.perf_counter()
        model, history = train_model(
            cfg, spec.image_size, train, val, callbacks=[mlflow.keras.MlflowCallback(run)], cluster=cluster
        )
        seconds = time.perf_counter() - start
        if any(not math.isfinite(v) for v in history["loss"]):
            raise TrainingError(
                f"candidate {name!r}: loss became {history['loss'][-1]} at epoch {len(history['loss'])}; "
                "lower train.learning_rate or check the labels. No model was written."
            )
        metrics = score(model, val, prefix="val_")
        first_kept = cfg.low_res.epochs if cfg.low_res else 0  # the earlier epochs scored smaller crops
        metrics.update(
            {
                "train_seconds": round(seconds, 1),
                "train_images_per_s": round(len(history["loss"]) * len(train["age"]) / seconds, 1),
                "epochs_run": len(history["loss"]),
                "best_epoch": first_kept + int(np.argmin(history["val_age_mae"][first_kept:])) + 1,
            }
        )
        # Logged after the per-epoch points, so the run's latest value is the restored best model's.
        mlflow.log_metrics(metrics, step=len(history["loss"]))
        save_outputs(folder, model, spec, metrics, history, stats, run.info.run_id)
        write_reference(folder / paths.DRIFT_REFERENCE, model, train["images"])
        mlflow.log_artifacts(str(folder), artifact_path="outputs")
        # The run's model: image bytes -> faces, with the network and spec.json inside.
        log_predictor(folder, params.registry.model_name)
    return CandidateRun(name=name, run_id=run.info.run_id, metrics=metrics, folder=folder)


def cpu_kernels() -> str:
    """The CPU kernels this process's TensorFlow trains on: "oneDNN" or "default".

    TensorFlow chooses once, when it loads: oneDNN's only on CPUs with AVX-512 VNNI, BF16 or AMX,
    or when TF_ENABLE_ONEDNN_OPTS=1. They make a train step of the real-data recipe's network 1.35-1.39x
    faster on AVX2 CPUs and 1.74x on an AVX-512 one (benchmarks/train_step.py), but they round
    differently from run to run.
    """
    from tensorflow.python.util import _pywrap_util_port  # TensorFlow's only report of the choice

    return "oneDNN" if _pywrap_util_port.IsMklEnabled() else "default"


def warn_about_unchosen_kernels() -> None:
    """Warn when this process trains on oneDNN's kernels that nobody asked for: its weights are then not reproducible.

    That happens when TensorFlow loaded before agegender could choose (a script that imports
    TensorFlow first, on a CPU where TensorFlow picks oneDNN by itself).
    """
    if cpu_kernels() == "oneDNN" and os.environ.get("TF_ENABLE_ONEDNN_OPTS") != "1":
        warnings.warn(
            "TensorFlow loaded before agegender and chose oneDNN's CPU kernels, so this training is not bit for bit "
            "reproducible (its MLflow run's cpu_kernels tag says oneDNN). Import agegender before TensorFlow, "
            "or set TF_ENABLE_ONEDNN_OPTS=1 to train on oneDNN's kernels on purpose.",
            RuntimeWarning,
            stacklevel=2,
        )


def train_model(
    cfg: TrainParams,
    image_size: int,
    train: dict,
    val: dict,
    *,
    callbacks: list,
    verbose: int = 2,
    cluster: Cluster | None = None,
) -> tuple[keras.Model, dict]:
    """Build and fit one model; its history. The same cfg and data give the same weights, run after run,
    on TensorFlow's default CPU kernels.

    Without op determinism the parallel augmentation map hands its shared random state to
    batches in a varying order, so one config trained twice differed (val MAE 4.92 and 5.13,
    issue 14). Determinism makes TensorFlow run that map serially instead. oneDNN's kernels
    (`cpu_kernels`) ignore it: on an AVX2 CPU 1 fit in 12 of a tiny model ended with a weight 5e-5 apart.
    In a multi-worker `cluster` every worker calls this with the same arguments and they fit one
    model together; each gets a copy of the trained model that predicts and saves on its own.
    """
    strategy = strategy_for(cluster)  # first: a multi-worker strategy sets up TensorFlow's collective ops
    warn_about_unchosen_kernels()
    keras.utils.set_random_seed(cfg.seed)
    tf.config.experimental.enable_op_determinism()
    # (crop size, window, last epoch) per phase; one model and optimizer go through them, so the schedule runs on.
    phases = [(cfg.low_res.size, cfg.low_res.window, cfg.low_res.epochs)] if cfg.low_res else []
    phases.append((image_size, False, cfg.epochs))
    history: dict[str, list] = {}
    with strategy.scope():
        model = build_for(cfg, None if cfg.low_res else image_size)
        fit_model = compile_for_training(model, cfg, steps_per_epoch=max(1, len(train["age"]) // cfg.batch_size))
        if cluster is not None:
            fit_for_multi_worker(fit_model)
        for size, window, last_epoch in phases:
            # Only full-size epochs compete to be kept: the model serves full-size crops.
            early_stop = keras.callbacks.EarlyStopping(
                monitor="val_age_mae", mode="min", patience=cfg.patience, restore_best_weights=True
            )
            keep_best = [early_stop] if size == image_size else []
            phase = fit_model.fit(
                make_dataset(train, cfg, training=True, size=size, window=window),
                validation_data=make_dataset(val, cfg, training=False, size=size, window=window),
                initial_epoch=len(history.get("loss", [])),
                epochs=last_epoch,
                callbacks=[
                    keras.callbacks.TerminateOnNaN(),
                    # Before EarlyStopping: each epoch's averaged weights are the ones it scores and keeps.
                    *([keras.callbacks.SwapEMAWeights(swap_on_epoch=True)] if cfg.ema_momentum else []),
                    *keep_best,
                    *callbacks,
                ],
                verbose=verbose,
            ).history
            for key, values in phase.items():
                history.setdefault(key, []).extend(values)
            if fit_model.stop_training:  # TerminateOnNaN
                break
    if cluster is not None or cfg.low_res:
        # A model built under the multi-worker strategy predicts only with every worker taking part,
        # and one built for any crop size would not say which size it serves.
        local = build_for(cfg, image_size)
        local.set_weights(model.get_weights())
        model = local
    return (mirror_averaged(model) if cfg.mirror_average else model), history


def build_for(cfg: TrainParams, image_size: int | None) -> keras.Model:
    """The untrained network cfg describes; image_size None: for crops of any size."""
    return build_model(
        backbone=cfg.backbone,
        image_size=image_size,
        weights=cfg.weights,
        width=cfg.width,
        bn_momentum=cfg.bn_momentum,
        dropout=cfg.dropout,
        age_head=cfg.age_head,
        age_bins=cfg.age_bins,
    )


@dataclass(frozen=True)
class WorkerResult:
    """What a multi-worker training's non-chief worker did: trained with the chief, wrote nothing."""

    cluster: Cluster
    candidates: list[str]

    @property
    def summary(self) -> str:
        return (
            f"Worker {self.cluster.index} of {self.cluster.size} trained {', '.join(self.candidates)} with the chief "
            f"at {self.cluster.workers[0]}; the chief tracks the run in MLflow and writes {paths.MODEL}/"
        )


def train_as_worker(prepared_dir: Path, params: Params, cluster: Cluster) -> WorkerResult:
    """A non-chief worker's share of the train stage: every candidate's fit, in the chief's order; nothing written.

    The chief scores and saves on its own copy of each model (see train_model), so the fits are
    the only steps the workers take together.
    """
    train, val = load_split(prepared_dir, "train"), load_split(prepared_dir, "val")
    check_inputs(train, val, params.preprocess.image_size, params.train.batch_size)
    for candidate in params.candidates:
        cfg = params.candidate_train(candidate)
        check_inputs(train, val, params.preprocess.image_size, cfg.batch_size)
        train_model(cfg, params.preprocess.image_size, train, val, callbacks=[], cluster=cluster)
    return WorkerResult(cluster=cluster, candidates=[c.name for c in params.candidates])


def check_inputs(train: dict, val: dict, image_size: int, batch_size: int) -> None:
    for name, split in (("train", train), ("val", val)):
        if len(split["age"]) == 0:
            raise TrainingError(f"the {name} split is empty; ingest more data or change preprocess.split")
        shape = tuple(split["images"].shape[1:])
        if shape != (image_size, image_size, 3):
            raise TrainingError(
                f"the {name} crops are {shape}, but preprocess.image_size is {image_size}; "
                "re-run `dvc repro preprocess`"
            )
    if len(train["age"]) < batch_size:
        raise TrainingError(f"the train split has {len(train['age'])} faces, fewer than train.batch_size={batch_size}")


def compile_for_training(model: keras.Model, cfg: TrainParams, *, steps_per_epoch: int) -> keras.Model:
    """Compile the model (or its view with age logits, for dldl/ordinal) with losses, weights and schedule."""
    losses = {"age": "mae", "gender": "binary_crossentropy"}
    weights = {"age": cfg.loss_weights.age, "gender": cfg.loss_weights.gender}
    # Compile a view over the same layers so the saved model carries no optimizer state.
    fit_model = training_view(model)
    if cfg.age_head != "regression":
        losses["age_logits"] = age_logits_loss(cfg.age_head, age_bins=cfg.age_bins, sigma=cfg.age_sigma)
        weights["age_logits"] = cfg.loss_weights.age_distribution
    elif cfg.loss_weights.age == 0:
        raise TrainingError("train.loss_weights.age is 0: a regression age head would not learn")
    warmup = cfg.warmup_epochs * steps_per_epoch
    schedule = keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=cfg.learning_rate / 20 if warmup else cfg.learning_rate,
        decay_steps=max(1, cfg.epochs * steps_per_epoch - warmup),
        warmup_target=cfg.learning_rate if warmup else None,
        warmup_steps=warmup,
        alpha=0.01,
    )
    ema = {"use_ema": True, "ema_momentum": cfg.ema_momentum} if cfg.ema_momentum else {}
    optimizer = {
        "adamw": lambda: keras.optimizers.AdamW(schedule, weight_decay=cfg.weight_decay, **ema),
        "adam": lambda: keras.optimizers.Adam(schedule, **ema),
        "sgd": lambda: keras.optimizers.SGD(schedule, momentum=0.9, nesterov=True, **ema),
    }[cfg.optimizer]()
    if cfg.optimizer == "adamw":
        # Decay the kernels only: shrinking BatchNorm scales and offsets or biases does not regularize.
        optimizer.exclude_from_weight_decay(var_names=["gamma", "beta", "bias"])
    fit_model.compile(
        optimizer=optimizer,
        loss=losses,
        loss_weights=weights,
        metrics={"age": ["mae"], "gender": ["accuracy"]},
    )
    return fit_model


def make_augmenter(cfg: TrainParams) -> keras.Sequential:
    """Training-only augmentation with Keras' preprocessing layers, applied to whole batches."""
    aug = cfg.augment
    # A seed per layer: layers given one seed draw the same numbers, so rotation, zoom,
    # brightness and contrast would all move together (the most rotated image also the darkest).
    seeds = itertools.count(cfg.seed)
    steps = [keras.layers.RandomFlip("horizontal", seed=next(seeds))] if aug.flip else []
    if aug.rotation or aug.shift or aug.zoom:
        steps.append(keras.layers.RandomRotation(aug.rotation, fill_mode="reflect", seed=next(seeds)))
        steps.append(keras.layers.RandomTranslation(aug.shift, aug.shift, fill_mode="reflect", seed=next(seeds)))
        steps.append(keras.layers.RandomZoom(aug.zoom, fill_mode="reflect", seed=next(seeds)))
    if aug.brightness:
        steps.append(keras.layers.RandomBrightness(aug.brightness, value_range=(0, 255), seed=next(seeds)))
    if aug.contrast:
        steps.append(keras.layers.RandomContrast(aug.contrast, value_range=(0, 255), seed=next(seeds)))
    if aug.grayscale:
        steps.append(keras.layers.RandomGrayscale(aug.grayscale, seed=next(seeds)))
    return keras.Sequential(steps, name="augment")


def make_dataset(
    split: dict, cfg: TrainParams, *, training: bool, size: int | None = None, window: bool = False
) -> tf.data.Dataset:
    """Batches of (float images, targets): cached, shuffled and augmented in parallel for training.

    size: make size x size images of the crops first (train.low_res), by scaling them down or, with
    window, cutting a window of them (random per training batch, central otherwise).
    """
    if size is None or size == split["images"].shape[1]:
        shrink = keras.layers.Identity()
    elif window:
        shrink = keras.layers.RandomCrop(size, size, seed=cfg.seed) if training else keras.layers.CenterCrop(size, size)
    else:
        shrink = keras.layers.Resizing(size, size, interpolation="area")  # as cv2.INTER_AREA makes smaller crops

    def to_float(images):
        return shrink(tf.cast(images, tf.float32), training=training)

    targets = {"age": split["age"][:, None], "gender": split["gender"][:, None]}
    if cfg.age_head != "regression":
        targets["age_logits"] = split["age"][:, None]
    data = tf.data.Dataset.from_tensor_slices((split["images"], targets)).cache()
    # Under MultiWorkerMirroredStrategy every worker runs this whole pipeline (same seeds: same
    # shuffle and augmentation) and keeps its share of each global batch of cfg.batch_size, so the
    # workers together see exactly the batches one worker would. Without a strategy this does nothing.
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    data = data.with_options(options)
    if training:
        data = data.shuffle(len(split["age"]), seed=cfg.seed, reshuffle_each_iteration=True)
    # Full training batches only: a small last batch makes noisy BatchNorm statistics, and
    # oneDNN's conv backward pass in TF 2.21 corrupts memory on some odd batch sizes (seen with 15).
    data = data.batch(cfg.batch_size, drop_remainder=training).map(
        lambda x, y: (to_float(x), y), num_parallel_calls=tf.data.AUTOTUNE
    )
    augment = make_augmenter(cfg)
    if training and augment.layers:
        data = data.map(lambda x, y: (augment(x, training=True), y), num_parallel_calls=tf.data.AUTOTUNE)
    return data.prefetch(tf.data.AUTOTUNE)


def score(model: keras.Model, split: dict, *, prefix: str) -> dict:
    """Age MAE and gender accuracy, overall and for ages 18+ (gender is hard to see in young children)."""
    predicted = model.predict(split["images"].astype(np.float32), batch_size=256, verbose=0)
    age, female = predicted["age"][:, 0], predicted["gender"][:, 0]
    correct = (female >= GENDER_THRESHOLD) == split["gender"].astype(bool)
    adult = split["age"] >= ADULT_AGE
    return {
        f"{prefix}age_mae": round(float(np.mean(np.abs(age - split["age"]))), 4),
        f"{prefix}gender_accuracy": round(float(correct.mean()), 4),
        f"{prefix}gender_accuracy_18plus": round(float(correct[adult].mean()), 4) if adult.any() else None,
    }


def write_reference(path: Path, model: keras.Model, crops: np.ndarray) -> None:
    """The drift check's reference: the statistics the service records, on the training crops (no augmentation)."""
    predicted = model.predict(crops.astype(np.float32), batch_size=256, verbose=0)
    reference_table(crops, predicted["age"][:, 0], predicted["gender"][:, 0]).to_csv(path, index=False)


def describe_run(spec: ModelSpec, stats: dict) -> str:
    data = "the procedurally drawn DEMO data (not real faces)" if spec.trained_on == "demo" else "real face images"
    return (
        f"{spec.backbone} backbone, {spec.age_head} age head, {spec.image_size}px crops; "
        f"trained on {data}, DVC data version {spec.data_version}, {stats['rows']} faces."
    )


def save_outputs(
    folder: Path, model: keras.Model, spec: ModelSpec, metrics: dict, history: dict, stats: dict, run_id: str
) -> None:
    """Write every output of one candidate into folder (a staging folder: see train_candidates)."""
    folder.mkdir(parents=True)
    model.save(folder / paths.KERAS_MODEL)
    (folder / paths.MODEL_SPEC).write_text(spec.model_dump_json(indent=2) + "\n")
    write_json(folder / paths.VAL_METRICS, metrics)
    curves = pd.DataFrame(history).rename(columns=lambda c: c.replace("binary_", ""))
    curves.insert(0, "epoch", range(1, len(curves) + 1))
    curves.to_csv(folder / paths.HISTORY, index=False)
    plot_curves(curves, folder / paths.CURVES)
    write_card(folder, spec, metrics, stats, run_id)


def plot_curves(curves: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, (title, columns) in zip(
        axes,
        [
            ("loss", ["loss", "val_loss"]),
            ("age MAE (years)", ["age_mae", "val_age_mae"]),
            ("gender accuracy", ["gender_accuracy", "val_gender_accuracy"]),
        ],
        strict=True,
    ):
        for column in columns:
            if column in curves:
                ax.plot(curves["epoch"], curves[column], label=column)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write_card(folder: Path, spec: ModelSpec, metrics: dict, stats: dict, run_id: str) -> None:
    use = (
        "Demonstration only: trained on procedurally drawn cartoon faces. It shows the workflow "
        "and must not be used on real people."
        if spec.trained_on == "demo"
        else "Research and evaluation on face images like the training data (aligned, frontal faces). "
        "Age and gender estimates are uncertain and must not drive decisions about individuals."
    )
    card = {
        "model": f"agegender ({spec.backbone}, {spec.age_head} age head, {spec.image_size}px)",
        "mlflow_run_id": run_id,
        "data_version": spec.data_version,
        "trained_on": spec.trained_on,
        "split_sizes": {name: info["count"] for name, info in stats["splits"].items()},
        "detector": {"name": spec.detector, "hit_rate": stats["detector_hit_rate"]},
        "metrics": metrics,
        "intended_use": use,
    }
    write_json(folder / paths.MODEL_CARD, card)
    lines = [
        f"# Model card: {card['model']}",
        "",
        f"**Intended use.** {use}",
        "",
        f"- Data version (DVC md5): `{spec.data_version}` ({spec.trained_on} data)",
        f"- Splits: {card['split_sizes']}",
        f"- MLflow run: `{run_id}`",
        "",
        "| metric | value |",
        "|---|---|",
    ]
    lines += [f"| {name} | {value} |" for name, value in metrics.items()]
    (folder / paths.MODEL_CARD_MD).write_text("\n".join(lines) + "\n")
