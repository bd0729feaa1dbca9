"""The BentoML service: images in, faces with boxes, ages and genders out.

Run from the project root:  bentoml serve service.service:AgeGender
(`--arg params=PATH` for another params.yaml; MLFLOW_TRACKING_URI for another store.)

Two services in one `bentoml serve`: `AgeGender` takes HTTP requests, checks and decodes
the images, and draws overlays; `FaceModel` holds the loaded `Predictor` and answers
through a batchable API, so the faces of concurrent requests share one model call
(BentoML adaptive batching). All logic lives in the agegender library.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import threading
import time
import uuid
from pathlib import Path

import aiohttp
import bentoml
import numpy as np
from bentoml.exceptions import ServiceUnavailable
from fastapi import FastAPI
from fastapi.responses import HTMLResponse
from mlflow import MlflowClient
from pydantic import BaseModel
from starlette.datastructures import UploadFile
from starlette.responses import JSONResponse, Response

from agegender.config import ServeParams, load_params
from agegender.images import ImageError, load_image, open_image
from agegender.inference import Predictor
from agegender.monitoring import RecordWriter, image_record, records_url, service_metrics
from agegender.registry import resolve_version
from agegender.render import draw_faces, encode_jpeg
from agegender.tracking import configure_tracking

log = logging.getLogger("bentoml.agegender")


class ServeArgs(BaseModel):
    params: str = "params.yaml"


ARGS = bentoml.use_arguments(ServeArgs)
PARAMS = load_params(Path(ARGS.params))
SERVE, MONITOR = PARAMS.serve, PARAMS.monitor
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
        version = resolve_version(MlflowClient(), SERVE.model_uri)
        if str(version.version) == self.predictor.info.version:
            return False
        fresh = load_checked(f"models:/{version.name}/{version.version}")
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
        answers = predictor.predict_images(images, observe=MONITOR.enabled)
        return [{"faces": faces, "model": model} for faces in answers]

    @bentoml.api
    def metadata(self) -> dict:
        return self.predictor.describe()


# The image routes and the one multipart field each takes.
IMAGE_FIELDS = {"/predict": "image", "/annotate": "image", "/predict_batch": "images"}
# A multipart body carries a little more than the files themselves.
FORM_BYTES = 64 * 1024
# By then the queue that was too long has been served.
RETRY_AFTER_S = math.ceil(SERVE.max_latency_ms / 1000)


# The `reason` label of agegender_refusals on /metrics, unless a refusal names its own.
REASONS = {
    400: "bad_request",
    408: "upload_timeout",
    411: "no_content_length",
    413: "too_large",
    415: "unsupported_type",
    503: "overloaded",
}


class Refused(Exception):
    """A request answered with a 4xx (or 503 when overloaded) and a message naming the problem and its limit."""

    def __init__(self, status: int, message: str, retry_after: int | None = None, reason: str | None = None) -> None:
        super().__init__(message)
        self.status, self.retry_after = status, retry_after
        self.reason = reason or REASONS[status]

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)} if self.retry_after else {}

    def count(self) -> None:
        if MONITOR.enabled:
            service_metrics().refused(self.reason, self.status)

    def answer(self, ctx: bentoml.Context) -> dict:
        """The refusal as an API method's answer."""
        self.count()
        ctx.response.status_code = self.status
        for name, value in self.headers().items():
            ctx.response.headers[name] = value
        return {"error": str(self)}

    def response(self) -> JSONResponse:
        """The refusal as a response of the upload guard or the demo page's routes."""
        self.count()
        return JSONResponse({"error": str(self)}, self.status, headers=self.headers())


class UploadGuard:
    """ASGI middleware in front of the image routes: size, content type, form fields, upload time.

    BentoML 1.4 has no request size limit (it reads a raw body whole into memory), answers a
    raw image body with "Invalid JSON", fails with a 500 on a file in an unexpected form field,
    downloads any URL sent as a text field, names its temp files after the client's file name
    (a 300-byte name fails) and waits 120 s for a stalled body. Here each becomes a 4xx that
    names the problem, and BentoML is passed a fresh body holding only the files, unnamed.
    """

    def __init__(self, app, serve: ServeParams) -> None:
        self.app, self.serve = app, serve

    async def __call__(self, scope, receive, send) -> None:
        field = IMAGE_FIELDS.get(scope.get("path", "").rstrip("/")) if scope["type"] == "http" else None
        if field is None or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        try:
            scope, body = await self.check(scope, receive, field)
        except Refused as err:
            await err.response()(scope, receive, send)
            return
        await self.app(scope, replay(body), send)

    async def check(self, scope, receive, field: str) -> tuple[dict, bytes]:
        """The request as BentoML gets it: the files of `field` re-sent under fixed names, and the time it arrived."""
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        try:
            self.check_headers(headers, field, scope["path"])
        except Refused:
            # Read and drop the body before answering: a client still sending it would otherwise
            # see a reset connection instead of the error. Memory stays flat, chunk by chunk.
            with contextlib.suppress(TimeoutError):
                await read_body(receive, seconds=self.serve.upload_timeout_s, keep=False)
            raise
        try:
            body = await read_body(receive, seconds=self.serve.upload_timeout_s)
        except TimeoutError:
            raise Refused(
                408, f"the upload did not arrive within serve.upload_timeout_s = {self.serve.upload_timeout_s:g} s"
            ) from None
        most = 1 if field == "image" else self.serve.max_batch_images
        body, content_type = multipart_body(field, await read_files(scope, body, field, most))
        kept = [(k, v) for k, v in scope["headers"] if k.lower() not in (b"content-type", b"content-length")]
        kept += [(b"content-type", content_type.encode()), (b"content-length", str(len(body)).encode())]
        scope = {**scope, "headers": kept}
        scope.setdefault("state", {})["received"] = time.monotonic()  # queue time starts: the upload is in
        return scope, body

    def check_headers(self, headers: dict, field: str, path: str) -> None:
        limit, name = self.serve.max_upload_bytes, f"serve.max_upload_mb = {self.serve.max_upload_mb:g} MB"
        if field == "images":
            limit *= self.serve.max_batch_images
            name += f" x serve.max_batch_images = {self.serve.max_batch_images}"
        length, content_type = headers.get("content-length"), headers.get("content-type", "")
        if length is None:
            raise Refused(411, "a Content-Length header is required (chunked uploads are not accepted)")
        if not length.isdigit():
            raise Refused(400, f"invalid Content-Length {length!r}")
        if int(length) > limit + FORM_BYTES:
            raise Refused(413, f"upload is {int(length) / 2**20:.1f} MB, over {name} (+ 64 KB of form)")
        if not content_type.startswith("multipart/form-data"):
            raise Refused(
                415,
                f"content type {content_type or 'none'!r}: send the image as multipart/form-data "
                f"in the field {field!r} (curl -F {field}=@photo.jpg ...{path})",
            )


async def read_body(receive, *, seconds: float, keep: bool = True) -> bytes:
    """The whole request body; TimeoutError when it has not all arrived within `seconds`."""
    chunks, more = [], True
    async with asyncio.timeout(seconds):
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


async def read_files(scope, body: bytes, field: str, most: int) -> list[bytes]:
    """The bytes of each file in the form field `field`; anything else in the form is refused by name."""
    from starlette.requests import Request

    try:
        form = await Request(scope, receive=replay(body)).form()
    except Exception as err:  # python-multipart's errors have no common base
        raise Refused(400, f"malformed multipart body: {err}") from None
    try:
        names, values = set(form.keys()), form.getlist(field)
        if field not in names or names - {field}:
            raise Refused(400, f"expected the image in the form field {field!r}, got fields {sorted(names)}")
        if not all(isinstance(value, UploadFile) for value in values):
            # BentoML would take a text value for a URL and download it: uploads only, nothing is fetched.
            raise Refused(
                400, f"the field {field!r} must be a file (curl -F {field}=@photo.jpg), not text; URLs are not fetched"
            )
        if len(values) > most:
            if most == 1:
                where = f"{scope['path']} takes one (send several to /predict_batch)"
                raise Refused(400, f"{len(values)} files in the field {field!r}: {where}")
            raise Refused(413, f"{len(values)} images, over serve.max_batch_images = {most}")
        return [await value.read() for value in values]
    finally:
        await form.close()


def multipart_body(field: str, files: list[bytes]) -> tuple[bytes, str]:
    """The files as a fresh multipart body (body, content type); client file names and part headers are dropped."""
    boundary = uuid.uuid4().hex
    head = f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="upload"\r\n\r\n'.encode()
    return b"".join(head + data + b"\r\n" for data in files) + f"--{boundary}--\r\n".encode(), (
        f"multipart/form-data; boundary={boundary}"
    )


def check_queue_time(ctx: bentoml.Context) -> float:
    """Seconds the request waited for a worker; load shedding: one that waited too long is refused, not served late."""
    received = getattr(ctx.request.state, "received", None)
    waited_ms = (time.monotonic() - received) * 1000 if received else 0.0
    if waited_ms > SERVE.max_latency_ms:
        raise Refused(
            503,
            f"overloaded: the request waited {waited_ms:.0f} ms for a worker, over serve.max_latency_ms = "
            f"{SERVE.max_latency_ms} ms; retry in {RETRY_AFTER_S} s",
            RETRY_AFTER_S,
        )
    return waited_ms / 1000


def decode_uploads(uploads: list[Path], *, numbered: bool) -> list[np.ndarray]:
    """The request's images, decoded only once their headers show they fit the per-image and per-request limits."""

    def refusal(index: int, err: ImageError) -> Refused:
        return Refused(err.status, f"image {index}: {err}" if numbered else str(err))

    opened = []
    for index, upload in enumerate(uploads):
        try:
            opened.append(open_image(upload.read_bytes(), SERVE.image_limits))
        except ImageError as err:
            raise refusal(index, err) from None
    total = sum(image.width * image.height for image in opened)
    if total > SERVE.max_request_megapixels * 1e6:
        raise Refused(
            413,
            f"the images add up to {total / 1e6:.1f} megapixels, over serve.max_request_megapixels = "
            f"{SERVE.max_request_megapixels:g} megapixels",
        )
    decoded = []
    for index, image in enumerate(opened):
        try:
            decoded.append(load_image(image))
        except ImageError as err:
            raise refusal(index, err) from None
    return decoded


@bentoml.asgi_app(ui, path="/ui")
@bentoml.service(workers=1, threads=16, traffic={"timeout": 120})
class AgeGender:
    """The HTTP front: decode and check uploads, ask FaceModel, shape the answers."""

    model = bentoml.depends(FaceModel)

    def __init__(self) -> None:
        self.records = None
        if MONITOR.enabled:
            self.records = RecordWriter(
                records_url(MONITOR.records, Path.cwd()),
                batch_records=MONITOR.batch_records,
                flush_seconds=MONITOR.flush_seconds,
                on_drop=service_metrics().dropped.inc,
            )

    @bentoml.on_shutdown
    def shutdown(self) -> None:
        if self.records is not None:
            self.records.close()

    def call_model(self, method: str, *args):
        """FaceModel's `method`; Refused (503) when it sheds load or cannot be reached."""
        for _ in range(3):
            try:
                return getattr(self.model, method)(*args)
            except ServiceUnavailable:  # adaptive batching sheds what would wait over max_latency_ms
                raise Refused(
                    503,
                    f"overloaded: the model's queue would keep this request over serve.max_latency_ms = "
                    f"{SERVE.max_latency_ms} ms; retry in {RETRY_AFTER_S} s",
                    RETRY_AFTER_S,
                ) from None
            except (aiohttp.ClientConnectionError, OSError) as err:
                # BentoML 1.4.40 replaces its inter-service HTTP session every 100 calls and closes the
                # old one with calls still in flight: those fail with connection errors and are safe to repeat.
                failure = err
                log.warning("model service connection failed (%s); repeating the call", err)
        raise Refused(
            503,
            f"the model service is not reachable ({type(failure).__name__}: {failure}); "
            f"it may be restarting, retry in {RETRY_AFTER_S} s",
            RETRY_AFTER_S,
            reason="model_unreachable",
        )

    def serve(self, ctx: bentoml.Context, uploads: list[Path], *, route: str, numbered: bool = False):
        """(decoded images, one answer each); Refused for anything the service will not answer."""
        queue_s = check_queue_time(ctx)
        images = decode_uploads(uploads, numbered=numbered)
        results = self.call_model("predict_images", images)
        if MONITOR.enabled:
            self.observe(route, uploads, images, results, queue_s)
        return images, [
            {
                "faces": [{k: v for k, v in face.items() if k != "observed"} for face in r["faces"]],
                "width": img.shape[1],
                "height": img.shape[0],
                "model": r["model"],
            }
            for img, r in zip(images, results, strict=True)
        ]

    def observe(self, route: str, uploads: list[Path], images: list[np.ndarray], results: list[dict], queue_s: float):
        """Metrics and one served-input record per image (the upload itself only with monitor.store_uploads)."""
        sizes = [(image.shape[1], image.shape[0]) for image in images]
        service_metrics().observe(sizes, [r["faces"] for r in results], results[0]["model"], queue_s)
        if self.records is None:
            return
        request = uuid.uuid4().hex
        for upload, (width, height), r in zip(uploads, sizes, results, strict=True):
            record = image_record(
                request=request, route=route, width=width, height=height, faces=r["faces"], model=r["model"]
            )
            self.records.add(record, upload.read_bytes() if MONITOR.store_uploads else None)

    @bentoml.api
    def predict(self, image: Path, ctx: bentoml.Context) -> dict:
        """An image (JPEG, PNG, WebP or BMP) -> its faces with box, age and gender, and the model that answered."""
        try:
            _, (result,) = self.serve(ctx, [image], route="predict")
        except Refused as err:
            return err.answer(ctx)
        return result

    @bentoml.api
    def annotate(self, image: Path, ctx: bentoml.Context):
        """An image -> a JPEG with each face's box and "age, gender" drawn on it."""
        try:
            (decoded,), (result,) = self.serve(ctx, [image], route="annotate")
        except Refused as err:
            return err.answer(ctx)
        headers = {"X-Model-Version": str(result["model"]["version"]), "X-Faces": str(len(result["faces"]))}
        return Response(encode_jpeg(draw_faces(decoded, result["faces"])), media_type="image/jpeg", headers=headers)

    @bentoml.api
    def predict_batch(self, images: list[Path], ctx: bentoml.Context) -> dict:
        """Several images in one call; a bad image fails the whole call, naming which one."""
        try:
            _, results = self.serve(ctx, images, route="predict_batch", numbered=True)
        except Refused as err:
            return err.answer(ctx)
        return {"results": results}

    @bentoml.api
    def metadata(self, ctx: bentoml.Context) -> dict:
        """The model being served: name, version, data version."""
        try:
            return self.call_model("metadata")
        except Refused as err:
            return err.answer(ctx)

    @ui.get("/metadata")
    def ui_metadata(self):
        try:
            return self.call_model("metadata")
        except Refused as err:
            return err.response()

    @ui.get("/", response_class=HTMLResponse)
    def demo_page(self) -> str:
        return DEMO_PAGE


AgeGender.add_asgi_middleware(UploadGuard, serve=SERVE)
