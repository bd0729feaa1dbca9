"""Test-split metrics, their plots, and the promotion gate.

`compute_metrics` returns plain JSON types: flat scalars (see `scalar_metrics`) for MLflow
and DVC, nested dicts for per-bucket, per-race and confusion-matrix detail. `decide_gates`
compares two such dicts from the same test split against `GateParams`, and decides the
improvement on a paired bootstrap of the two models' per-image errors (`compare_paired`).

The gate is plain comparisons rather than `mlflow.validate_evaluation_results`: that call
accepts EvaluationResult objects built from these metrics, but it reports failure as one
exception whose message joins all failed checks (no per-check values or passes), its
`min_absolute_change` must be > 0 (our `min_improvement` may be 0), and it cannot express
an allowed drop (a negative change) such as `max_gender_accuracy_drop`.
"""

from __future__ import annotations

import csv
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from sklearn.metrics import (
    ConfusionMatrixDisplay,
    RocCurveDisplay,
    accuracy_score,
    confusion_matrix,
    f1_score,
    mean_absolute_error,
    roc_auc_score,
    roc_curve,
    root_mean_squared_error,
)

from agegender import paths
from agegender.config import GateParams, Params
from agegender.files import atomic_dir, write_json
from agegender.labels import ADULT_AGE, GENDER_THRESHOLD, age_bucket_names, bucket_ages

RACES = {0: "White", 1: "Black", 2: "Asian", 3: "Indian", 4: "Others"}
MIN_GROUP_SIZE = 5  # smaller race groups give MAEs too noisy to gate on
CS_YEARS = 5
DIGITS = 4
# Fixed, so the same two models on the same test split always get the same decision.
BOOTSTRAP_SEED = 0


def _round(value: float | None) -> float | None:
    return None if value is None else round(float(value), DIGITS)


def _gap(values: list[float]) -> float | None:
    return _round(max(values) - min(values)) if len(values) >= 2 else None


def _predicted_gender(female_prob: np.ndarray) -> np.ndarray:
    return (np.asarray(female_prob) >= GENDER_THRESHOLD).astype(int)


def _by_bucket(age_true: np.ndarray, age_buckets: list[int], score) -> dict:
    """score(mask) for each bucket of true age, None for an empty bucket (keys stay stable)."""
    buckets = np.asarray(bucket_ages(age_true, age_buckets))
    return {
        name: _round(score(buckets == name)) if (buckets == name).any() else None
        for name in age_bucket_names(age_buckets)
    }


def _mae_by_bucket(age_true: np.ndarray, age_pred: np.ndarray, age_buckets: list[int]) -> dict:
    return _by_bucket(age_true, age_buckets, lambda m: mean_absolute_error(age_true[m], age_pred[m]))


def compute_metrics(
    *,
    age_true: np.ndarray,
    age_pred: np.ndarray,
    gender_true: np.ndarray,
    female_prob: np.ndarray,
    race: np.ndarray,
    age_buckets: list[int],
) -> dict:
    """Age and gender metrics on one split; gender 1 is female, race -1 is unknown.

    Flat scalars: n_samples, age_mae, age_rmse, age_cs5, gender_accuracy, gender_f1,
    gender_roc_auc, gender_accuracy_18plus, age_mae_18plus, age_mae_group_gap, gender_accuracy_group_gap
    (None where undefined). Nested: age_mae_by_bucket {bucket: mae}, gender_accuracy_by_bucket
    {bucket: accuracy} (buckets of true age),
    gender_confusion_matrix [[tn, fp], [fn, tp]],
    by_race {name: {n_samples, age_mae, gender_accuracy}}.
    """
    age_true, age_pred = np.asarray(age_true, float), np.asarray(age_pred, float)
    gender_true, race = np.asarray(gender_true, int), np.asarray(race, int)
    female_prob = np.asarray(female_prob, float)
    sizes = {len(a) for a in (age_true, age_pred, gender_true, female_prob, race)}
    if len(sizes) != 1 or 0 in sizes:
        raise ValueError(f"inputs must be non-empty and of equal length, got lengths {sizes}")
    gender_pred = _predicted_gender(female_prob)
    errors = np.abs(age_pred - age_true)
    adults = age_true >= ADULT_AGE

    by_race = {}
    for code, name in RACES.items():
        mask = race == code
        if mask.sum() < MIN_GROUP_SIZE:
            continue
        by_race[name] = {
            "n_samples": int(mask.sum()),
            "age_mae": _round(mean_absolute_error(age_true[mask], age_pred[mask])),
            "gender_accuracy": _round(accuracy_score(gender_true[mask], gender_pred[mask])),
        }

    (tn, fp), (fn, tp) = confusion_matrix(gender_true, gender_pred, labels=[0, 1]).tolist()
    return {
        "n_samples": len(age_true),
        "age_mae": _round(mean_absolute_error(age_true, age_pred)),
        "age_rmse": _round(root_mean_squared_error(age_true, age_pred)),
        "age_cs5": _round(np.mean(errors <= CS_YEARS)),
        "gender_accuracy": _round(accuracy_score(gender_true, gender_pred)),
        "gender_f1": _round(f1_score(gender_true, gender_pred, pos_label=1, zero_division=0)),
        # AUC is undefined with one class; None rather than sklearn's warning and nan
        "gender_roc_auc": _round(roc_auc_score(gender_true, female_prob)) if len(np.unique(gender_true)) == 2 else None,
        "gender_accuracy_18plus": _round(accuracy_score(gender_true[adults], gender_pred[adults]))
        if adults.any()
        else None,
        "age_mae_18plus": _round(errors[adults].mean()) if adults.any() else None,
        "age_mae_group_gap": _gap([g["age_mae"] for g in by_race.values()]),
        "gender_accuracy_group_gap": _gap([g["gender_accuracy"] for g in by_race.values()]),
        "age_mae_by_bucket": _mae_by_bucket(age_true, age_pred, age_buckets),
        "gender_accuracy_by_bucket": _by_bucket(
            age_true, age_buckets, lambda m: accuracy_score(gender_true[m], gender_pred[m])
        ),
        "gender_confusion_matrix": [[tn, fp], [fn, tp]],
        "by_race": by_race,
    }


def scalar_metrics(metrics: dict) -> dict[str, float]:
    """The flat, defined numeric metrics of `compute_metrics`, ready for log_metrics / DVC."""
    return {
        key: value for key, value in metrics.items() if isinstance(value, int | float) and not isinstance(value, bool)
    }


def save_plots(
    out_dir: Path,
    *,
    age_true: np.ndarray,
    age_pred: np.ndarray,
    gender_true: np.ndarray,
    female_prob: np.ndarray,
    age_buckets: list[int],
) -> list[Path]:
    """Write the PNG plots and the CSV/JSON data behind them; return every path written.

    predictions.csv (true_age, pred_age, gender, pred_gender, female_prob) feeds DVC's
    scatter and confusion templates; age_mae_by_bucket.json and roc.csv the bar and ROC.
    The ROC plot and roc.csv are skipped when gender_true holds a single class.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    age_true, age_pred = np.asarray(age_true, float), np.asarray(age_pred, float)
    gender_true, female_prob = np.asarray(gender_true, int), np.asarray(female_prob, float)
    gender_pred = _predicted_gender(female_prob)
    written = []

    def save(fig: Figure, name: str) -> None:
        # Figure without pyplot renders PNG through Agg and is never kept in pyplot's registry
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=100)
        written.append(out_dir / name)

    predictions = out_dir / "predictions.csv"
    with predictions.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["true_age", "pred_age", "gender", "pred_gender", "female_prob"])
        writer.writerows(
            (round(t, 2), round(p, 2), g, pg, round(fp, DIGITS))
            for t, p, g, pg, fp in zip(
                age_true.tolist(),
                age_pred.tolist(),
                gender_true.tolist(),
                gender_pred.tolist(),
                female_prob.tolist(),
                strict=True,
            )
        )
    written.append(predictions)

    fig = Figure(figsize=(5, 5))
    ax = fig.add_subplot()
    ax.scatter(age_true, age_pred, s=8, alpha=0.5)
    top = float(max(age_true.max(), age_pred.max()))
    ax.plot([0, top], [0, top], color="grey", linestyle="--", label="perfect")
    ax.set(xlabel="true age", ylabel="predicted age", title="Predicted vs true age")
    ax.legend()
    save(fig, "age_scatter.png")

    by_bucket = _mae_by_bucket(age_true, age_pred, age_buckets)
    bucket_data = out_dir / "age_mae_by_bucket.json"
    bucket_data.write_text(json.dumps([{"bucket": name, "mae": mae} for name, mae in by_bucket.items()], indent=2))
    written.append(bucket_data)
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    filled = {name: mae for name, mae in by_bucket.items() if mae is not None}
    ax.bar(list(filled), list(filled.values()))
    ax.set(xlabel="true age bucket", ylabel="MAE (years)", title="Age MAE by bucket")
    save(fig, "age_mae_by_bucket.png")

    fig = Figure(figsize=(4.5, 4))
    ax = fig.add_subplot()
    ConfusionMatrixDisplay(
        confusion_matrix(gender_true, gender_pred, labels=[0, 1]),
        display_labels=["male", "female"],
    ).plot(ax=ax, colorbar=False)
    ax.set_title("Gender confusion matrix")
    save(fig, "gender_confusion.png")

    if len(np.unique(gender_true)) == 2:
        fpr, tpr, thresholds = roc_curve(gender_true, female_prob, pos_label=1)
        roc_data = out_dir / "roc.csv"
        with roc_data.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["fpr", "tpr", "threshold"])
            # the first threshold is inf (nothing predicted female); clip it for plain CSV
            rows = np.column_stack([fpr, tpr, thresholds.clip(0, 1)]).round(DIGITS)
            writer.writerows(rows.tolist())
        written.append(roc_data)
        fig = Figure(figsize=(5, 5))
        ax = fig.add_subplot()
        RocCurveDisplay.from_predictions(
            gender_true, female_prob, pos_label=1, name="female", ax=ax, plot_chance_level=True
        )
        ax.set_title("Gender ROC")
        save(fig, "gender_roc.png")
    return written


def _check(name: str, kind: str, value: float | None, threshold: float, passed: bool) -> dict:
    return {"name": name, "kind": kind, "value": value, "threshold": threshold, "passed": passed}


def compare_paired(
    champion_errors: np.ndarray, candidate_errors: np.ndarray, *, confidence: float, resamples: int
) -> dict:
    """Champion MAE - candidate MAE on the same test images, with a paired bootstrap interval.

    Each resample draws the same images for both models, so an image's difficulty cancels
    out and the interval shows only how sure this test split is of the difference. The
    percentile interval, not BCa: BCa is undefined (nan) when the two error arrays are
    equal, as they are when a model is compared with itself.
    """
    from scipy.stats import bootstrap

    champion_errors, candidate_errors = np.asarray(champion_errors, float), np.asarray(candidate_errors, float)
    if champion_errors.shape != candidate_errors.shape or champion_errors.size == 0:
        raise ValueError(
            f"per-image errors must be non-empty and of equal length, got {champion_errors.shape} "
            f"and {candidate_errors.shape}"
        )
    interval = bootstrap(
        (champion_errors, candidate_errors),
        lambda champ, cand, axis: champ.mean(axis=axis) - cand.mean(axis=axis),
        paired=True,
        vectorized=True,
        n_resamples=resamples,
        confidence_level=confidence,
        method="percentile",
        random_state=np.random.default_rng(BOOTSTRAP_SEED),
    ).confidence_interval
    return {
        "method": "paired bootstrap, percentile interval",
        "statistic": "champion age MAE - candidate age MAE",
        "n_images": champion_errors.size,
        "resamples": resamples,
        "confidence": confidence,
        "seed": BOOTSTRAP_SEED,
        "observed": _round(champion_errors.mean() - candidate_errors.mean()),
        "interval": [_round(interval.low), _round(interval.high)],
    }


def decide_gates(
    candidate: dict,
    champion: dict | None,
    gates: GateParams,
    *,
    candidate_errors: np.ndarray | None = None,
    champion_errors: np.ndarray | None = None,
) -> dict:
    """Gate a candidate's test metrics, and against the champion's on the same split.

    Check names follow GateParams: "max_*" passes when value <= threshold, "min_*" when
    value >= threshold. Relative values are differences to the champion: min_improvement
    is the lower bound of the paired bootstrap interval of champion MAE - candidate MAE
    (from the per-image absolute age errors, in the same image order; needed with a
    champion), recorded in full as "improvement_test"; max_gender_accuracy_drop is the
    observed champion - candidate accuracy. With no champion, full_pass equals absolute_pass.
    """
    gap = candidate["age_mae_group_gap"]
    checks = [
        _check(
            "max_age_mae",
            "absolute",
            candidate["age_mae"],
            gates.max_age_mae,
            candidate["age_mae"] <= gates.max_age_mae,
        ),
        _check(
            "min_gender_accuracy",
            "absolute",
            candidate["gender_accuracy"],
            gates.min_gender_accuracy,
            candidate["gender_accuracy"] >= gates.min_gender_accuracy,
        ),
        # no race group large enough to compare means no measurable gap, so nothing to block on
        _check(
            "max_group_gap",
            "absolute",
            gap,
            gates.max_group_gap,
            gap is None or gap <= gates.max_group_gap,
        ),
    ]
    improvement = None
    if champion is not None:
        if candidate_errors is None or champion_errors is None:
            raise ValueError("gating against a champion needs both models' per-image errors")
        improvement = compare_paired(
            champion_errors, candidate_errors, confidence=gates.confidence, resamples=gates.bootstrap_resamples
        )
        lower = improvement["interval"][0]
        # metrics carry 4 decimals; rounding the differences keeps exact-threshold ties exact
        drop = _round(champion["gender_accuracy"] - candidate["gender_accuracy"])
        checks += [
            _check("min_improvement", "relative", lower, gates.min_improvement, lower >= gates.min_improvement),
            _check(
                "max_gender_accuracy_drop",
                "relative",
                drop,
                gates.max_gender_accuracy_drop,
                drop <= gates.max_gender_accuracy_drop,
            ),
        ]

    absolute_pass = all(c["passed"] for c in checks if c["kind"] == "absolute")
    full_pass = all(c["passed"] for c in checks)
    failed = [c for c in checks if not c["passed"]]
    if failed:
        summary = "failed " + "; ".join(
            f"{c['name']}: {c['value']} {'>' if c['name'].startswith('max_') else '<'} {c['threshold']}" for c in failed
        )
    elif champion is None:
        summary = f"passed all {len(checks)} absolute checks; no champion to compare with"
    else:
        summary = (
            f"passed all {len(checks)} checks; age MAE {candidate['age_mae']} improves on the "
            f"champion's {champion['age_mae']}"
        )
    if improvement is not None:
        low, high = improvement["interval"]
        summary += (
            f"; champion - candidate age MAE {improvement['observed']}, {improvement['confidence']:.0%} "
            f"interval [{low}, {high}] ({improvement['method']} over {improvement['n_images']} test images)"
        )
    return {
        "absolute_pass": absolute_pass,
        "full_pass": full_pass,
        "has_champion": champion is not None,
        "checks": checks,
        "summary": summary,
        "improvement_test": improvement,
    }


@dataclass(frozen=True)
class GateCheck:
    """One check of the gate decision, as in gate.json's "checks"."""

    name: str
    kind: str
    value: float | None
    threshold: float
    passed: bool


@dataclass(frozen=True)
class EvaluateResult:
    """What the evaluate stage decided; gate.json in artifacts/eval holds the same decision."""

    champion_version: str | None
    checks: list[GateCheck]
    absolute_pass: bool
    full_pass: bool
    gate_summary: str

    @property
    def summary(self) -> str:
        against = f"against champion version {self.champion_version}" if self.champion_version else "no champion yet"
        lines = [f"Test split scored {against}:"]
        lines += [
            f"  {'pass' if c.passed else 'FAIL'} {c.name}: {c.value} (threshold {c.threshold})" for c in self.checks
        ]
        lines += [self.gate_summary, f"Metrics, plots and {paths.GATE} in {paths.EVAL}/"]
        return "\n".join(lines)


def run_evaluate_stage(root: Path, params: Params, *, tracking_uri: str | None) -> EvaluateResult:
    """The evaluate stage: score artifacts/model and the registry's champion on the test split, decide the gates.

    Writes artifacts/eval and logs the test metrics and decision to the model's MLflow run.
    `tracking_uri` is the store with the run and the registry (None: the project's own).
    """
    from mlflow import MlflowClient

    from agegender.registry import champion
    from agegender.tracking import configure_tracking

    configure_tracking(root, tracking_uri)
    current = champion(MlflowClient(), params.registry.model_name)
    decision = evaluate_candidate(
        root / paths.MODEL,
        root / paths.PREPARED,
        root / paths.DATA,
        root / paths.EVAL,
        # the version found, not the alias: the champion cannot move between lookup and load
        champion_uri=f"models:/{current.name}/{current.version}" if current else None,
        gates=params.gates,
        age_buckets=params.validate_.age_buckets,
    )
    log_evaluation(root / paths.EVAL, root / paths.MODEL)
    return EvaluateResult(
        champion_version=decision["champion"],
        checks=[GateCheck(**check) for check in decision["checks"]],
        absolute_pass=decision["absolute_pass"],
        full_pass=decision["full_pass"],
        gate_summary=decision["summary"],
    )


def evaluate_candidate(
    model_dir: Path,
    prepared_dir: Path,
    data_dir: Path,
    out_dir: Path,
    *,
    champion_uri: str | None,
    gates: GateParams,
    age_buckets: list[int],
) -> dict:
    """Score the trained model and the current champion on the same test split, and decide the gates.

    Both go through `Predictor` from the raw test images, as the service would see them.
    Writes metrics.json, champion_metrics.json, gate.json and plots to out_dir.
    """
    from agegender.inference import Predictor

    test = load_test_split(prepared_dir, data_dir)
    candidate = Predictor.from_path(model_dir)
    metrics, predictions = score_predictor(candidate, test, age_buckets)
    champion = Predictor.from_registry(champion_uri) if champion_uri else None
    champion_metrics, champion_predictions = score_predictor(champion, test, age_buckets) if champion else (None, None)
    decision = decide_gates(
        metrics,
        champion_metrics,
        gates,
        candidate_errors=absolute_errors(predictions),
        champion_errors=absolute_errors(champion_predictions) if champion else None,
    )
    decision["champion"] = champion.info.version if champion else None

    with atomic_dir(out_dir) as staging:
        write_json(staging / paths.TEST_METRICS, metrics)
        write_json(staging / paths.CHAMPION_METRICS, champion_metrics)
        write_json(staging / paths.GATE, decision)
        save_plots(staging / paths.PLOTS, age_buckets=age_buckets, **predictions)
    return decision


def load_test_split(prepared_dir: Path, data_dir: Path, split: str = "test") -> pd.DataFrame:
    """The rows of split.csv in `split` (the test split unless said) with their decoded images."""
    from agegender.images import read_image

    rows = pd.read_csv(prepared_dir / paths.SPLIT_TABLE, dtype={"race": "Int64"})
    rows = rows[rows["split"] == split].reset_index(drop=True)
    if rows.empty:
        raise ValueError(f"{prepared_dir / paths.SPLIT_TABLE}: the {split} split is empty")
    rows["image"] = [read_image(data_dir / f) for f in rows["file"]]
    return rows


def score_predictor(predictor, test: pd.DataFrame, age_buckets: list[int]) -> tuple[dict, dict]:
    ages, female = predictor.predict_chips(list(test["image"]))
    predictions = {
        "age_true": test["age"].to_numpy(float),
        "age_pred": ages,
        "gender_true": test["gender"].to_numpy(int),
        "female_prob": female,
    }
    metrics = compute_metrics(race=test["race"].fillna(-1).to_numpy(int), age_buckets=age_buckets, **predictions)
    return metrics, predictions


def absolute_errors(predictions: dict) -> np.ndarray:
    """Per-image absolute age errors, in test-split order, from `score_predictor`'s predictions."""
    return np.abs(np.asarray(predictions["age_pred"], float) - predictions["age_true"])


def log_evaluation(eval_dir: Path, model_dir: Path) -> None:
    """Attach test metrics, plots and the gate decision to the winner's MLflow run."""
    import mlflow

    run_id = json.loads((model_dir / paths.MODEL_CARD).read_text())["mlflow_run_id"]
    metrics = json.loads((eval_dir / paths.TEST_METRICS).read_text())
    decision = json.loads((eval_dir / paths.GATE).read_text())
    client = mlflow.MlflowClient()
    for name, value in scalar_metrics(metrics).items():
        client.log_metric(run_id, f"test_{name}", value)
    client.log_artifacts(run_id, str(eval_dir), artifact_path="evaluation")
    tags = {
        "gate.absolute_pass": decision["absolute_pass"],
        "gate.full_pass": decision["full_pass"],
        "gate.summary": decision["summary"],
    }
    tags.update(
        {
            f"gate.{c['name']}": f"{c['value']} vs {c['threshold']}: {'pass' if c['passed'] else 'fail'}"
            for c in decision["checks"]
        }
    )
    tags.update({f"gate.improvement_test.{k}": v for k, v in (decision["improvement_test"] or {}).items()})
    for key, value in tags.items():
        client.set_tag(run_id, key, str(value))


def score_labelled_source(predictor, source: str, age_buckets: list[int]) -> dict:
    """Metrics of `predictor` on any labelled folder, archive or CSV manifest (cross-dataset checks).

    Images are face chips scored as the test split is; unlabelled or unreadable images are
    counted and skipped, never silently.
    """
    from agegender.data.ingest import read_items
    from agegender.images import ImageError, read_image

    with tempfile.TemporaryDirectory(prefix="agegender-eval-") as scratch:
        items = read_items(source, Path(scratch))
        rows, skipped = [], {"unlabelled": 0, "unreadable": 0}
        for item in items:
            if item.path is None or item.age is None or item.gender is None:
                skipped["unlabelled"] += 1
                continue
            try:
                image = read_image(item.path)
            except ImageError:
                skipped["unreadable"] += 1
                continue
            rows.append({"age": item.age, "gender": item.gender, "race": item.race, "image": image})
    if not rows:
        raise ValueError(f"{source}: no labelled, readable images to score (skipped: {skipped})")
    table = pd.DataFrame(rows).astype({"race": "Int64"})
    metrics, _ = score_predictor(predictor, table, age_buckets)
    return {"source": source, "model": predictor.describe(), "skipped": skipped, **metrics}
