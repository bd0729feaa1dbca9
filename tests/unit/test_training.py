"""Training refuses inputs it cannot learn from, before any model is built."""

from __future__ import annotations

import numpy as np
import pytest

from agegender.training import TrainingError, check_inputs


def split(count: int, side: int = 32) -> dict:
    return {"images": np.zeros((count, side, side, 3), np.uint8), "age": np.zeros(count), "gender": np.zeros(count)}


def random_faces(count: int, *, seed: int) -> dict:
    """Noise images of side 32 with random labels: enough for training to run."""
    rng = np.random.default_rng(seed)
    return {
        "images": rng.integers(0, 256, (count, 32, 32, 3)).astype(np.uint8),
        "age": rng.uniform(1, 80, count).astype(np.float32),
        "gender": rng.integers(0, 2, count).astype(np.float32),
    }


@pytest.mark.parametrize(
    ("train", "val", "batch_size", "message"),
    [
        (split(0), split(4), 2, "the train split is empty"),
        (split(8), split(0), 2, "the val split is empty"),
        (split(8, side=48), split(4), 2, r"the train crops are \(48, 48, 3\), but preprocess.image_size is 32"),
        (split(8), split(4, side=48), 2, "the val crops are"),
        (split(8), split(4), 64, "the train split has 8 faces, fewer than train.batch_size=64"),
    ],
)
def test_bad_inputs_are_refused_with_their_reason(train, val, batch_size, message):
    with pytest.raises(TrainingError, match=message):
        check_inputs(train, val, image_size=32, batch_size=batch_size)


def test_good_inputs_pass():
    check_inputs(split(8), split(4), image_size=32, batch_size=8)


def test_grayscale_augmentation_greys_whole_images_at_its_rate():
    from agegender.config import AugmentParams, TrainParams
    from agegender.training import make_augmenter

    # flip stays on: it keeps colour, and an augmenter needs a layer
    colour = np.random.default_rng(0).integers(0, 256, (200, 8, 8, 3)).astype(np.float32)
    plain = AugmentParams(flip=True, rotation=0, shift=0, zoom=0, brightness=0, contrast=0)

    def grey_share(rate: float) -> float:
        augment = make_augmenter(TrainParams(augment=plain.model_copy(update={"grayscale": rate})))
        out = np.asarray(augment(colour, training=True))
        return float(np.mean(np.ptp(out, axis=-1).max(axis=(1, 2)) < 1e-3))

    assert grey_share(0.0) == 0.0
    assert grey_share(1.0) == 1.0
    assert 0.15 < grey_share(0.3) < 0.45  # 200 draws at 0.3


def test_mirror_average_trains_a_model_that_answers_a_face_and_its_mirror_image_alike():
    from agegender.config import TrainParams
    from agegender.training import train_model

    faces = random_faces(32, seed=0)
    cfg = TrainParams(width=4, epochs=1, batch_size=16, mirror_average=True)
    model, _ = train_model(cfg, 32, faces, faces, callbacks=[], verbose=0)
    images = faces["images"][:4].astype(np.float32)
    plain, mirrored = model.predict_on_batch(images), model.predict_on_batch(images[:, :, ::-1])
    for name in ("age", "gender"):
        np.testing.assert_allclose(np.asarray(mirrored[name]), np.asarray(plain[name]), rtol=1e-5, atol=1e-4)


def test_a_weight_average_is_what_each_epoch_scores_and_what_is_kept():
    from agegender.config import TrainParams
    from agegender.training import train_model

    faces = random_faces(64, seed=1)
    scored = {}
    for ema_momentum in (None, 0.5):
        cfg = TrainParams(width=4, epochs=3, batch_size=16, patience=3, learning_rate=0.05, ema_momentum=ema_momentum)
        model, history = train_model(cfg, 32, faces, faces, callbacks=[], verbose=0)
        ages = np.asarray(model.predict_on_batch(faces["images"].astype(np.float32))["age"]).ravel()
        # The returned model is the one its best epoch scored on val.
        assert np.mean(np.abs(ages - faces["age"])) == pytest.approx(min(history["val_age_mae"]), rel=1e-4)
        scored[ema_momentum] = history["val_age_mae"]
    # Training is deterministic, so the scores differ only because the average was scored.
    assert scored[None] != pytest.approx(scored[0.5], rel=1e-3)


def test_low_res_images_are_the_crops_scaled_down_or_windows_of_them():
    from agegender.config import AugmentParams, TrainParams
    from agegender.training import make_dataset

    faces = random_faces(32, seed=2)
    faces["images"][:] = np.arange(32, dtype=np.uint8)[None, :, None, None] * 4  # a ramp down the rows
    # Flip only: it leaves a ramp down the rows as it is.
    flip = AugmentParams(flip=True, rotation=0, shift=0, zoom=0, brightness=0, contrast=0)
    cfg = TrainParams(batch_size=16, augment=flip)

    def first_column(**kwargs) -> np.ndarray:
        images, _ = next(iter(make_dataset(faces, cfg, size=16, **kwargs)))
        assert images.shape == (16, 16, 16, 3)
        return np.asarray(images[0, :, 0, 0])

    np.testing.assert_allclose(first_column(training=False), np.arange(16) * 8 + 2)  # each pixel the mean of two
    np.testing.assert_allclose(first_column(training=False, window=True), np.arange(8, 24) * 4)  # the centre
    top = first_column(training=True, window=True)[0]  # a window at full scale, somewhere in the crop
    np.testing.assert_allclose(first_column(training=True, window=True), top + np.arange(16) * 4)


def test_low_res_epochs_come_first_and_the_model_kept_is_from_a_full_size_epoch():
    from agegender.config import LowResParams, TrainParams
    from agegender.training import train_model

    faces = random_faces(32, seed=3)
    images = faces["images"].astype(np.float32)
    trained = {}
    for low_res in (None, LowResParams(size=16, epochs=1)):
        cfg = TrainParams(width=4, epochs=3, batch_size=16, patience=3, learning_rate=0.05, low_res=low_res)
        model, history = train_model(cfg, 32, faces, faces, callbacks=[], verbose=0)
        assert model.input.shape == (None, 32, 32, 3)
        assert len(history["loss"]) == 3
        ages = np.asarray(model.predict_on_batch(images)["age"]).ravel()
        assert np.mean(np.abs(ages - faces["age"])) == pytest.approx(min(history["val_age_mae"][1:]), rel=1e-4)
        trained[low_res] = history["val_age_mae"][0]
    # Training is deterministic, so the first epochs differ only because one saw smaller crops.
    assert trained[None] != pytest.approx(trained[LowResParams(size=16, epochs=1)], rel=1e-3)


@pytest.mark.parametrize("bn_momentum", [0.9, 0.99])
def test_bn_momentum_reaches_every_batchnorm_layer(bn_momentum):
    import keras

    from agegender.config import TrainParams
    from agegender.training import build_for

    model = build_for(TrainParams(width=4, bn_momentum=bn_momentum), 32)
    momenta = {layer.momentum for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)}
    assert momenta == {bn_momentum}


def test_adamw_decays_kernels_and_leaves_batchnorm_and_biases_alone():
    import keras

    from agegender.config import TrainParams
    from agegender.training import build_for, compile_for_training

    cfg = TrainParams(width=4, learning_rate=0.1, weight_decay=0.5, warmup_epochs=0)
    fit_model = compile_for_training(build_for(cfg, 32), cfg, steps_per_epoch=1)
    variables = fit_model.trainable_variables
    for v in variables:  # BatchNorm offsets and biases start at 0, where decay could not show
        v.assign(keras.ops.ones_like(v))
    # Zero gradients make Adam's own step zero: whatever moves, moved by weight decay.
    fit_model.optimizer.apply([keras.ops.zeros_like(v) for v in variables], variables)
    moved = {(v.path.rsplit("/", 1)[-1], bool(keras.ops.convert_to_numpy(v).max() < 1)) for v in variables}
    decayed, kept = True, False
    assert moved == {
        *[("kernel", decayed), ("depthwise_kernel", decayed), ("pointwise_kernel", decayed)],
        *[("gamma", kept), ("beta", kept), ("bias", kept)],
    }
