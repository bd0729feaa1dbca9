"""Test-time flip averaging: a trained model scored on each face, its mirror image, and the mean of both.

Run: .venv/bin/python benchmarks/flip_average.py --store DIR --model DIR/artifacts/model --label NAME
DIR is a benchmarks/train_quality.py store (its prepared validation and test splits); the model is
one that train_quality.py trained there. Results merge into benchmarks/results/flip_average.json
under NAME: age MAE overall and 18+, gender accuracy overall and 18+, on validation and test, for
the plain image, the mirrored one and the average of the two predictions; and the model's ms per
face at batch 32 alone and with its mirror (one call on the 32 faces and their 32 mirrors).
`train.mirror_average: true` makes the saved model average; this measures what that buys a model trained
without it, and what it costs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from agegender.config import load_params
from agegender.evaluation import compute_metrics
from agegender.preprocess import load_split

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.train_quality import ms_per_face  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "flip_average.json"
REPORTED = ("age_mae", "age_mae_18plus", "gender_accuracy", "gender_accuracy_18plus")


def scores(model, split: dict, age_buckets: list[int]) -> dict:
    images = split["images"].astype(np.float32)
    plain = model.predict(images, batch_size=256, verbose=0)
    mirrored = model.predict(images[:, :, ::-1], batch_size=256, verbose=0)
    predictions = {
        "plain": (plain["age"][:, 0], plain["gender"][:, 0]),
        "mirrored": (mirrored["age"][:, 0], mirrored["gender"][:, 0]),
        "average": (
            (plain["age"][:, 0] + mirrored["age"][:, 0]) / 2,
            (plain["gender"][:, 0] + mirrored["gender"][:, 0]) / 2,
        ),
    }
    result = {}
    for name, (age, female) in predictions.items():
        metrics = compute_metrics(
            age_true=split["age"],
            age_pred=age,
            gender_true=split["gender"],
            female_prob=female,
            race=split["race"],
            age_buckets=age_buckets,
        )
        result[name] = {key: round(float(metrics[key]), 4) for key in REPORTED}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", type=Path, required=True)
    parser.add_argument("--model", type=Path, required=True, help="a folder with model.keras")
    parser.add_argument("--label", required=True)
    args = parser.parse_args()
    from agegender.model import load_model

    model = load_model(args.model / "model.keras")
    params = load_params(ROOT / "params.yaml")
    prepared = args.store / "artifacts" / "prepared"
    splits = {name: load_split(prepared, name) for name in ("val", "test")}
    size = splits["test"]["images"].shape[1]
    print(f"scoring {args.model} on {prepared}: plain, mirrored and averaged", flush=True)
    entry = {
        "model": str(args.model),
        **{name: scores(model, split, params.validate_.age_buckets) for name, split in splits.items()},
        "ms_per_face_batch32": {
            "plain": ms_per_face(model, size),
            "with_mirror": ms_per_face(model, size, with_mirror=True),
        },
    }
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    results[args.label] = entry
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(entry, indent=2))
    print(f"results: {RESULTS}")


if __name__ == "__main__":
    main()
