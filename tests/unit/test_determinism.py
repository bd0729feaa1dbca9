"""Training is deterministic: the same config and data give the same weights, another seed does not.

Bit for bit on TensorFlow's default CPU kernels, agegender's default; not on oneDNN's (see `train_model`).
"""

from __future__ import annotations

import numpy as np
import pytest

from agegender.config import AugmentParams, TrainParams
from agegender.training import cpu_kernels, train_model

SIZE = 32


def split(count: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "images": rng.integers(0, 256, (count, SIZE, SIZE, 3), dtype=np.uint8),
        "age": rng.uniform(1, 80, count).astype(np.float32),
        "gender": rng.integers(0, 2, count).astype(np.float32),
    }


@pytest.fixture(scope="module")
def runs() -> dict[str, tuple[list[np.ndarray], dict]]:
    """Tiny fits with every augmentation on: the parallel augmentation map is what used to vary."""
    assert cpu_kernels() == "default", "oneDNN's kernels are not reproducible: unset TF_ENABLE_ONEDNN_OPTS"
    train, val = split(128, seed=1), split(32, seed=2)
    fitted = {}
    for name, seed in (("first", 42), ("again", 42), ("other seed", 43)):
        cfg = TrainParams(
            width=4, epochs=1, batch_size=32, warmup_epochs=0, seed=seed, augment=AugmentParams(grayscale=0.3)
        )
        model, history = train_model(cfg, SIZE, train, val, callbacks=[], verbose=0)
        fitted[name] = (model.get_weights(), history)
    return fitted


def test_the_same_seed_gives_identical_weights_and_metrics(runs):
    (first, first_history), (again, again_history) = runs["first"], runs["again"]
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert first_history["val_age_mae"] == again_history["val_age_mae"]


def test_another_seed_gives_other_weights(runs):
    """The check above can fail: a different seed is visible in the weights and the metrics."""
    (first, first_history), (other, other_history) = runs["first"], runs["other seed"]
    assert not all(np.array_equal(a, b) for a, b in zip(first, other, strict=True))
    assert first_history["val_age_mae"] != other_history["val_age_mae"]
