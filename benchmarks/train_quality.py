"""The real pipeline on all of ../shared/datasets/utkface-part1 with the README's real-data params.

Run: .venv/bin/python benchmarks/train_quality.py [--keep DIR]
(--keep DIR works in DIR instead of a temporary folder and registers the model there as
the champion of DIR/mlflow.db, for benchmarks/service.py.)
Writes benchmarks/results/train_quality.json: preprocessing images/s, test-split age MAE
and gender accuracy (overall and 18+), training wall time, the fit's images/s through the
tf.data pipeline vs the same model fed from in-memory arrays (one run, so the ratio is
fair on this shared machine), inference ms/face at batch 32 and the model file size.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from agegender.config import Params, load_params
from agegender.data.ingest import ingest
from agegender.evaluation import evaluate_candidate
from agegender.preprocess import load_split, prepare_dataset
from agegender.tracking import configure_tracking
from agegender.training import compile_for_training, make_dataset, train_candidates
from agegender.validation import validate_dataset

ROOT = Path(__file__).resolve().parents[1]
UTKFACE = ROOT.parent / "shared" / "datasets" / "utkface-part1"
RESULTS = ROOT / "benchmarks" / "results" / "train_quality.json"

# The README's recommended overrides for real data (measured in benchmarks/results/age_head.json).
REAL_DATA = {
    "train": {
        "width": 48,
        "epochs": 30,
        "patience": 10,
        "loss_weights": {"age": 0.1, "age_distribution": 1.0, "gender": 2.0},
    },
}


def real_params() -> Params:
    raw = load_params(ROOT / "params.yaml").model_dump(by_alias=True, mode="json")
    raw["train"].update(REAL_DATA["train"])
    return Params.model_validate(raw)


def fit_throughput(params: Params, prepared: Path) -> dict:
    """Images/s of one epoch through make_dataset (augmented) vs numpy arrays, same model."""
    from agegender.model import build_model

    cfg = params.train
    train = load_split(prepared, "train")
    rates = {}
    for source in ("tf_data", "arrays", "tf_data"):  # tf.data twice: the first epoch warms up oneDNN
        model = build_model(image_size=params.preprocess.image_size, width=cfg.width, age_head=cfg.age_head)
        fit = compile_for_training(model, cfg, steps_per_epoch=len(train["age"]) // cfg.batch_size)
        if source == "tf_data":
            data, kwargs = make_dataset(train, cfg, training=True), {}
        else:
            n = len(train["age"]) // cfg.batch_size * cfg.batch_size
            targets = {
                "age": train["age"][:n, None],
                "gender": train["gender"][:n, None],
                "age_logits": train["age"][:n, None],
            }
            data, kwargs = train["images"][:n].astype(np.float32), {"y": targets, "batch_size": cfg.batch_size}
        start = time.perf_counter()
        fit.fit(data, epochs=1, verbose=0, **kwargs)
        rates[source] = len(train["age"]) / (time.perf_counter() - start)
    return {
        "tf_data_images_per_s": round(rates["tf_data"], 1),
        "arrays_images_per_s": round(rates["arrays"], 1),
        "ratio_tf_data_over_arrays": round(rates["tf_data"] / rates["arrays"], 3),
    }


def inference_ms_per_face(model_path: Path, size: int) -> float:
    import keras

    model = keras.saving.load_model(model_path, compile=False)
    batch = np.random.default_rng(0).integers(0, 255, (32, size, size, 3)).astype(np.float32)
    model.predict_on_batch(batch)
    start = time.perf_counter()
    for _ in range(30):
        model.predict_on_batch(batch)
    return round((time.perf_counter() - start) / (30 * 32) * 1000, 3)


def register_champion(artifacts: Path, params: Params) -> None:
    import mlflow

    from agegender.registry import register_candidate

    card = json.loads((artifacts / "model/card.json").read_text())
    result = register_candidate(
        mlflow.MlflowClient(),
        model_name=params.registry.model_name,
        model_uri=f"runs:/{card['mlflow_run_id']}/model",
        run_id=card["mlflow_run_id"],
        tags={"data_version": card["data_version"]},
        decision=json.loads((artifacts / "eval/gate.json").read_text()),
    )
    print(result.summary)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=Path, help="work in this folder and register the model there")
    args = parser.parse_args()
    params = real_params()
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=False)
    with tempfile.TemporaryDirectory() as scratch:
        tmp = args.keep.resolve() if args.keep else Path(scratch)
        data, artifacts = tmp / "data", tmp / "artifacts"
        ingest(str(UTKFACE), data, append=False, demo=params.data.demo)
        validate_dataset(data, artifacts / "validation", params.validate_)
        start = time.perf_counter()
        stats = prepare_dataset(
            artifacts / "validation/manifest.csv",
            data,
            artifacts / "prepared",
            params.preprocess,
            params.validate_.age_buckets,
        )
        preprocess_s = time.perf_counter() - start
        configure_tracking(tmp, f"sqlite:///{tmp / 'mlflow.db'}")
        start = time.perf_counter()
        (winner,) = train_candidates(
            artifacts / "prepared",
            artifacts / "model",
            params,
            data_version="benchmark",
            git_commit="benchmark",
            run_name="benchmark",
        )
        train_s = time.perf_counter() - start
        evaluate_candidate(
            artifacts / "model",
            artifacts / "prepared",
            data,
            artifacts / "eval",
            champion_uri=None,
            gates=params.gates,
            age_buckets=params.validate_.age_buckets,
        )
        if args.keep:
            register_champion(artifacts, params)
        test = json.loads((artifacts / "eval/metrics.json").read_text())
        history = (artifacts / "model/history.csv").read_text()
        result = {
            "dataset": "shared/datasets/utkface-part1",
            "params_overrides": REAL_DATA,
            "preprocess": {
                "rows": stats["rows"],
                "seconds": round(preprocess_s, 1),
                "images_per_s": round(stats["rows"] / preprocess_s, 1),
                "detector": params.preprocess.detector,
                "detector_hit_rate": stats["detector_hit_rate"],
                "splits": {k: v["count"] for k, v in stats["splits"].items()},
            },
            "train": {
                "wall_seconds": round(train_s, 1),
                "epochs_run": winner["epochs_run"],
                "best_epoch": winner["best_epoch"],
                "val_age_mae": winner["val_age_mae"],
                "val_gender_accuracy": winner["val_gender_accuracy"],
            },
            "test": {
                k: test[k]
                for k in (
                    "age_mae",
                    "age_rmse",
                    "age_cs5",
                    "gender_accuracy",
                    "gender_accuracy_18plus",
                    "gender_f1",
                    "gender_roc_auc",
                )
            },
            "test_by_race": test["by_race"],
            "input_pipeline": fit_throughput(params, artifacts / "prepared"),
            "inference_ms_per_face_batch32": inference_ms_per_face(
                artifacts / "model/model.keras", params.preprocess.image_size
            ),
            "model_file_mb": round((artifacts / "model/model.keras").stat().st_size / 1e6, 2),
            "training_curve_csv": history,
            "load_average_at_end": os.getloadavg(),
        }
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "training_curve_csv"}, indent=2))


if __name__ == "__main__":
    main()
