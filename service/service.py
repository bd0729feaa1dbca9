"""The BentoML service: images in, faces with boxes, ages and genders out.

Run from the project root:  bentoml serve service.service:AgeGender
(`--arg params=PATH` for another params.yaml; MLFLOW_TRACKING_URI for another store.)

Two services in one `bentoml serve`: `AgeGender` takes HTTP requests, checks and decodes
the images, and draws overlays; `FaceModel` holds the loaded `Predictor` and answers
through a batchable API, so the faces of concurrent requests share one model call
(BentoML adaptive batching). All logic lives in the agegender library.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import aiohttp
import bentoml
import numpy as np
from fastapi import FastAPI
from fastapi.responses import HTMLResponse
from pydantic import BaseModel
from starlette.responses import JSONResponse, Response

from agegender.config import load_params
from agegender.inference import ImageError, Predictor, decode_image, resolve_version
from agegender.render import draw_faces, encode_jpeg
from agegender.tracking import configure_tracking

log = logging.getLogger("bentoml.agegender")


class ServeArgs(BaseModel):
    params: str = "params.yaml"


ARGS = bentoml.use_arguments(ServeArgs)
SERVE = load_params(Path(ARGS.params)).serve
BENTO_MODEL = "agegender:latest"
DEMO_PAGE = (Path(__file__).parent / "demo.html").read_text()
ui = FastAPI(title="agegender demo page and metadata")


def load_checked(uri: str) -> Predictor:
    """A predictor that has loaded and answered one call; nothing half-loaded is ever served."""
    predictor = Predictor.from_registry(uri)
    predictor.warm_up()
    return predictor


@bentoml.service(workers=1, traffic={"timeout": 120})
class FaceModel:
    """The registered model; swaps to a new champion after it has loaded and warmed up."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        if FaceModel.bento is not None:
            # A built Bento carries its model (bentofile.yaml `models:`); it serves that one, no registry.
            self.predictor = Predictor.from_bentoml(BENTO_MODEL)
            self.predictor.warm_up()
        else:
            configure_tracking(Path.cwd(), os.environ.get("MLFLOW_TRACKING_URI"))
            self.predictor = load_checked(SERVE.model_uri)
            threading.Thread(target=self.watch_registry, daemon=True, name="champion-watch").start()
        log.warning("serving %s", self.predictor.describe())

    def watch_registry(self) -> None:
        while not self.stop.wait(SERVE.reload_seconds):
            try:
                self.reload()
            except Exception:  # a broken new version must never take the serving one down
                log.exception("keeping version %s: the new model could not be loaded", self.predictor.info.version)

    def reload(self) -> bool:
        """Load the version the model URI names now, if it changed; True when swapped."""
        name, version = resolve_version(SERVE.model_uri)
        if str(version.version) == self.predictor.info.version:
            return False
        fresh = load_checked(f"models:/{name}/{version.version}")
        self.predictor = fresh  # one reference assignment: a request sees the old model or the new one
        log.warning("swapped to %s", fresh.describe())
        return True

    @bentoml.on_shutdown
    def shutdown(self) -> None:
        self.stop.set()

    @bentoml.api(
        batchable=SERVE.max_batch_size > 1,
        max_batch_size=max(SERVE.max_batch_size, 2),
        max_latency_ms=SERVE.max_latency_ms,
    )
    def predict_images(self, images: list[np.ndarray]) -> list[dict]:
        predictor = self.predictor  # the whole batch is answered by one model
        model = predictor.describe()
        return [{"faces": faces, "model": model} for faces in predictor.predict_images(images)]

    @bentoml.api
    def metadata(self) -> dict:
        return self.predictor.describe()


# The image routes and the one multipart field each takes.
IMAGE_FIELDS = {"/predict": "image", "/annotate": "image", "/predict_batch": "images"}


class UploadGuard:
    """ASGI middleware in front of the image routes: size, content type and form fields.

    BentoML 1.4 has no request size limit (it reads a raw body whole into memory), answers
    a raw image body with "Invalid JSON", and fails with a 500 on a file in an unexpected
    form field. Checking here turns each into a 4xx that names the problem.
    """

    def __init__(self, app, max_bytes: int, batch_max_bytes: int) -> None:
        self.app, self.max_bytes, self.batch_max_bytes = app, max_bytes, batch_max_bytes

    async def __call__(self, scope, receive, send) -> None:
        field = IMAGE_FIELDS.get(scope.get("path", "").rstrip("/")) if scope["type"] == "http" else None
        if field is None or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        body = b""
        refusal = self.check_headers(headers, field, scope["path"])
        if refusal is None:
            body = await read_body(receive)
            refusal = await check_fields(scope, body, field)
        else:
            # Read and drop the body before answering: a client still sending it would otherwise
            # see a reset connection instead of the error. Memory stays flat, chunk by chunk.
            await read_body(receive, keep=False)
        if refusal:
            await JSONResponse({"error": refusal[1]}, status_code=refusal[0])(scope, receive, send)
            return
        await self.app(scope, replay(body), send)

    def check_headers(self, headers: dict, field: str, path: str) -> tuple[int, str] | None:
        limit = self.batch_max_bytes if field == "images" else self.max_bytes
        length, content_type = headers.get("content-length"), headers.get("content-type", "")
        if length is None:
            return 411, "a Content-Length header is required (chunked uploads are not accepted)"
        if not length.isdigit():
            return 400, f"invalid Content-Length {length!r}"
        if int(length) > limit:
            return 413, f"upload is {int(length) / 2**20:.1f} MB, over the limit of {limit / 2**20:.1f} MB"
        if not content_type.startswith("multipart/form-data"):
            return 415, (
                f"content type {content_type or 'none'!r}: send the image as multipart/form-data "
                f"in the field {field!r} (curl -F {field}=@photo.jpg ...{path})"
            )
        return None


async def read_body(receive, keep: bool = True) -> bytes:
    chunks, more = [], True
    while more:
        message = await receive()
        if keep:
            chunks.append(message.get("body", b""))
        more = message.get("more_body", False) and message["type"] == "http.request"
    return b"".join(chunks)


def replay(body: bytes):
    sent = False

    async def receive():
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return receive


async def check_fields(scope, body: bytes, field: str) -> tuple[int, str] | None:
    from starlette.requests import Request

    try:
        form = await Request(scope, receive=replay(body)).form()
    except Exception as err:  # python-multipart's errors have no common base
        return 400, f"malformed multipart body: {err}"
    try:
        names = set(form.keys())
    finally:
        await form.close()
    if field not in names or names - {field}:
        return 400, f"expected the image in the form field {field!r}, got fields {sorted(names)}"
    return None


def refuse(ctx: bentoml.Context, err: ImageError) -> dict:
    ctx.response.status_code = err.status
    return {"error": str(err)}


@bentoml.asgi_app(ui, path="/ui")
@bentoml.service(workers=1, threads=16, traffic={"timeout": 120})
class AgeGender:
    """The HTTP front: decode and check uploads, ask FaceModel, shape the answers."""

    model = bentoml.depends(FaceModel)

    def decode(self, image: Path) -> np.ndarray:
        return decode_image(
            image.read_bytes(),
            max_bytes=SERVE.max_upload_bytes,
            max_pixels=SERVE.max_pixels,
        )

    def call_model(self, images: list[np.ndarray]) -> list[dict]:
        for _ in range(2):
            try:
                return self.model.predict_images(images)
            except aiohttp.ClientConnectionError:
                # BentoML 1.4.40 replaces its inter-service HTTP session every 100 calls and closes
                # the old one with calls still in flight; those calls fail with connection errors and are safe to repeat.
                log.warning("model service connection closed under the call; repeating it")
        return self.model.predict_images(images)

    def answer(self, images: list[np.ndarray]) -> list[dict]:
        results = self.call_model(images)
        return [
            {"faces": r["faces"], "width": img.shape[1], "height": img.shape[0], "model": r["model"]}
            for img, r in zip(images, results, strict=True)
        ]

    @bentoml.api
    def predict(self, image: Path, ctx: bentoml.Context) -> dict:
        """An image (JPEG, PNG, WebP or BMP) -> its faces with box, age and gender, and the model that answered."""
        try:
            decoded = self.decode(image)
        except ImageError as err:
            return refuse(ctx, err)
        return self.answer([decoded])[0]

    @bentoml.api
    def annotate(self, image: Path, ctx: bentoml.Context):
        """An image -> a JPEG with each face's box and "age, gender" drawn on it."""
        try:
            decoded = self.decode(image)
        except ImageError as err:
            return refuse(ctx, err)
        result = self.answer([decoded])[0]
        headers = {"X-Model-Version": str(result["model"]["version"]), "X-Faces": str(len(result["faces"]))}
        return Response(encode_jpeg(draw_faces(decoded, result["faces"])), media_type="image/jpeg", headers=headers)

    @bentoml.api
    def predict_batch(self, images: list[Path], ctx: bentoml.Context) -> dict:
        """Several images in one call; a bad image fails the whole call, naming which one."""
        if len(images) > SERVE.max_batch_images:
            return refuse(ctx, ImageError(f"{len(images)} images, over the limit of {SERVE.max_batch_images}", 413))
        decoded = []
        for index, image in enumerate(images):
            try:
                decoded.append(self.decode(image))
            except ImageError as err:
                return refuse(ctx, ImageError(f"image {index}: {err}", err.status))
        return {"results": self.answer(decoded)}

    @bentoml.api
    def metadata(self) -> dict:
        """The model being served: name, version, data version."""
        return self.model.metadata()

    @ui.get("/metadata")
    def ui_metadata(self) -> dict:
        return self.model.metadata()

    @ui.get("/", response_class=HTMLResponse)
    def demo_page(self) -> str:
        return DEMO_PAGE


# A multipart body carries a little more than the file itself.
AgeGender.add_asgi_middleware(
    UploadGuard,
    max_bytes=SERVE.max_upload_bytes + 64 * 1024,
    batch_max_bytes=SERVE.max_upload_bytes * SERVE.max_batch_images + 64 * 1024,
)
