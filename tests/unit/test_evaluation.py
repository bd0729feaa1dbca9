"""Test-split metrics against hand-computed values, the plots, and every branch of the gate."""

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import f1_score, roc_auc_score

from agegender.config import GateParams, ValidateParams
from agegender.evaluation import compare_paired, compute_metrics, decide_gates, save_plots, scalar_metrics

BUCKETS = ValidateParams().age_buckets  # 0-9, 10-19, 20-29, 30-44, 45-59, 60-116

# 12 faces: 5 White, 5 Black, 1 Asian (too few to be a group), 1 of unknown race.
AGE_TRUE = np.array([5, 15, 25, 35, 50, 70, 20, 30, 40, 12, 60, 33], float)
AGE_ERROR = np.array([1, -2, 3, -4, 6, 0, 2, -2, 2, -2, 10, 7], float)
GENDER = np.array([1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0])
# White: right, right, wrong (0.4), wrong (0.6), right at exactly 0.5; Black: all right.
FEMALE_PROB = np.array([0.9, 0.2, 0.4, 0.6, 0.5, 0.1, 0.8, 0.3, 0.7, 0.45, 0.95, 0.05])
RACE = np.array([0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 2, -1])


def metrics(**overrides) -> dict:
    arrays = {
        "age_true": AGE_TRUE,
        "age_pred": AGE_TRUE + AGE_ERROR,
        "gender_true": GENDER,
        "female_prob": FEMALE_PROB,
        "race": RACE,
        "age_buckets": BUCKETS,
    }
    return compute_metrics(**{**arrays, **overrides})


def test_age_metrics_match_hand_computed_values():
    m = metrics()
    assert m["n_samples"] == 12
    assert m["age_mae"] == round(41 / 12, 4)
    assert m["age_rmse"] == round(math.sqrt(231 / 12), 4)
    assert m["age_cs5"] == 0.75  # 9 of 12 errors are within 5 years, the 5 itself included
    assert m["age_mae_by_bucket"] == {
        "0-9": 1.0,
        "10-19": 2.0,
        "20-29": 2.5,
        "30-44": 3.75,
        "45-59": 6.0,
        "60-116": 5.0,
    }


def test_empty_age_bucket_is_none():
    by_bucket = metrics(age_buckets=[0, 10, 20, 30, 45, 60, 80, 117])["age_mae_by_bucket"]
    assert by_bucket["60-79"] == 5.0
    assert by_bucket["80-116"] is None


def test_gender_metrics_match_sklearn_and_hand_computed_values():
    m = metrics()
    assert m["gender_accuracy"] == round(10 / 12, 4)
    assert m["gender_confusion_matrix"] == [[5, 1], [1, 5]]  # [[tn, fp], [fn, tp]]
    assert m["gender_f1"] == round(f1_score(GENDER, FEMALE_PROB >= 0.5), 4) == round(10 / 12, 4)
    assert m["gender_roc_auc"] == round(roc_auc_score(GENDER, FEMALE_PROB), 4)
    assert m["gender_roc_auc"] == round(33 / 36, 4)
    assert m["gender_accuracy_18plus"] == round(7 / 9, 4)  # the 5, 12 and 15 year olds are out
    assert m["age_mae_18plus"] == 36 / 9  # |errors| of the nine adults: 3 4 6 0 2 2 2 10 7
    # wrong: the 25 (0.4) and the 35 (0.6) year olds
    assert m["gender_accuracy_by_bucket"] == {
        "0-9": 1.0,
        "10-19": 1.0,
        "20-29": 0.5,
        "30-44": 0.75,
        "45-59": 1.0,
        "60-116": 1.0,
    }


def test_race_groups_and_gaps():
    m = metrics()
    assert m["by_race"] == {
        "White": {"n_samples": 5, "age_mae": 3.2, "gender_accuracy": 0.6},
        "Black": {"n_samples": 5, "age_mae": 1.6, "gender_accuracy": 1.0},
    }
    assert m["age_mae_group_gap"] == 1.6
    assert m["gender_accuracy_group_gap"] == 0.4


def test_undefined_metrics_are_none():
    m = metrics(
        age_true=np.full(4, 10.0),
        age_pred=np.full(4, 12.0),
        gender_true=np.ones(4, int),
        female_prob=np.array([0.9, 0.8, 0.4, 0.7]),
        race=np.array([0, 0, 1, -1]),
    )
    assert m["gender_roc_auc"] is None  # a single class
    assert m["gender_accuracy_18plus"] is None  # no adults
    assert m["age_mae_18plus"] is None
    assert m["by_race"] == {}
    assert m["age_mae_group_gap"] is None
    assert m["gender_accuracy_group_gap"] is None


def test_metrics_are_plain_json_types():
    def check(value):
        if isinstance(value, dict):
            assert all(type(k) is str for k in value)
            for v in value.values():
                check(v)
        elif isinstance(value, list):
            for v in value:
                check(v)
        else:
            assert value is None or type(value) in (int, float), value

    m = metrics()
    check(m)
    assert json.loads(json.dumps(m)) == m


def test_scalar_metrics_keep_only_defined_numbers():
    scalars = scalar_metrics(metrics(gender_true=np.ones(12, int)))
    assert "gender_roc_auc" not in scalars
    assert "by_race" not in scalars and "gender_confusion_matrix" not in scalars
    assert {"age_mae", "age_rmse", "age_cs5", "gender_accuracy", "age_mae_group_gap"} <= set(scalars)
    assert all(type(v) in (int, float) for v in scalars.values())


def test_mismatched_lengths_are_rejected():
    with pytest.raises(ValueError, match="equal length"):
        metrics(race=RACE[:-1])


def plot_arrays(**overrides) -> dict:
    arrays = {
        "age_true": AGE_TRUE,
        "age_pred": AGE_TRUE + AGE_ERROR,
        "gender_true": GENDER,
        "female_prob": FEMALE_PROB,
        "age_buckets": BUCKETS,
    }
    return {**arrays, **overrides}


def test_plots_and_their_data_are_written(tmp_path: Path):
    paths = save_plots(tmp_path / "plots", **plot_arrays())
    names = {p.name for p in paths}
    assert names == {
        "predictions.csv",
        "age_scatter.png",
        "age_mae_by_bucket.json",
        "age_mae_by_bucket.png",
        "gender_confusion.png",
        "roc.csv",
        "gender_roc.png",
    }
    for path in paths:
        assert path.is_file() and path.stat().st_size > 0
        if path.suffix == ".png":
            assert path.read_bytes().startswith(b"\x89PNG")
    with (tmp_path / "plots" / "predictions.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 12
    assert list(rows[0]) == ["true_age", "pred_age", "gender", "pred_gender", "female_prob"]
    assert rows[4] == {
        "true_age": "50.0",
        "pred_age": "56.0",
        "gender": "1",
        "pred_gender": "1",
        "female_prob": "0.5",
    }
    bars = json.loads((tmp_path / "plots" / "age_mae_by_bucket.json").read_text())
    assert bars[0] == {"bucket": "0-9", "mae": 1.0}


def test_roc_is_skipped_for_a_single_gender(tmp_path: Path):
    paths = save_plots(tmp_path, **plot_arrays(gender_true=np.ones(12, int)))
    assert not {"roc.csv", "gender_roc.png"} & {p.name for p in paths}
    assert all(p.stat().st_size > 0 for p in paths)


GATES = GateParams(
    max_age_mae=15.0,
    min_gender_accuracy=0.6,
    max_group_gap=10.0,
    min_improvement=0.05,
    confidence=0.95,
    bootstrap_resamples=2000,
    max_gender_accuracy_drop=0.01,
)
N_IMAGES = 500
# Per-image absolute errors of a typical model: skewed, most small, a few large.
BASE_ERRORS = np.random.default_rng(0).gamma(1.5, 3.0, N_IMAGES)


def result(age_mae=10.0, gender_accuracy=0.8, gap: float | None = 2.0) -> dict:
    """The keys of compute_metrics that the gate reads."""
    return {"age_mae": age_mae, "gender_accuracy": gender_accuracy, "age_mae_group_gap": gap}


def shifted_errors(age_mae: float) -> np.ndarray:
    """Errors with this MAE that differ from another model's by the same amount on every image."""
    return BASE_ERRORS - BASE_ERRORS.mean() + age_mae


def decide(candidate: dict, champion: dict | None, gates: GateParams = GATES) -> dict:
    """The gate, with per-image errors that differ exactly by the two MAEs (a zero-width interval)."""
    if champion is None:
        return decide_gates(candidate, None, gates)
    return decide_gates(
        candidate,
        champion,
        gates,
        candidate_errors=shifted_errors(candidate["age_mae"]),
        champion_errors=shifted_errors(champion["age_mae"]),
    )


def failed(decision: dict) -> list[str]:
    return [c["name"] for c in decision["checks"] if not c["passed"]]


def test_no_champion_pass():
    decision = decide(result(), None)
    assert decision["absolute_pass"] and decision["full_pass"]
    assert not decision["has_champion"] and decision["improvement_test"] is None
    assert [(c["name"], c["kind"]) for c in decision["checks"]] == [
        ("max_age_mae", "absolute"),
        ("min_gender_accuracy", "absolute"),
        ("max_group_gap", "absolute"),
    ]
    assert decision["checks"][0] == {
        "name": "max_age_mae",
        "kind": "absolute",
        "value": 10.0,
        "threshold": 15.0,
        "passed": True,
    }
    assert "no champion" in decision["summary"] and "\n" not in decision["summary"]


def test_no_champion_fail_full_pass_follows_absolute():
    decision = decide(result(age_mae=20.0), None)
    assert decision["absolute_pass"] is decision["full_pass"] is False
    assert decision["summary"] == "failed max_age_mae: 20.0 > 15.0"


@pytest.mark.parametrize(
    ("candidate", "check"),
    [
        (result(age_mae=15.0001), "max_age_mae"),
        (result(gender_accuracy=0.5999), "min_gender_accuracy"),
        (result(gap=10.0001), "max_group_gap"),
    ],
)
def test_each_absolute_check_fails_alone(candidate, check):
    decision = decide(candidate, result(age_mae=20.0, gender_accuracy=0.5))
    assert failed(decision) == [check]
    assert not decision["absolute_pass"] and not decision["full_pass"]
    assert check in decision["summary"]


def test_absolute_thresholds_are_inclusive():
    decision = decide(result(age_mae=15.0, gender_accuracy=0.6, gap=10.0), None)
    assert decision["full_pass"] and failed(decision) == []


def test_no_measurable_group_gap_passes():
    decision = decide(result(gap=None), None)
    gap_check = next(c for c in decision["checks"] if c["name"] == "max_group_gap")
    assert gap_check["passed"] and gap_check["value"] is None
    assert decision["full_pass"]


def test_champion_beaten_passes_with_relative_checks():
    decision = decide(result(age_mae=9.0), result(age_mae=10.0))
    assert decision["has_champion"] and decision["absolute_pass"] and decision["full_pass"]
    relative = [c for c in decision["checks"] if c["kind"] == "relative"]
    assert relative == [
        {
            "name": "min_improvement",
            "kind": "relative",
            "value": 1.0,
            "threshold": 0.05,
            "passed": True,
        },
        {
            "name": "max_gender_accuracy_drop",
            "kind": "relative",
            "value": 0.0,
            "threshold": 0.01,
            "passed": True,
        },
    ]
    assert "improves" in decision["summary"] and "interval [1.0, 1.0]" in decision["summary"]


def test_improvement_too_small_fails_only_the_relative_gate():
    decision = decide(result(age_mae=9.96), result(age_mae=10.0))
    assert decision["absolute_pass"] and not decision["full_pass"]
    assert failed(decision) == ["min_improvement"]
    assert decision["summary"].startswith("failed min_improvement: 0.04 < 0.05; ")


def test_worse_than_champion_fails():
    decision = decide(result(age_mae=11.0), result(age_mae=10.0))
    assert failed(decision) == ["min_improvement"]
    assert decision["checks"][3]["value"] == -1.0


def test_gender_drop_too_large_fails():
    decision = decide(result(age_mae=9.0, gender_accuracy=0.7899), result())
    assert failed(decision) == ["max_gender_accuracy_drop"]
    assert decision["absolute_pass"] and not decision["full_pass"]


def test_relative_thresholds_are_exact_at_the_edge():
    # in floats 8.1 - 8.05 < 0.05 and 0.81 - 0.8 > 0.01; both are ties and must pass
    decision = decide(result(age_mae=8.05, gender_accuracy=0.8), result(age_mae=8.1, gender_accuracy=0.81))
    assert decision["full_pass"], decision["summary"]
    assert [c["value"] for c in decision["checks"][3:]] == [0.05, 0.01]


def test_zero_min_improvement_accepts_a_tie():
    gates = GATES.model_copy(update={"min_improvement": 0.0})
    assert decide(result(), result(), gates)["full_pass"]


def test_absolute_failure_blocks_even_when_the_champion_is_beaten():
    decision = decide(result(age_mae=16.0), result(age_mae=18.0))
    assert failed(decision) == ["max_age_mae"]
    assert not decision["absolute_pass"] and not decision["full_pass"]


def test_gate_on_real_metric_dicts():
    candidate = metrics()
    decision = decide(candidate, None)
    assert decision["full_pass"]
    assert decision["checks"][2]["value"] == candidate["age_mae_group_gap"] == 1.6


def test_a_champion_without_per_image_errors_is_refused():
    with pytest.raises(ValueError, match="per-image errors"):
        decide_gates(result(), result(), GATES)


# The paired bootstrap on errors that vary image by image, as two real models' do.


def gate_pair(champion_errors: np.ndarray, candidate_errors: np.ndarray, gates: GateParams = GATES) -> dict:
    return decide_gates(
        result(age_mae=float(candidate_errors.mean())),
        result(age_mae=float(champion_errors.mean())),
        gates,
        candidate_errors=candidate_errors,
        champion_errors=champion_errors,
    )


def noisy_copy(errors: np.ndarray, *, gain: float, noise: float, seed: int) -> np.ndarray:
    """Another model's errors on the same images: `gain` years better on average, with per-image noise."""
    rng = np.random.default_rng(seed)
    return np.abs(errors - gain + rng.normal(0.0, noise, errors.size))


def test_an_identical_model_is_not_promoted_and_the_record_names_the_test():
    decision = gate_pair(BASE_ERRORS, BASE_ERRORS.copy())
    assert failed(decision) == ["min_improvement"] and not decision["full_pass"]
    assert decision["improvement_test"] == {
        "method": "paired bootstrap, percentile interval",
        "statistic": "champion age MAE - candidate age MAE",
        "n_images": N_IMAGES,
        "resamples": 2000,
        "confidence": 0.95,
        "seed": 0,
        "observed": 0.0,
        "interval": [0.0, 0.0],
    }
    assert "paired bootstrap" in decision["summary"] and f"over {N_IMAGES} test images" in decision["summary"]
    assert json.loads(json.dumps(decision)) == decision


def test_a_lucky_rerun_is_not_promoted_though_its_mae_is_lower():
    """Issue 14: a rerun scoring a little lower passed the old gate on the observed difference alone.

    Errors that differ by 3 years image by image leave a 0.14-year gain well inside the noise.
    """
    champion = noisy_copy(BASE_ERRORS, gain=0.0, noise=3.0, seed=1)
    candidate = noisy_copy(BASE_ERRORS, gain=0.2, noise=3.0, seed=2)
    test = gate_pair(champion, candidate)["improvement_test"]
    assert test["observed"] >= 0.05, "the old rule, on the observed difference, would have promoted it"
    low, high = test["interval"]
    assert low < 0.05 < test["observed"] < high
    assert not gate_pair(champion, candidate)["full_pass"]


def test_a_clearly_better_model_is_promoted():
    champion = noisy_copy(BASE_ERRORS, gain=0.0, noise=1.0, seed=1)
    candidate = noisy_copy(BASE_ERRORS, gain=1.0, noise=1.0, seed=2)
    decision = gate_pair(champion, candidate, GATES.model_copy(update={"min_improvement": 0.3}))
    assert decision["full_pass"], decision["summary"]
    low, high = decision["improvement_test"]["interval"]
    assert 0.3 < low < decision["improvement_test"]["observed"] < high
    assert decision["checks"][3]["value"] == low


def test_the_interval_has_the_width_of_the_paired_standard_error():
    champion = noisy_copy(BASE_ERRORS, gain=0.0, noise=2.0, seed=1)
    candidate = noisy_copy(BASE_ERRORS, gain=0.5, noise=2.0, seed=2)
    low, high = gate_pair(champion, candidate)["improvement_test"]["interval"]
    standard_error = np.std(champion - candidate) / np.sqrt(N_IMAGES)
    assert high - low == pytest.approx(2 * 1.96 * standard_error, rel=0.15)


def test_the_same_errors_give_the_same_interval():
    champion = noisy_copy(BASE_ERRORS, gain=0.0, noise=2.0, seed=1)
    candidate = noisy_copy(BASE_ERRORS, gain=0.2, noise=2.0, seed=2)
    assert gate_pair(champion, candidate) == gate_pair(champion, candidate)


def test_errors_of_different_lengths_are_refused():
    with pytest.raises(ValueError, match="equal length"):
        compare_paired(BASE_ERRORS, BASE_ERRORS[:-1], confidence=0.95, resamples=100)
