"""Compare age-head formulations and compact-CNN sizes on the real UTKFace chips.

    .venv/bin/python benchmarks/age_head.py                  # every run not yet in the JSON
    .venv/bin/python benchmarks/age_head.py --runs dldl_64   # only these (re-run if present)

Fixed stratified 80/10/10 split (gender x age bucket, seed 42). Crops are the 200x200
chip centre-cropped to 90% and resized with OpenCV (INTER_AREA), BGR as served; the real
pipeline will crop with a face detector, so the crop is deliberately not tuned. Each run
is time-bounded; results/age_head.json is rewritten after every run so nothing is lost.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import agegender  # noqa: F401  # before TensorFlow loads: it chooses TensorFlow's CPU kernels, as in training

# isort: split

import cv2
import keras
import numpy as np
import tensorflow as tf
from sklearn.model_selection import train_test_split

from agegender.model import age_logits_loss, build_model, training_view
from agegender.training import cpu_kernels

DATA = Path(__file__).resolve().parents[1] / "../shared/datasets/utkface-part1"
RESULTS = Path(__file__).resolve().parent / "results" / "age_head.json"
WORK = Path("/tmp/agegender_bench")  # saved models: measured, never kept in the repo
AGE_EDGES = [0, 10, 20, 30, 45, 60, 117]  # same buckets as params' validate.age_buckets
CROP_FRACTION = 0.9
SEED = 42


@dataclass(frozen=True)
class RunConfig:
    name: str
    age_head: str = "dldl"
    image_size: int = 64
    width: int = 32
    dropout: float = 0.2
    age_bins: int = 101
    sigma: float = 2.0
    # loss weights: age = L1 on years (regression's only age loss; DLDL-v2's
    # expectation term otherwise), age_logits = dldl/ordinal loss, gender = BCE.
    w_age: float = 0.1
    w_logits: float = 1.0
    w_gender: float = 1.0
    lr: float = 3e-3
    weight_decay: float = 1e-4
    warmup_epochs: int = 2
    epochs: int = 20
    batch_size: int = 64
    patience: int = 6
    time_budget_s: float = 11.5 * 60
    extra: dict = field(default_factory=dict)


RUNS = [
    # 1. head formulations at the same size and budget
    RunConfig("regression_64", age_head="regression"),
    RunConfig("dldl_64", age_head="dldl"),
    RunConfig("ordinal_64", age_head="ordinal"),
    # 2. loss weights (on dldl): more gender; no expectation L1 (pure DLDL)
    RunConfig("dldl_64_wg3", w_gender=3.0),
    RunConfig("dldl_64_noL1", w_age=0.0),
    # 3. sizes
    RunConfig("dldl_96", image_size=96),
    RunConfig("dldl_64_w48", width=48),
]


# ---------------------------------------------------------------- data
def load_faces(size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All well-named chips as uint8 BGR (n, size, size, 3), ages, genders."""
    images, ages, genders = [], [], []
    for path in sorted(DATA.glob("*.jpg")):
        fields = path.name.split("_")
        if len(fields) != 4 or fields[1] not in ("0", "1"):
            continue  # the malformed names (missing race field)
        img = cv2.imread(str(path))
        if img is None:
            continue
        h, w = img.shape[:2]
        side = int(round(min(h, w) * CROP_FRACTION))
        top, left = (h - side) // 2, (w - side) // 2
        crop = img[top : top + side, left : left + side]
        images.append(cv2.resize(crop, (size, size), interpolation=cv2.INTER_AREA))
        ages.append(int(fields[0]))
        genders.append(int(fields[1]))
    return np.stack(images), np.array(ages, "float32"), np.array(genders, "float32")


def split_indices(ages: np.ndarray, genders: np.ndarray) -> dict[str, np.ndarray]:
    """Stratified 80/10/10 by gender x age bucket, fixed seed."""
    strata = genders.astype(int) * 10 + np.digitize(ages, AGE_EDGES[1:-1])
    idx = np.arange(len(ages))
    train, rest = train_test_split(idx, test_size=0.2, stratify=strata, random_state=SEED)
    val, test = train_test_split(rest, test_size=0.5, stratify=strata[rest], random_state=SEED)
    return {"train": train, "val": val, "test": test}


def augment(images: tf.Tensor) -> tf.Tensor:
    """Flip, one affine warp (rotate +-10 deg, scale +-8%, shift +-6%), brightness/contrast."""
    images = tf.cast(images, tf.float32)
    n, size = tf.shape(images)[0], tf.cast(tf.shape(images)[1], tf.float32)
    flip = tf.random.uniform([n, 1, 1, 1]) < 0.5
    images = tf.where(flip, tf.reverse(images, axis=[2]), images)
    angle = tf.random.uniform([n], -10.0, 10.0) * math.pi / 180
    scale = tf.random.uniform([n], 0.92, 1.08)
    shift = tf.random.uniform([n, 2], -0.06, 0.06) * size
    # output->input map: rotate/scale about the centre, then shift
    cos, sin, c = tf.cos(angle) / scale, tf.sin(angle) / scale, (size - 1) / 2
    a0, a1 = cos, -sin
    b0, b1 = sin, cos
    a2 = c - a0 * c - a1 * c + shift[:, 0]
    b2 = c - b0 * c - b1 * c + shift[:, 1]
    zeros = tf.zeros([n])
    transforms = tf.stack([a0, a1, a2, b0, b1, b2, zeros, zeros], axis=1)
    images = tf.raw_ops.ImageProjectiveTransformV3(
        images=images,
        transforms=transforms,
        output_shape=tf.shape(images)[1:3],
        fill_value=0.0,
        interpolation="BILINEAR",
        fill_mode="REFLECT",
    )
    mean = tf.reduce_mean(images, axis=[1, 2, 3], keepdims=True)
    contrast = tf.random.uniform([n, 1, 1, 1], 0.75, 1.25)
    brightness = tf.random.uniform([n, 1, 1, 1], -25.0, 25.0)
    return tf.clip_by_value((images - mean) * contrast + mean + brightness, 0.0, 255.0)


def make_dataset(x, age, gender, *, cfg: RunConfig, training: bool) -> tf.data.Dataset:
    targets = {"age": age[:, None], "gender": gender[:, None]}
    if cfg.age_head != "regression":
        targets["age_logits"] = age[:, None]
    ds = tf.data.Dataset.from_tensor_slices((x, targets)).cache()
    if training:
        ds = ds.shuffle(len(x), seed=SEED, reshuffle_each_iteration=True)
    ds = ds.batch(cfg.batch_size)
    if training:
        ds = ds.map(lambda im, t: (augment(im), t), num_parallel_calls=tf.data.AUTOTUNE)
    else:
        ds = ds.map(lambda im, t: (tf.cast(im, tf.float32), t))
    return ds.prefetch(tf.data.AUTOTUNE)


# ---------------------------------------------------------------- training
class TimeBudget(keras.callbacks.Callback):
    """Stop after the epoch that crosses the wall-time budget."""

    def __init__(self, seconds: float):
        super().__init__()
        self.seconds, self.start, self.hit = seconds, time.monotonic(), False

    def on_epoch_end(self, epoch, logs=None):
        if time.monotonic() - self.start > self.seconds:
            self.hit, self.model.stop_training = True, True


def train(cfg: RunConfig, data: dict) -> tuple[keras.Model, dict]:
    keras.utils.set_random_seed(SEED)
    model = build_model(
        backbone="compact",
        image_size=cfg.image_size,
        weights=None,
        width=cfg.width,
        dropout=cfg.dropout,
        age_head=cfg.age_head,
        age_bins=cfg.age_bins,
    )
    losses = {"age": "mae", "gender": "binary_crossentropy"}
    weights = {"age": cfg.w_age, "gender": cfg.w_gender}
    fit_model = training_view(model)  # compiled instead of `model`: no optimizer in the file
    if cfg.age_head != "regression":
        losses["age_logits"] = age_logits_loss(cfg.age_head, age_bins=cfg.age_bins, sigma=cfg.sigma)
        weights["age_logits"] = cfg.w_logits
    train_ds = make_dataset(*data["train"], cfg=cfg, training=True)
    val_ds = make_dataset(*data["val"], cfg=cfg, training=False)
    steps = math.ceil(len(data["train"][0]) / cfg.batch_size)
    warmup = cfg.warmup_epochs * steps
    schedule = keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=cfg.lr / 20,
        decay_steps=max(1, cfg.epochs * steps - warmup),
        warmup_target=cfg.lr,
        warmup_steps=warmup,
        alpha=0.01,
    )
    fit_model.compile(
        optimizer=keras.optimizers.AdamW(schedule, weight_decay=cfg.weight_decay),
        loss=losses,
        loss_weights=weights,
        metrics={"age": ["mae"], "gender": ["binary_accuracy"]},
    )
    budget = TimeBudget(cfg.time_budget_s)
    stop = keras.callbacks.EarlyStopping(
        monitor="val_age_mae", mode="min", patience=cfg.patience, restore_best_weights=True
    )
    start = time.monotonic()
    history = fit_model.fit(train_ds, validation_data=val_ds, epochs=cfg.epochs, callbacks=[budget, stop], verbose=2)
    wall = time.monotonic() - start
    epochs_run = len(history.history["loss"])
    val_mae = history.history["val_age_mae"]
    return model, {
        "epochs_run": epochs_run,
        "best_epoch": int(np.argmin(val_mae)) + 1,
        "train_wall_s": round(wall, 1),
        "train_images_per_s": round(epochs_run * len(data["train"][0]) / wall, 1),
        "stopped_by_time_budget": budget.hit,
        "val_mae_curve": [round(v, 3) for v in val_mae],
    }


# ---------------------------------------------------------------- evaluation
def evaluate(model: keras.Model, x, age, gender) -> dict:
    """MAE, gender accuracy overall / adults / under 10; also with horizontal-flip TTA."""

    def predict(images):
        out = model.predict(images.astype("float32"), batch_size=256, verbose=0)
        return out["age"][:, 0], out["gender"][:, 0]

    pred_age, pred_female = predict(x)
    flip_age, flip_female = predict(x[:, :, ::-1])
    adult, child = age >= 18, age < 10

    def metrics(p_age, p_female, prefix=""):
        correct = (p_female >= 0.5) == (gender == 1)
        return {
            f"{prefix}mae": round(float(np.mean(np.abs(p_age - age))), 3),
            f"{prefix}gender_acc": round(float(np.mean(correct)), 4),
            f"{prefix}gender_acc_adult": round(float(np.mean(correct[adult])), 4),
            f"{prefix}gender_acc_under10": round(float(np.mean(correct[child])), 4),
        }

    return {
        **metrics(pred_age, pred_female),
        **metrics((pred_age + flip_age) / 2, (pred_female + flip_female) / 2, "tta_"),
    }


def measure_inference(path: Path, size: int, repeats: int = 30) -> dict:
    """Reload the saved .keras file; median ms/face of predict_on_batch at batch 32."""
    model = keras.saving.load_model(path)
    batch = np.random.default_rng(0).integers(0, 256, (32, size, size, 3)).astype("float32")
    for _ in range(3):
        model.predict_on_batch(batch)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        model.predict_on_batch(batch)
        times.append(time.perf_counter() - t0)
    return {"infer_ms_per_face_b32": round(float(np.median(times)) / 32 * 1000, 3)}


# ---------------------------------------------------------------- driver
def load_results() -> dict:
    if RESULTS.exists():
        return json.loads(RESULTS.read_text())
    return {"meta": {}, "runs": {}}


def save_results(results: dict) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    tmp = RESULTS.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    tmp.replace(RESULTS)  # atomic: an interrupted write never leaves half a file


def run_one(cfg: RunConfig, faces: dict, splits: dict) -> dict:
    x, ages, genders = faces[cfg.image_size]
    data = {k: (x[i], ages[i], genders[i]) for k, i in splits.items()}
    load_before = os.getloadavg()
    model, fit_info = train(cfg, data)
    WORK.mkdir(parents=True, exist_ok=True)
    path = WORK / f"{cfg.name}.keras"
    model.save(path)
    result = {
        "config": asdict(cfg),
        "params": model.count_params(),
        **fit_info,
        "val": evaluate(model, *data["val"]),
        "test": evaluate(model, *data["test"]),
        "file_mb": round(path.stat().st_size / 2**20, 3),
        **measure_inference(path, cfg.image_size),
        "cpu_kernels": cpu_kernels(),
        "loadavg_before": [round(v, 2) for v in load_before],
        "loadavg_after": [round(v, 2) for v in os.getloadavg()],
    }
    keras.backend.clear_session()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", help="comma-separated run names (default: all not yet done)")
    parser.add_argument("--extra", help="JSON list of extra RunConfig dicts to add to RUNS")
    args = parser.parse_args()
    runs = RUNS + [RunConfig(**d) for d in json.loads(args.extra or "[]")]
    results = load_results()
    if args.runs:
        wanted = args.runs.split(",")
        runs = [r for r in runs if r.name in wanted]
    else:
        runs = [r for r in runs if r.name not in results["runs"]]
    faces: dict[int, tuple] = {}
    for cfg in runs:
        if cfg.image_size not in faces:
            faces[cfg.image_size] = load_faces(cfg.image_size)
        _, ages, genders = faces[cfg.image_size]
        splits = split_indices(ages, genders)
        results["meta"] = {
            "machine": f"{platform.machine()}, {os.cpu_count()} cores (shared)",
            "tensorflow": tf.__version__,
            "keras": keras.__version__,
            "images": len(ages),
            "split_sizes": {k: len(v) for k, v in splits.items()},
            "crop": f"centre {CROP_FRACTION:.0%} of the 200px chip, cv2 INTER_AREA, BGR",
            "under_10_share_test": round(float(np.mean(ages[splits["test"]] < 10)), 3),
        }
        print(f"=== {cfg.name}", flush=True)
        results["runs"][cfg.name] = run_one(cfg, faces, splits)
        save_results(results)
        r = results["runs"][cfg.name]
        print(f"=== {cfg.name}: val {r['val']} test {r['test']} {r['epochs_run']} ep {r['train_wall_s']} s", flush=True)


if __name__ == "__main__":
    main()
