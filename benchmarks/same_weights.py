"""Are two trained models the same, bit for bit? Training is reproducible on the default kernels.

Run: .venv/bin/python benchmarks/same_weights.py MODEL_A MODEL_B [--results FILE]
For example the `recipe` and `recipe-again` models of benchmarks/train_quality.py (DIR/artifacts/model
and DIR/artifacts/experiments/recipe-again/model). Writes benchmarks/results/same_weights.json: the
number of weight arrays, how many differ and the largest difference.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from agegender.model import load_model

RESULTS = Path(__file__).resolve().parent / "results" / "same_weights.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs=2, type=Path, help="two model folders (each holds model.keras)")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    first, second = (load_model(folder / "model.keras").get_weights() for folder in args.models)
    differences = [float(np.abs(a - b).max()) for a, b in zip(first, second, strict=True) if not np.array_equal(a, b)]
    result = {
        "models": [str(folder) for folder in args.models],
        "weight_arrays": len(first),
        "arrays_that_differ": len(differences),
        "largest_difference": max(differences, default=0.0),
    }
    args.results.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(f"wrote {args.results}")


if __name__ == "__main__":
    main()
