"""The one inference path: image -> faces -> the shared crop -> batched model call.

Evaluation, the CLI and the service all use `Predictor`, so they cannot disagree.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from agegender.config import ModelSpec
from agegender.faces import Detector, crop_face, detect_or_fallback, make_detector, to_bgr

# Half-width of the reported age range: about the model's typical error on real data.
AGE_RANGE_YEARS = 5


@dataclass(frozen=True)
class ModelInfo:
    name: str
    version: str | None
    data_version: str
    uri: str


class Predictor:
    """A loaded model with its crop geometry and face detector."""

    def __init__(self, model, spec: ModelSpec, info: ModelInfo, detector: Detector | None = None) -> None:
        self.model = model
        self.spec = spec
        self.info = info
        self.detector = detector or make_detector(spec.detector)

    @classmethod
    def from_path(cls, model_dir: Path) -> Predictor:
        """A trained model folder: model.keras + spec.json (as written by the train stage)."""
        import keras

        spec = load_spec(model_dir / "spec.json")
        model = keras.saving.load_model(model_dir / "model.keras", compile=False)
        return cls(
            model,
            spec,
            ModelInfo(name=str(model_dir), version=None, data_version=spec.data_version, uri=str(model_dir)),
        )

    @classmethod
    def from_registry(cls, uri: str) -> Predictor:
        """A registered model, e.g. models:/agegender@champion or models:/agegender/3."""
        import mlflow

        name, version = resolve_version(uri)
        spec_path = mlflow.artifacts.download_artifacts(run_id=version.run_id, artifact_path="outputs/spec.json")
        model = mlflow.tensorflow.load_model(f"models:/{name}/{version.version}")
        spec = load_spec(Path(spec_path))
        return cls(
            model, spec, ModelInfo(name=name, version=str(version.version), data_version=spec.data_version, uri=uri)
        )

    def predict_crops(self, crops: np.ndarray, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
        """(age in years, probability of female) for crops made by `crop_face` with this model's spec."""
        if len(crops) == 0:
            return np.zeros(0, np.float32), np.zeros(0, np.float32)
        out = self.model.predict(np.asarray(crops, np.float32), batch_size=batch_size, verbose=0)
        return np.asarray(out["age"])[:, 0], np.asarray(out["gender"])[:, 0]

    def crop_chip(self, image: np.ndarray) -> np.ndarray:
        """The crop of a face chip (one face filling the image), as in preprocessing."""
        image = to_bgr(image)
        box, _ = detect_or_fallback(self.detector, image)
        return crop_face(image, box, margin=self.spec.margin, size=self.spec.image_size)

    def predict_chips(self, images: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Predictions for face chips, cropped exactly as preprocessing cropped the training data."""
        return self.predict_crops(np.stack([self.crop_chip(image) for image in images]))

    def predict_image(self, image: np.ndarray) -> list[dict]:
        """Every face the detector finds in an arbitrary image, with box, age and gender."""
        image = to_bgr(image)
        boxes = self.detector.detect(image)
        crops = (
            np.stack([crop_face(image, b, margin=self.spec.margin, size=self.spec.image_size) for b in boxes])
            if boxes
            else np.zeros((0, self.spec.image_size, self.spec.image_size, 3), np.uint8)
        )
        ages, female = self.predict_crops(crops)
        return [face_result(box, float(age), float(p)) for box, age, p in zip(boxes, ages, female, strict=True)]


def face_result(box, age: float, female: float) -> dict:
    gender = "female" if female >= 0.5 else "male"
    return {
        "box": [box.x, box.y, box.w, box.h],
        "detection_score": round(float(box.score), 4),
        "age": round(age, 1),
        "age_range": [max(0, round(age) - AGE_RANGE_YEARS), round(age) + AGE_RANGE_YEARS],
        "gender": gender,
        "gender_confidence": round(female if gender == "female" else 1.0 - female, 4),
    }


def load_spec(path: Path) -> ModelSpec:
    if not path.exists():
        raise FileNotFoundError(f"{path}: not found; is this a model folder written by `agegender train`?")
    return ModelSpec.model_validate(json.loads(path.read_text()))


def resolve_version(uri: str):
    """(name, ModelVersion) for models:/NAME@ALIAS or models:/NAME/VERSION."""
    import mlflow

    if not uri.startswith("models:/"):
        raise ValueError(f"{uri}: expected models:/NAME@ALIAS or models:/NAME/VERSION")
    client = mlflow.MlflowClient()
    ref = uri.removeprefix("models:/")
    if "@" in ref:
        name, alias = ref.split("@", 1)
        return name, client.get_model_version_by_alias(name, alias)
    name, version = ref.rsplit("/", 1)
    return name, client.get_model_version(name, version)
