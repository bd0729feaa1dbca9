"""Run-to-run noise of training, and what the paired gate decides between models of one config.

Run: .venv/bin/python benchmarks/gate_noise.py [--images 3000] [--epochs 8] [--seeds 42 42 43 44 45]
Ingests a fixed random subset of ../shared/datasets/utkface-part1, preprocesses it once
with a 30 % test split (about as many test images as the whole folder's 10 %), then trains
the same config once per seed (a repeated seed is a rerun) and scores every model on the
same test images through the evaluation code. Writes benchmarks/results/gate_noise.json:
val/test metrics of each run, whether reruns of one seed are identical, and for every
ordered pair (candidate, champion) the paired bootstrap interval and the gate's decision
with the params.yaml gates, next to what the old rule (observed gain >= min_improvement)
would have decided. The largest lower bound over pairs of different seeds is the noise
that gates.min_improvement must stay above.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from agegender.config import Params, load_params
from agegender.data.ingest import ingest
from agegender.evaluation import absolute_errors, decide_gates, load_test_split, score_predictor
from agegender.inference import Predictor
from agegender.preprocess import prepare_dataset
from agegender.tracking import configure_tracking
from agegender.training import train_candidates
from agegender.validation import validate_dataset

ROOT = Path(__file__).resolve().parents[1]
UTKFACE = ROOT.parent / "shared" / "datasets" / "utkface-part1"
RESULTS = ROOT / "benchmarks" / "results" / "gate_noise.json"
SUMMARY_KEYS = ("age_mae", "gender_accuracy", "n_samples")


def bench_params(epochs: int) -> Params:
    """params.yaml with a short schedule (no early stop) and a test split large enough to gate on."""
    raw = load_params(ROOT / "params.yaml").model_dump(by_alias=True, mode="json")
    raw["preprocess"]["split"] = {"train": 0.6, "val": 0.1, "test": 0.3}
    raw["train"].update({"epochs": epochs, "patience": epochs, "warmup_epochs": 1})
    return Params.model_validate(raw)


def copy_subset(folder: Path, count: int) -> None:
    folder.mkdir()
    files = sorted(UTKFACE.glob("*.jpg"))
    for index in np.random.default_rng(0).choice(len(files), size=count, replace=False):
        shutil.copyfile(files[index], folder / files[index].name)


def train_run(tmp: Path, params: Params, seed: int, name: str) -> dict:
    """Train one model of the config with this seed; its val metrics and its folder."""
    raw = params.model_dump(by_alias=True, mode="json")
    raw["train"]["seed"] = seed
    model_dir = tmp / "models" / name
    (row,) = train_candidates(
        tmp / "artifacts/prepared",
        model_dir,
        Params.model_validate(raw),
        data_version="benchmark",
        git_commit="benchmark",
        run_name=name,
    )
    return {
        "name": name,
        "seed": seed,
        "val_age_mae": row["val_age_mae"],
        "val_gender_accuracy": row["val_gender_accuracy"],
        "train_seconds": row["train_seconds"],
        "model_dir": model_dir,
    }


def compare(candidate: dict, champion: dict, params: Params) -> dict:
    decision = decide_gates(
        candidate["metrics"],
        champion["metrics"],
        params.gates,
        candidate_errors=candidate["errors"],
        champion_errors=champion["errors"],
    )
    test = decision["improvement_test"]
    return {
        "candidate": candidate["name"],
        "champion": champion["name"],
        "same_seed": candidate["seed"] == champion["seed"],
        "observed_gain": test["observed"],
        "interval": test["interval"],
        "gender_accuracy_drop": round(
            champion["metrics"]["gender_accuracy"] - candidate["metrics"]["gender_accuracy"], 4
        ),
        "promoted": decision["full_pass"],
        "failed": [c["name"] for c in decision["checks"] if not c["passed"]],
        "old_rule_promoted": test["observed"] >= params.gates.min_improvement,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 42, 43, 44, 45])
    args = parser.parse_args()
    params = bench_params(args.epochs)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        tmp = Path(scratch)
        copy_subset(tmp / "source", args.images)
        ingest(str(tmp / "source"), tmp / "data", append=False, demo=params.data.demo)
        validate_dataset(tmp / "data", tmp / "artifacts/validation", params.validate_)
        prepare_dataset(
            tmp / "artifacts/validation/manifest.csv",
            tmp / "data",
            tmp / "artifacts/prepared",
            params.preprocess,
            params.validate_.age_buckets,
        )
        configure_tracking(tmp, f"sqlite:///{tmp / 'mlflow.db'}")
        runs = [train_run(tmp, params, seed, f"run{i}-seed{seed}") for i, seed in enumerate(args.seeds)]
        test = load_test_split(tmp / "artifacts/prepared", tmp / "data")
        for run in runs:
            metrics, predictions = score_predictor(
                Predictor.from_path(run.pop("model_dir")), test, params.validate_.age_buckets
            )
            run.update(metrics=metrics, errors=absolute_errors(predictions))
    pairs = [compare(cand, champ, params) for cand, champ in itertools.permutations(runs, 2)]
    reruns = [p for p in pairs if p["same_seed"]]
    noise = [p for p in pairs if not p["same_seed"]]
    result = {
        "dataset": f"shared/datasets/utkface-part1, {args.images} images (random subset, seed 0)",
        "config": {
            "train": params.train.model_dump(mode="json", exclude={"seed", "augment", "loss_weights"}),
            "split": params.preprocess.split.model_dump(),
            "gates": params.gates.model_dump(),
        },
        "runs": [
            {
                **{k: run[k] for k in ("name", "seed", "val_age_mae", "val_gender_accuracy", "train_seconds")},
                **{f"test_{k}": run["metrics"][k] for k in SUMMARY_KEYS},
            }
            for run in runs
        ],
        "same_seed_reruns_identical": all(
            np.array_equal(a["errors"], b["errors"])
            for a, b in itertools.combinations(runs, 2)
            if a["seed"] == b["seed"]
        ),
        "pairs": pairs,
        "different_seeds": {
            "max_abs_test_mae_difference": max(abs(p["observed_gain"]) for p in noise),
            "max_interval_lower_bound": max(p["interval"][0] for p in noise),
            "max_abs_gender_accuracy_difference": max(abs(p["gender_accuracy_drop"]) for p in noise),
            "passed_min_improvement": sum("min_improvement" not in p["failed"] for p in noise),
            "promoted_by_new_gate": sum(p["promoted"] for p in noise),
            "promoted_by_old_rule": sum(p["old_rule_promoted"] for p in noise),
            "pairs": len(noise),
        },
        "same_seed_rerun_promoted": any(p["promoted"] for p in reruns),
        "wall_seconds": round(time.perf_counter() - start, 1),
        "load_average_at_end": os.getloadavg(),
    }
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
