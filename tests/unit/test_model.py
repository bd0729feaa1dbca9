"""agegender.model: shapes and names, age heads and their losses, errors, save/reload."""

from __future__ import annotations

import subprocess
import sys

import keras
import numpy as np
import pytest

from agegender.model import (
    AGE_HEADS,
    BACKBONES,
    BgrToRgb,
    FusedBatchNorm,
    age_logits_loss,
    build_model,
    mirror_averaged,
    training_view,
)
from tests.conftest import printed_by_new_python

BATCH = 2


def _images(size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (BATCH, size, size, 3)).astype("float32")


def _predict(model: keras.Model, images: np.ndarray) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in model.predict_on_batch(images).items()}


@pytest.mark.parametrize("backbone", BACKBONES)
def test_every_backbone_gives_named_age_and_gender(backbone):
    size = 48 if backbone == "compact" else 32  # 32 px: the keras.applications minimum
    model = build_model(
        backbone=backbone, image_size=size, weights=None, width=8, dropout=0.1, age_head="dldl", age_bins=101
    )
    assert model.input_shape == (None, size, size, 3)
    out = _predict(model, _images(size))
    assert set(out) == {"age", "gender"}
    assert out["age"].shape == out["gender"].shape == (BATCH, 1)
    assert np.all((out["gender"] >= 0) & (out["gender"] <= 1))
    assert any(isinstance(layer, keras.layers.Rescaling) for layer in _all_layers(model))


def _all_layers(model: keras.Model):
    for layer in model.layers:
        yield layer
        if isinstance(layer, keras.Model):
            yield from _all_layers(layer)


@pytest.mark.parametrize("age_head", AGE_HEADS)
def test_every_age_head_outputs_years(age_head):
    model = build_model(
        backbone="compact", image_size=32, weights=None, width=8, dropout=0.0, age_head=age_head, age_bins=21
    )
    age = _predict(model, _images(32))["age"]
    assert age.shape == (BATCH, 1) and np.all(np.isfinite(age))
    if age_head != "regression":  # an expectation over bins 0..20 stays inside them
        assert np.all((age >= 0) & (age <= 20))


@pytest.mark.parametrize("age_head", AGE_HEADS)
def test_training_view_shares_weights_and_trains_on_years(age_head):
    model = build_model(
        backbone="compact", image_size=32, weights=None, width=8, dropout=0.0, age_head=age_head, age_bins=21
    )
    train = training_view(model)
    ages = np.array([[3.0], [15.0]], "float32")
    losses = {"age": "mae", "gender": "binary_crossentropy"}
    targets = {"age": ages, "gender": np.array([[0.0], [1.0]], "float32")}
    if age_head != "regression":
        losses["age_logits"] = age_logits_loss(age_head, age_bins=21)
        targets["age_logits"] = ages  # plain years: the loss encodes them
    assert set(train.output) == set(losses)
    train.compile(optimizer="adam", loss=losses)
    before = model.get_layer("gender").get_weights()[0].copy()
    logs = train.train_on_batch(_images(32), targets, return_dict=True)
    assert np.isfinite(logs["loss"])
    assert not np.allclose(model.get_layer("gender").get_weights()[0], before)
    assert getattr(model, "optimizer", None) is None  # so its file holds no optimizer state


def _peaked_logits(at: int, bins: int) -> np.ndarray:
    return np.where(np.arange(bins) == at, 10.0, 0.0)[None].astype("float32")


def test_dldl_loss_is_lowest_at_the_true_age():
    loss = age_logits_loss("dldl", age_bins=21, sigma=2.0)
    y = np.array([[10.0]], "float32")
    near, far = (float(np.asarray(loss(y, _peaked_logits(k, 21)))[0]) for k in (10, 16))
    assert near < far


def test_ordinal_loss_is_lowest_at_the_true_age():
    loss = age_logits_loss("ordinal", age_bins=21)
    y = np.array([[10.0]], "float32")
    right = np.where(np.arange(20) < 10, 10.0, -10.0)[None].astype("float32")  # "older than k<10"
    wrong = np.where(np.arange(20) < 16, 10.0, -10.0)[None].astype("float32")
    assert float(np.asarray(loss(y, right))[0]) < float(np.asarray(loss(y, wrong))[0])


def test_bgr_to_rgb_reverses_channels():
    pixel = np.array([[[[1.0, 2.0, 3.0]]]], "float32")
    np.testing.assert_array_equal(np.asarray(BgrToRgb()(pixel)), pixel[..., ::-1])


def test_fused_batch_norm_trains_and_infers_as_keras_batch_norm():
    import tensorflow as tf

    x = tf.constant(np.random.default_rng(0).normal(3.0, 2.0, (4, 5, 5, 3)).astype("float32"))
    fused, plain = FusedBatchNorm(momentum=0.9), keras.layers.BatchNormalization(momentum=0.9)
    for layer in (fused, plain):
        layer.build(x.shape)
        layer.gamma.assign([0.5, 1.0, 2.0])
        layer.beta.assign([0.1, -0.2, 0.3])
    results = []
    for layer in (fused, plain):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=True)
            loss = tf.reduce_sum(y * tf.range(y.shape[-1], dtype=y.dtype) * x)
        results.append(
            [y, *tape.gradient(loss, [x, layer.gamma, layer.beta]), layer.moving_mean, layer.moving_variance]
        )
        results[-1].append(layer(x, training=False))
    for got, expected in zip(*results, strict=True):
        np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=1e-4, atol=1e-4)
    assert not np.allclose(np.asarray(fused.moving_variance), 1.0)  # the statistics moved


def test_pretrained_weights_come_from_a_local_file_and_a_wrong_file_is_named(tmp_path):
    # A trunk's weights file, as Keras' ImageNet "notop" files are: here made and saved on the spot.
    trunk = keras.applications.MobileNetV3Small(
        include_top=False, weights=None, input_shape=(32, 32, 3), pooling="avg", include_preprocessing=False
    )
    rng = np.random.default_rng(0)
    trunk.set_weights([rng.normal(size=w.shape).astype("float32") for w in trunk.get_weights()])
    saved = tmp_path / "mobilenet_v3_small_notop.weights.h5"
    trunk.save_weights(saved)
    settings = {"image_size": 32, "width": 8, "dropout": 0.0, "age_head": "dldl", "age_bins": 101}

    model = build_model(backbone="mobilenet_v3_small", weights=saved, **settings)
    (loaded,) = [layer for layer in model.layers if isinstance(layer, keras.Model)]
    assert all(np.array_equal(a, b) for a, b in zip(loaded.get_weights(), trunk.get_weights(), strict=True))

    with pytest.raises(ValueError, match="missing.weights.h5 does not exist"):
        build_model(backbone="mobilenet_v3_small", weights=tmp_path / "missing.weights.h5", **settings)
    with pytest.raises(ValueError, match=f"{saved} does not fit the efficientnet_b0 trunk"):
        build_model(backbone="efficientnet_b0", weights=saved, **settings)


def test_unknown_backbone_names_the_allowed_values():
    with pytest.raises(ValueError, match="unknown backbone 'resnet18'") as info:
        build_model(
            backbone="resnet18", image_size=32, weights=None, width=8, dropout=0.0, age_head="dldl", age_bins=101
        )
    assert all(name in str(info.value) for name in BACKBONES)


def test_unknown_age_head_and_bad_weights_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="allowed: regression, dldl, ordinal"):
        build_model(
            backbone="compact", image_size=32, weights=None, width=8, dropout=0.0, age_head="softmax", age_bins=101
        )
    with pytest.raises(ValueError, match="no pretrained weights"):
        build_model(
            backbone="compact",
            image_size=32,
            weights=tmp_path / "w.h5",
            width=8,
            dropout=0.0,
            age_head="dldl",
            age_bins=101,
        )


@pytest.mark.parametrize(
    ("backbone", "age_head"),
    [("compact", "dldl"), ("compact", "regression"), ("compact", "ordinal"), ("mobilenet_v3_small", "dldl")],
)
def test_saved_keras_file_reloads_with_same_predictions(tmp_path, backbone, age_head):
    model = build_model(
        backbone=backbone, image_size=32, weights=None, width=8, dropout=0.3, age_head=age_head, age_bins=101
    )
    path = tmp_path / "model.keras"
    model.save(path)
    reloaded = keras.saving.load_model(path)
    images = _images(32, seed=1)
    expected, got = _predict(model, images), _predict(reloaded, images)
    for name in ("age", "gender"):
        np.testing.assert_allclose(got[name], expected[name], rtol=1e-5, atol=1e-5)


def test_mirror_averaged_model_is_the_mean_over_both_mirror_images_and_reloads(tmp_path):
    model = build_model(
        backbone="compact", image_size=32, weights=None, width=8, dropout=0.0, age_head="dldl", age_bins=101
    )
    averaged = mirror_averaged(model)
    images = _images(32, seed=2)
    plain, mirrored = _predict(model, images), _predict(model, images[:, :, ::-1])
    got = _predict(averaged, images)
    for name in ("age", "gender"):
        assert not np.allclose(plain[name], mirrored[name])  # the untrained net is not symmetric
        np.testing.assert_allclose(got[name], (plain[name] + mirrored[name]) / 2, rtol=1e-5, atol=1e-5)
    averaged.save(tmp_path / "model.keras")
    reloaded = _predict(keras.saving.load_model(tmp_path / "model.keras"), images[:, :, ::-1])
    for name in ("age", "gender"):  # a mirror image gets the same answer
        np.testing.assert_allclose(reloaded[name], got[name], rtol=1e-5, atol=1e-5)


def test_a_model_with_custom_layers_loads_in_a_process_that_never_imported_them(tmp_path):
    model = mirror_averaged(build_model(backbone="compact", image_size=32, width=4, age_head="dldl"))
    (tmp_path / "artifacts").mkdir()
    model.save(tmp_path / "artifacts" / "model.keras")
    # How a served registry version loads: the Bento imports agegender.inference, not agegender.model.
    code = "import sys, pathlib; from agegender.inference import load_network; print(load_network(pathlib.Path(sys.argv[1])).name)"
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == model.name


@pytest.mark.parametrize(("setting", "kernels"), [(None, "default"), ("1", "oneDNN")])
def test_training_reports_the_cpu_kernels_tensorflow_chose(setting, kernels):
    """The default ones, whose training is reproducible, unless the user asked for oneDNN's."""
    code = "from agegender.training import cpu_kernels; print(cpu_kernels())"
    assert printed_by_new_python(code, variable="TF_ENABLE_ONEDNN_OPTS", setting=setting) == kernels


# TensorFlow picks oneDNN by itself only on CPUs with AVX-512 VNNI, BF16 or AMX. Anywhere, a process that
# loads it under TF_ENABLE_ONEDNN_OPTS=1 and then drops the variable is in that state when agegender loads.
WARNED = """
import os, warnings
{first}
{drop}
from agegender.training import warn_about_unchosen_kernels
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    warn_about_unchosen_kernels()
print([str(w.message) for w in caught])
"""


@pytest.mark.parametrize(
    ("setting", "first", "drop", "warned"),
    [
        ("1", "import tensorflow", "del os.environ['TF_ENABLE_ONEDNN_OPTS']", True),  # loaded first, nobody asked
        ("1", "import agegender", "", False),  # the user asked for oneDNN's kernels
        # The default kernels chosen before TensorFlow loads (unset would let a VNNI CPU pick oneDNN): no warning.
        ("0", "import tensorflow", "", False),
    ],
)
def test_training_warns_when_tensorflow_loaded_first_chose_onednn_unasked(setting, first, drop, warned):
    code = WARNED.format(first=first, drop=drop)
    printed = printed_by_new_python(code, variable="TF_ENABLE_ONEDNN_OPTS", setting=setting)
    assert ("not bit for bit reproducible" in printed) is warned, printed
