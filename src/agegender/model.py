"""Keras architectures: one shared backbone, two heads (age in years, P(female)).

Input contract: uint8-range images, ``size x size x 3`` in **BGR** order (as
``cv2.imread`` gives them), float or uint8 dtype. All scaling, and the BGR->RGB
swap where an ImageNet backbone needs RGB, happens inside the model, so the saved
``.keras`` file is the whole preprocessing contract and serving cannot skew.

Outputs (a dict): ``age`` - years, float; ``gender`` - sigmoid probability of female.

Age head formulations (``age_head``):

- ``"regression"``: one linear unit, trained with L1 on years.
- ``"dldl"``: label distribution learning (Gao et al. 2017/2018): softmax over
  ``age_bins`` one-year bins, trained against a Gaussian centred on the true age;
  ``age`` is the expectation.
- ``"ordinal"``: ``age_bins - 1`` binary "older than k" logits (Niu et al. 2016);
  ``age`` is the sum of their probabilities.

The trainer fits :func:`training_view` (the same layers; for ``dldl``/``ordinal``
plus an ``age_logits`` output, trained with :func:`age_logits_loss`: targets stay
plain years, the loss encodes them) and saves the two-output model.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import get_args

import keras
import tensorflow as tf
from keras import layers, ops

from agegender.config import AgeHead, Backbone

BACKBONES = get_args(Backbone)
AGE_HEADS = get_args(AgeHead)

# Caffe-style ImageNet means in BGR order: what resnet50/vgg16 weights expect.
_CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)


@keras.saving.register_keras_serializable(package="agegender")
class BgrToRgb(layers.Layer):
    """Reverse the channel axis; ImageNet weights of MobileNet/EfficientNet want RGB."""

    def call(self, inputs):
        return ops.flip(inputs, axis=-1)


@keras.saving.register_keras_serializable(package="agegender")
class Mirror(layers.Layer):
    """Flip images left to right."""

    def call(self, inputs):
        return ops.flip(inputs, axis=2)


@keras.saving.register_keras_serializable(package="agegender")
class FusedBatchNorm(layers.BatchNormalization):
    """Keras' BatchNormalization, trained with TensorFlow's fused kernel.

    Keras 3 normalises with a dozen element-wise ops and their gradients; TensorFlow's single kernel
    makes a train step of the compact network 1.12-1.16x faster on CPU (benchmarks/train_step.py). The
    variables and the moving-average rule are Keras', so inference and saved files work as with the
    Keras layer.

    For 4-D channels-last inputs with a scale and an offset, as the compact backbone's. Synchronized
    (across multi-worker replicas) it normalises as the Keras layer does, which owns that.
    """

    def call(self, inputs, training=None, mask=None):
        if not (training and self.trainable) or self.synchronized:
            return super().call(inputs, training=training, mask=mask)
        outputs, mean, variance = tf.compat.v1.nn.fused_batch_norm(
            inputs, self.gamma, self.beta, epsilon=self.epsilon, is_training=True
        )
        # The kernel returns the unbiased variance; Keras' moving statistics average the biased one.
        count = ops.cast(ops.size(inputs) // inputs.shape[-1], variance.dtype)
        variance = variance * (count - 1.0) / count
        self.moving_mean.assign(self.moving_mean * self.momentum + mean * (1.0 - self.momentum))
        self.moving_variance.assign(self.moving_variance * self.momentum + variance * (1.0 - self.momentum))
        return outputs


def build_model(
    *,
    backbone: str = "compact",
    image_size: int = 64,
    weights: Path | None = None,
    width: int = 32,
    dropout: float = 0.2,
    age_head: str = "dldl",
    age_bins: int = 101,
    bn_momentum: float = 0.9,
) -> keras.Model:
    """Build the two-output model; see the module docstring for the contract.

    ``width`` is the first-stage channel count of the compact backbone and ``bn_momentum`` the
    momentum of its BatchNorm moving statistics (both ignored by keras.applications backbones).
    ``age_bins`` one-year bins cover ages 0..age_bins-1 (older targets are clipped by the losses).
    ``weights`` is a local file of pretrained weights for a keras.applications trunk (for example
    Keras' ImageNet "notop" file for that backbone, fetched once elsewhere): nothing is downloaded.
    Raises ValueError for unknown names and for weights that are missing or do not fit the trunk.
    """
    _check_choice("backbone", backbone, BACKBONES)
    _check_choice("age_head", age_head, AGE_HEADS)
    if backbone == "compact" and weights is not None:
        raise ValueError("the compact backbone has no pretrained weights; use weights=None")
    if weights is not None and not Path(weights).is_file():
        raise ValueError(f"pretrained weights file {weights} does not exist")

    inputs = keras.Input((image_size, image_size, 3), name="image")
    if backbone == "compact":
        x = layers.Rescaling(1 / 127.5, offset=-1.0, name="rescale")(inputs)
        features = _compact_backbone(x, width, bn_momentum)
    else:
        features = _application_backbone(inputs, backbone, weights)

    x = layers.Dropout(dropout, name="head_dropout")(features)
    age = _age_head(x, age_head, age_bins)
    gender = layers.Dense(1, activation="sigmoid", name="gender")(x)
    return keras.Model(inputs, {"age": age, "gender": gender}, name=f"agegender_{backbone}")


def load_model(path: Path) -> keras.Model:
    """A saved model. Loading it through this module defines the custom layers it may hold."""
    return keras.saving.load_model(path, compile=False)


def _check_choice(what: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {what} {value!r}; allowed: {', '.join(allowed)}")


def _compact_backbone(x, width: int, bn_momentum: float):
    """Residual CNN for CPU: a strided stem, then four stages at /2, /4, /8, /16.

    Plain 3x3 convs in the two high-resolution stages (depthwise convs are
    memory-bound on CPU there, dense ones use oneDNN well), separable convs in the
    deeper, wider stages where dense 3x3 weights would dominate size and FLOPs.
    """
    x = _conv_bn(x, width, 3, strides=2, bn_momentum=bn_momentum, name="stem")
    for stage, (mult, separable) in enumerate([(1, False), (2, False), (4, True), (8, True)]):
        x = _residual_block(
            x,
            width * mult,
            strides=1 if stage == 0 else 2,
            separable=separable,
            bn_momentum=bn_momentum,
            name=f"stage{stage + 1}",
        )
    return layers.GlobalAveragePooling2D(name="pool")(x)


def _conv_bn(
    x,
    filters: int,
    kernel: int,
    *,
    strides: int = 1,
    separable: bool = False,
    relu: bool = True,
    bn_momentum: float,
    name: str,
):
    conv = layers.SeparableConv2D if separable else layers.Conv2D
    x = conv(filters, kernel, strides=strides, padding="same", use_bias=False, name=f"{name}_conv")(x)
    x = FusedBatchNorm(momentum=bn_momentum, name=f"{name}_bn")(x)
    return layers.ReLU(name=f"{name}_relu")(x) if relu else x


def _residual_block(x, filters: int, *, strides: int, separable: bool, bn_momentum: float, name: str):
    shortcut = x
    if strides != 1 or x.shape[-1] != filters:
        shortcut = _conv_bn(x, filters, 1, strides=strides, relu=False, bn_momentum=bn_momentum, name=f"{name}_proj")
    y = _conv_bn(x, filters, 3, strides=strides, separable=separable, bn_momentum=bn_momentum, name=f"{name}_a")
    y = _conv_bn(y, filters, 3, separable=separable, relu=False, bn_momentum=bn_momentum, name=f"{name}_b")
    y = layers.Add(name=f"{name}_add")([shortcut, y])
    return layers.ReLU(name=f"{name}_out")(y)


def _application_backbone(inputs, backbone: str, weights: Path | None):
    """keras.applications trunk with the preprocessing its ImageNet weights expect."""
    if backbone in ("resnet50", "vgg16"):
        # "caffe" preprocessing is BGR minus the ImageNet mean: our input order as is.
        x = layers.Rescaling(1.0, offset=[-m for m in _CAFFE_MEAN_BGR], name="rescale")(inputs)
    else:
        x = BgrToRgb(name="bgr_to_rgb")(inputs)
        if backbone == "mobilenet_v3_small":
            x = layers.Rescaling(1 / 127.5, offset=-1.0, name="rescale")(x)
        # efficientnet_b0 carries its own Rescaling + Normalization and takes 0..255 RGB.
    factory = {
        "mobilenet_v3_small": lambda **kw: keras.applications.MobileNetV3Small(include_preprocessing=False, **kw),
        "efficientnet_b0": keras.applications.EfficientNetB0,
        "resnet50": keras.applications.ResNet50,
        "vgg16": keras.applications.VGG16,
    }[backbone]
    trunk = factory(include_top=False, weights=None, input_shape=tuple(x.shape[1:]), pooling="avg")
    if weights is not None:
        try:
            with warnings.catch_warnings():  # a file that does not fit warns once per layer, then raises
                warnings.simplefilter("ignore")
                trunk.load_weights(weights)
        except (ValueError, OSError) as err:
            raise ValueError(f"pretrained weights file {weights} does not fit the {backbone} trunk: {err}") from err
    return trunk(x)


def _age_head(x, age_head: str, age_bins: int):
    """Return the ``age`` tensor in years; a logits layer named ``age_logits`` if any."""
    if age_head == "regression":
        raw = layers.Dense(1, name="age_raw")(x)
        # Start near the middle of the range with a unit step of ~a quarter of it,
        # so the linear unit needn't learn large weights first.
        span = float(age_bins - 1)
        return layers.Rescaling(span / 4, offset=span / 3, name="age")(raw)
    if age_head == "dldl":
        logits = layers.Dense(age_bins, name="age_logits")(x)
        probs = layers.Softmax(name="age_probs")(logits)
        centres = [[float(k)] for k in range(age_bins)]
    else:  # ordinal
        logits = layers.Dense(age_bins - 1, name="age_logits")(x)
        probs = layers.Activation("sigmoid", name="age_probs")(logits)
        centres = [[1.0]] * (age_bins - 1)  # age = number of thresholds passed
    # A frozen Dense is the expectation; built-in, so the .keras file needs no custom code.
    return layers.Dense(
        1, use_bias=False, trainable=False, name="age", kernel_initializer=keras.initializers.Constant(centres)
    )(probs)


def mirror_averaged(model: keras.Model) -> keras.Model:
    """The model whose outputs are the mean of its outputs on each image and on its mirror image.

    Inside the saved file, so evaluation and serving average alike; twice the compute per face.
    """
    image = keras.Input(model.input.shape[1:], name="image")
    plain, mirrored = model(image), model(Mirror(name="mirror")(image))
    outputs = {key: layers.Average(name=key)([plain[key], mirrored[key]]) for key in ("age", "gender")}
    return keras.Model(image, outputs, name=f"{model.name}_mirror_averaged")


def training_view(model: keras.Model) -> keras.Model:
    """A model over the same layers for ``compile``/``fit``; ``age_logits`` added if any.

    Weights are shared, so fitting the view trains ``model``. Save ``model`` itself:
    it stays uncompiled, so the file carries no optimizer state and keeps two outputs.
    """
    outputs = dict(model.output)
    if any(layer.name == "age_logits" for layer in model.layers):
        outputs["age_logits"] = model.get_layer("age_logits").output
    return keras.Model(model.input, outputs, name=f"{model.name}_train")


def age_logits_loss(age_head: str, *, age_bins: int = 101, sigma: float = 2.0) -> Callable:
    """Loss for the ``age_logits`` output; ``y_true`` is the age in years, shape (batch, 1).

    dldl: cross-entropy to a Gaussian (std ``sigma`` years) over the bins - equal to
    the KL divergence up to the target's constant entropy. ordinal: binary
    cross-entropy of the "older than k" tasks, summed over them as in CORAL (large
    at first, of dldl's order once only thresholds near the true age are unsure).
    """
    _check_choice("age_head", age_head, ("dldl", "ordinal"))

    def dldl(y_true, logits):
        centres = ops.arange(age_bins, dtype="float32")
        age = ops.clip(ops.cast(y_true, "float32"), 0.0, age_bins - 1.0)
        target = ops.exp(-0.5 * ops.square((centres - age) / sigma))
        target = target / ops.sum(target, axis=-1, keepdims=True)
        return -ops.sum(target * ops.log_softmax(logits, axis=-1), axis=-1)

    def ordinal(y_true, logits):
        thresholds = ops.arange(age_bins - 1, dtype="float32")
        target = ops.cast(ops.cast(y_true, "float32") > thresholds, "float32")
        per_task = ops.binary_crossentropy(target, logits, from_logits=True)
        return ops.sum(per_task, axis=-1)

    return dldl if age_head == "dldl" else ordinal
