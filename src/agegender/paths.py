"""Where the pipeline's data and artifacts live, relative to the project root.

dvc.yaml names the same paths (YAML cannot import them); tests/unit/test_paths.py keeps
the two equal. Folders are Paths; the files inside them are names, because a stage
writes them into a staging folder first (see `files.atomic_dir`).
"""

from __future__ import annotations

from pathlib import Path

DATA = Path("data")
DATA_DVC = Path("data.dvc")
LABELS = "labels.csv"

# validate
VALIDATION = Path("artifacts/validation")
MANIFEST = "manifest.csv"
DATA_DOCS = "data_docs"
VALIDATION_SUMMARY = "summary.json"

# preprocess
PREPARED = Path("artifacts/prepared")
SPLITS = ("train", "val", "test")
SPLIT_TABLE = "split.csv"
PREPARED_STATS = "stats.json"

# train: a model folder, also what `Predictor.from_path` loads
MODEL = Path("artifacts/model")
KERAS_MODEL = "model.keras"
MODEL_SPEC = "spec.json"
MODEL_CARD = "card.json"
MODEL_CARD_MD = "card.md"
CURVES = "curves.png"
CANDIDATES = "candidates.json"
VAL_METRICS = "metrics.json"
HISTORY = "history.csv"
DRIFT_REFERENCE = "reference.csv"  # monitoring statistics of the training crops, for the drift check

# evaluate
EVAL = Path("artifacts/eval")
TEST_METRICS = "metrics.json"
CHAMPION_METRICS = "champion_metrics.json"
GATE = "gate.json"
PLOTS = "plots"

# register
REGISTRY = Path("artifacts/registry")
REGISTRATION = "registration.json"


def split_arrays(split: str) -> str:
    """The file name of one split's cached crops and labels."""
    return f"{split}.npz"


def stage_outputs() -> dict[str, list[Path]]:
    """Every output each dvc.yaml stage declares (outs, metrics and plots together)."""
    return {
        "validate": [VALIDATION / MANIFEST, VALIDATION / DATA_DOCS, VALIDATION / VALIDATION_SUMMARY],
        "preprocess": [
            *(PREPARED / split_arrays(s) for s in SPLITS),
            PREPARED / SPLIT_TABLE,
            PREPARED / PREPARED_STATS,
        ],
        "train": [
            MODEL / name
            for name in (
                KERAS_MODEL,
                MODEL_SPEC,
                MODEL_CARD,
                MODEL_CARD_MD,
                CURVES,
                CANDIDATES,
                VAL_METRICS,
                HISTORY,
                DRIFT_REFERENCE,
            )
        ],
        "evaluate": [EVAL / PLOTS, EVAL / TEST_METRICS, EVAL / GATE, EVAL / CHAMPION_METRICS],
        "register": [REGISTRY / REGISTRATION],
    }
