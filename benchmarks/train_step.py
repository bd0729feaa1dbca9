"""Where a training step of the real-data recipe's network spends its time, and what makes it cheaper.

Run: .venv/bin/python benchmarks/train_step.py [--rounds 8] [--results FILE]
Two measurements, on random images (a step's cost does not depend on the pixels), batch 64,
under op determinism as in training:
  * the wall time of one train step for variants of the recipe (input side, width, batch 128,
    Keras' own BatchNormalization instead of the fused kernel), timed in interleaved rounds so
    that a noisy shared machine slows them alike; each reported as its median and its ratio to the recipe's;
  * the recipe's step with oneDNN's kernels and with TensorFlow's default ones, in child processes
    taking turns (a process picks its kernels when TensorFlow loads; the variants and the profile use
    this process's, recorded as `cpu_kernels`);
  * TensorFlow's profiler over 20 steps of the recipe: self time per op type, summed over
    threads, as a share of the busy time.
Writes benchmarks/results/train_step.json. About 8 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import agegender  # noqa: F401  # before TensorFlow loads: it chooses TensorFlow's CPU kernels, as in training

# isort: split
import keras
import numpy as np
import tensorflow as tf

from agegender import model
from agegender.training import build_for, compile_for_training, cpu_kernels

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.train_quality import params_for  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "train_step.json"
BATCH = 64
STEPS_PER_EPOCH = 229  # the recipe's 14,663 training chips in batches of 64; it only sets the learning-rate schedule
RECIPE = "recipe (64 px, width 32)"  # the variant the others are compared with
# name: (input side, train overrides, batch, Keras' unfused BatchNormalization)
VARIANTS = {
    RECIPE: (64, {}, BATCH, False),
    "56 px": (56, {}, BATCH, False),
    "48 px": (48, {}, BATCH, False),
    "40 px": (40, {}, BATCH, False),
    "width 24": (64, {"width": 24}, BATCH, False),
    "batch 128 (per 64 images)": (64, {}, 2 * BATCH, False),
    "Keras BatchNormalization": (64, {}, BATCH, True),
}


def train_step(size: int, overrides: dict, batch: int, keras_batch_norm: bool):
    """A compiled training model of the recipe's network and one batch for it."""
    params = params_for("recipe")
    cfg = params.train.model_copy(update=overrides)
    keras.utils.set_random_seed(cfg.seed)
    # agegender.model builds with its FusedBatchNorm: swap Keras' layer in for this model only
    with mock.patch.object(
        model, "FusedBatchNorm", keras.layers.BatchNormalization if keras_batch_norm else model.FusedBatchNorm
    ):
        fit = compile_for_training(build_for(cfg, size), cfg, steps_per_epoch=STEPS_PER_EPOCH)
    rng = np.random.default_rng(0)
    images = tf.constant(rng.uniform(0, 255, (batch, size, size, 3)).astype(np.float32))
    age = rng.integers(1, 90, (batch, 1)).astype(np.float32)
    targets = {"age": age, "gender": rng.integers(0, 2, (batch, 1)).astype(np.float32), "age_logits": age}
    for _ in range(3):  # trace and warm up
        fit.train_on_batch(images, targets)
    return fit, images, targets


def variant_times(rounds: int) -> dict:
    steps = {name: train_step(*spec) for name, spec in VARIANTS.items()}
    times = {name: [] for name in steps}
    for r in range(rounds):
        print(f"round {r + 1}/{rounds}")
        for name, step in steps.items():
            times[name].append(seconds_per_64_images(*step))
    return summarise(times, base=RECIPE)


def seconds_per_64_images(fit, images, targets) -> float:
    """The mean time of 5 train steps, per 64 images."""
    start = time.perf_counter()
    for _ in range(5):
        fit.train_on_batch(images, targets)
    return (time.perf_counter() - start) / 5 * BATCH / len(images)


def summarise(times: dict[str, list[float]], *, base: str) -> dict:
    """Each entry's median in ms per 64 images and its ratio to the median of entry `base`."""
    base_median = float(np.median(times[base]))
    return {
        name: {
            "ms_per_64_images": round(float(np.median(t)) * 1000, 1),
            "ratio_to_recipe": round(float(np.median(t)) / base_median, 2),
        }
        for name, t in times.items()
    }


def op_profile(steps: int = 20) -> dict:
    """Self time per op type over `steps` train steps of the recipe, from TensorFlow's profiler."""
    from tensorflow.python.profiler.internal import _pywrap_profiler_plugin as profiler_plugin

    fit, images, targets = train_step(*VARIANTS[RECIPE])
    with tempfile.TemporaryDirectory() as logdir:
        tf.profiler.experimental.start(logdir)
        for _ in range(steps):
            fit.train_on_batch(images, targets)
        tf.profiler.experimental.stop()
        (xplane,) = glob.glob(f"{logdir}/plugins/profile/*/*.xplane.pb")
        raw, _ = profiler_plugin.xspace_to_tools_data([xplane], "framework_op_stats", {})
    table = json.loads(raw)[0]
    columns = [c["id"] for c in table["cols"]]
    by_type, by_block = collections.Counter(), collections.Counter()
    for row in table["rows"]:
        cells = dict(zip(columns, [c["v"] if c else None for c in row["c"]], strict=True))
        if cells["type"] != "IDLE":
            by_type[cells["type"]] += cells["total_self_time"]
            block = re.search(r"(stem|stage\d)_", cells["operation"])
            by_block[block.group(1) if block else "heads, loss, optimizer"] += cells["total_self_time"]
    busy = sum(by_type.values())
    return {
        "busy_ms_per_step_over_threads": round(busy / steps / 1000, 1),
        "share_by_op_type": {op: round(t / busy, 3) for op, t in by_type.most_common(12)},
        "share_by_block": {block: round(t / busy, 3) for block, t in sorted(by_block.items())},
    }


def kernel_times(rounds: int) -> dict:
    """The recipe's train step with oneDNN's kernels and with TensorFlow's default ones.

    A process chooses its kernels once, when TensorFlow loads: each round times both in child processes.
    """
    times = {"oneDNN (TF_ENABLE_ONEDNN_OPTS=1)": [], "TensorFlow's default kernels (agegender's default)": []}
    for r in range(rounds):
        print(f"kernels round {r + 1}/{rounds}")
        for name, setting in zip(times, ("1", "0"), strict=True):
            child = [sys.executable, __file__, "--recipe-seconds"]
            done = subprocess.run(
                child, env=os.environ | {"TF_ENABLE_ONEDNN_OPTS": setting}, capture_output=True, text=True
            )
            if done.returncode != 0:
                raise SystemExit(f"{name}: {done.stderr[-2000:]}")
            times[name].append(float(done.stdout.split()[-1]))
    return summarise(times, base="oneDNN (TF_ENABLE_ONEDNN_OPTS=1)")


def recipe_seconds() -> float:
    """The median of 5 timings of the recipe's train step (seconds per 64 images), in this process."""
    step = train_step(*VARIANTS[RECIPE])
    return float(np.median([seconds_per_64_images(*step) for _ in range(5)]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--recipe-seconds", action="store_true", help=argparse.SUPPRESS)  # kernel_times' child
    args = parser.parse_args()
    tf.config.experimental.enable_op_determinism()
    if args.recipe_seconds:
        print(recipe_seconds())
        return
    print("timing train-step variants in interleaved rounds")
    result = {"cpu_kernels": cpu_kernels(), "variants": variant_times(args.rounds)}
    print("timing the recipe's train step with and without oneDNN, in child processes")
    result["kernels"] = kernel_times(max(2, args.rounds // 2))
    print("profiling the recipe's train step")
    result["recipe_op_profile"] = op_profile()
    args.results.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(f"wrote {args.results}")


if __name__ == "__main__":
    main()
