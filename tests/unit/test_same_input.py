"""One file, one model input: preprocessing, evaluation, eval-dir, CLI predict and the service agree to the pixel."""

from __future__ import annotations

import numpy as np

from agegender.config import ModelSpec, PreprocessParams, load_params
from agegender.images import decode_image, read_image
from agegender.inference import ModelInfo, Predictor
from agegender.preprocess import crop_all
from tests.conftest import PROJECT, utkface_files


class RecordingModel:
    """Stands in for the Keras model only to capture the exact input each entry point gives it."""

    def __init__(self) -> None:
        self.inputs: list[np.ndarray] = []

    def predict_on_batch(self, crops: np.ndarray) -> dict:
        self.inputs.append(np.asarray(crops))
        return {"age": np.zeros((len(crops), 1)), "gender": np.zeros((len(crops), 1))}


def test_one_file_gives_the_same_model_input_through_every_entry_point():
    params = PreprocessParams(workers=1)
    spec = ModelSpec(
        image_size=params.image_size,
        margin=params.margin,
        detector=params.detector,
        backbone="compact",
        age_head="dldl",
        data_version="test",
        trained_on="real",
    )
    files = utkface_files(6, offset=1)
    trained, fell_back = crop_all(files, params)  # the training data: preprocess reads the files
    assert not fell_back.any(), "every chip's face is detected, so the service path crops it too"
    model = RecordingModel()
    predictor = Predictor(model, spec, ModelInfo(name="test", version=None, data_version="test", uri="test"))

    predictor.predict_chips([read_image(path) for path in files])  # evaluation and eval-dir
    np.testing.assert_array_equal(model.inputs[-1], trained.astype(np.float32))

    limits = load_params(PROJECT / "params.yaml").serve.image_limits
    for path, crop in zip(files, trained, strict=True):
        predictor.predict_images([decode_image(path.read_bytes(), limits)])  # the service and CLI predict
        assert any(np.array_equal(served, crop.astype(np.float32)) for served in model.inputs[-1]), path.name
