"""The one inference path: image -> faces -> the shared crop -> batched model call.

Evaluation, the CLI and the service all use `Predictor`, so they cannot disagree.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from itertools import chain
from pathlib import Path

import numpy as np

from agegender import paths
from agegender.config import ModelSpec
from agegender.faces import Detector, DetectorPool, crop_chip, crop_face, make_detector, to_bgr
from agegender.labels import GENDER_THRESHOLD
from agegender.monitoring import crop_stats, face_observation

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

    def __init__(
        self, model, spec: ModelSpec, info: ModelInfo, detector: Detector | None = None, detect_threads: int = 0
    ) -> None:
        self.model = model
        self.spec = spec
        self.info = info
        self.detector = detector or make_detector(spec.detector)
        self.detect_threads = detect_threads or min(os.cpu_count() or 1, 8)
        # the images of a batch are detected in parallel (threads start on first use)
        self._pool = DetectorPool(spec.detector, self.detect_threads)

    @classmethod
    def from_path(cls, model_dir: Path) -> Predictor:
        """A trained model folder: model.keras + spec.json (as written by the train stage, and the artifacts
        of the MLflow model it logs)."""
        from agegender.model import load_model

        spec = load_spec(model_dir / paths.MODEL_SPEC)
        model = load_model(model_dir / paths.KERAS_MODEL)
        return cls(
            model,
            spec,
            ModelInfo(name=str(model_dir), version=None, data_version=spec.data_version, uri=str(model_dir)),
        )

    @classmethod
    def from_registry(cls, uri: str) -> Predictor:
        """A registered model, e.g. models:/agegender@champion or models:/agegender/3."""
        import mlflow

        from agegender.registry import resolve_version

        version = resolve_version(mlflow.MlflowClient(), uri)
        model = load_network(Path(mlflow.artifacts.download_artifacts(f"models:/{version.name}/{version.version}")))
        spec = registered_spec(version)
        info = ModelInfo(name=version.name, version=str(version.version), data_version=spec.data_version, uri=uri)
        return cls(model, spec, info)

    def describe(self) -> dict:
        """What answers: reported by the service in every response."""
        return {
            "model": self.info.name,
            "version": self.info.version,
            "data_version": self.info.data_version,
            "uri": self.info.uri,
            "trained_on": self.spec.trained_on,
        }

    def warm_up(self) -> None:
        """One real call, so the first request does not pay for graph tracing (and a broken model fails here)."""
        size = self.spec.image_size
        ages, female = self.predict_crops(np.zeros((1, size, size, 3), np.uint8))
        if not (np.isfinite(ages).all() and np.isfinite(female).all()):
            raise RuntimeError(f"{self.info.uri}: the warm-up call returned non-finite outputs")

    @classmethod
    def from_bentoml(cls, tag: str) -> Predictor:
        """A model imported into the BentoML store by `import_to_bentoml` (how a built Bento carries it)."""
        import bentoml

        stored = bentoml.models.get(tag)
        model = load_network(Path(stored.path_of("mlflow_model")))
        spec = ModelSpec.model_validate(stored.info.metadata["spec"])
        info = ModelInfo(
            name=stored.info.labels["registered_model"],
            version=stored.info.labels["version"],
            data_version=spec.data_version,
            uri=f"bentoml:{stored.tag}",
        )
        return cls(model, spec, info)

    def predict_crops(self, crops: np.ndarray, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
        """(age in years, probability of female) for crops made by `crop_face` with this model's spec."""
        if len(crops) == 0:
            return np.zeros(0, np.float32), np.zeros(0, np.float32)
        crops = np.asarray(crops, np.float32)
        # predict() sets up a whole tf.data pipeline per call: ~10x slower than one batch for a few faces.
        if len(crops) <= batch_size:
            out = self.model.predict_on_batch(crops)
        else:
            out = self.model.predict(crops, batch_size=batch_size, verbose=0)
        return np.asarray(out["age"])[:, 0], np.asarray(out["gender"])[:, 0]

    def predict_chips(self, images: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Predictions for face chips, cropped exactly as preprocessing cropped the training data."""
        spec = self.spec
        crops = [
            crop_chip(self.detector, image, margin=spec.margin, size=spec.image_size, align=spec.align)[0]
            for image in images
        ]
        return self.predict_crops(np.stack(crops))

    def detect_all(self, images: list[np.ndarray]) -> list[list]:
        if len(images) == 1 or self.detect_threads == 1:
            return [self.detector.detect(image) for image in images]
        return list(self._pool.map(lambda detector, image: detector.detect(image), images))

    def predict_images(self, images: list[np.ndarray], *, observe: bool = False) -> list[list[dict]]:
        """Every face the detector finds in each image; the faces of all images share one model call.

        With `observe`, each face also has `observed`: its crop's statistics and P(female), for
        the service's served-input records (monitoring.face_observation).
        """
        images = [to_bgr(image) for image in images]
        boxes = self.detect_all(images)
        crops = [
            crop_face(image, box, margin=self.spec.margin, size=self.spec.image_size, align=self.spec.align)
            for image, found in zip(images, boxes, strict=True)
            for box in found
        ]
        size = self.spec.image_size
        crops = np.stack(crops) if crops else np.zeros((0, size, size, 3), np.uint8)
        ages, female = self.predict_crops(crops)
        faces = [face_result(b, float(a), float(p)) for b, a, p in zip(chain(*boxes), ages, female, strict=True)]
        if observe:
            stats = crop_stats(crops)
            for index, face in enumerate(faces):
                face["observed"] = face_observation(stats, index, float(female[index]))
        ends = np.cumsum([len(found) for found in boxes])
        return [faces[end - len(found) : end] for found, end in zip(boxes, ends, strict=True)]

    def predict_image(self, image: np.ndarray) -> list[dict]:
        """Every face the detector finds in an arbitrary image, with box, age and gender."""
        return self.predict_images([image])[0]


def import_to_bentoml(uri: str, name: str = "agegender") -> str:
    """Copy a registered model (and its crop spec) into the BentoML model store; returns its tag."""
    import bentoml
    import mlflow

    from agegender.registry import resolve_version

    version = resolve_version(mlflow.MlflowClient(), uri)
    stored = bentoml.mlflow.import_model(
        name,
        f"models:/{version.name}/{version.version}",
        labels={"registered_model": version.name, "version": str(version.version)},
        metadata={"spec": registered_spec(version).model_dump(mode="json"), "source": uri},
    )
    return str(stored.tag)


def load_network(mlflow_model: Path):
    """The Keras network in a folder holding an MLflow model that training logged.

    Since issue 12 that model is the pyfunc predictor (agegender.pyfunc) with the network as
    an artifact; versions registered before are the tensorflow flavour, and a rollback may
    bring one back.
    """
    network = mlflow_model / "artifacts" / paths.KERAS_MODEL
    if network.exists():
        from agegender.model import load_model

        return load_model(network)
    import mlflow

    return mlflow.tensorflow.load_model(str(mlflow_model))


def registered_spec(version) -> ModelSpec:
    """The crop and label spec that the training run of a registered model version logged."""
    import mlflow

    path = mlflow.artifacts.download_artifacts(run_id=version.run_id, artifact_path=f"outputs/{paths.MODEL_SPEC}")
    return load_spec(Path(path))


def face_result(box, age: float, female: float) -> dict:
    gender = "female" if female >= GENDER_THRESHOLD else "male"
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
