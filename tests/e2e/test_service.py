"""`bentoml serve` with a registered champion trained on real UTKFace chips, called over HTTP.

One tiny champion is trained by `dvc repro` for the module; one real server serves it.
The service, the in-process Predictor and the CLI must give the same answers; every kind
of bad upload gets a 4xx that names the problem and the server keeps answering; a new
champion is picked up without a restart; the demo page works in headless Chromium.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import cv2
import numpy as np
import pytest
from benchmarks.scenes import compose, match_faces
from PIL import Image

from tests.conftest import (
    BIN,
    OPEN_GATES,
    PROJECT,
    TEMPLATE_CHIPS,
    UTKFACE,
    answers_ok,
    copy_repo,
    copy_utk_subset,
    free_port,
    run,
    set_params,
    start,
    stop,
    tail,
    utkface_files,
    wait_until,
)
from tests.unit.test_decode import bomb_png

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

# Gates open (two epochs make no model worth gating; these tests are about serving it), small limits.
SERVICE = {
    "gates": OPEN_GATES,
    "serve": {
        "reload_seconds": 2,
        "max_upload_mb": 2,
        "max_megapixels": 4,
        "max_request_megapixels": 6,
        "upload_timeout_s": 3,
    },
}


TRAIN_CHIPS = TEMPLATE_CHIPS


@pytest.fixture(scope="module")
def champion_repo(trained_template, tmp_path_factory) -> Path:
    """The session's trained template, evaluated and registered: its winner is the champion."""
    root = tmp_path_factory.mktemp("service")
    repo = copy_repo(trained_template, root / "repo")
    set_params(repo, SERVICE)
    # Records outside the project checkout (the server runs in it), written within a second.
    set_params(repo, {"monitor": {"records": str(root / "records"), "flush_seconds": 1, "batch_records": 64}})
    run("dvc", "repro", cwd=repo)
    return repo


def store_uri(repo: Path) -> str:
    return f"sqlite:///{repo / 'mlflow.db'}"


@contextlib.contextmanager
def serving(repo: Path, params: Path, log: Path):
    """A real `bentoml serve` of the repo's champion with these params, until the block ends."""
    port = free_port()
    # A BENTOML_HOME of its own: each `bentoml serve` empties its home's Prometheus folder at start,
    # which would wipe the metrics of a server already running on the same home.
    env = {**os.environ, "MLFLOW_TRACKING_URI": store_uri(repo), "BENTOML_HOME": str(log.parent / "bentoml")}
    args = [str(BIN / "bentoml"), "serve", "service.service:AgeGender", "--host", "127.0.0.1", "--port", str(port)]
    process = start([*args, "--arg", f"params={params}"], cwd=PROJECT, env=env, log=log)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(
            lambda: answers_ok(f"{url}/readyz"), what="bentoml serve ready", seconds=240, process=process, log=log
        )
        yield {"url": url, "process": process, "log": log}
    finally:
        stop(process)


@pytest.fixture(scope="module")
def server(champion_repo, tmp_path_factory):
    with serving(champion_repo, champion_repo / "params.yaml", tmp_path_factory.mktemp("serve") / "serve.log") as s:
        yield s


def multipart(fields: list[tuple[str, str, bytes, str]]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    body = b""
    for name, filename, data, content_type in fields:
        body += (
            (
                f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
                f"Content-Type: {content_type}\r\n\r\n"
            ).encode()
            + data
            + b"\r\n"
        )
    return body + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def post(
    url: str, route: str, data: bytes | None = None, *, field="image", content_type=None, body=None, name="upload.jpg"
):
    """(status, headers, body bytes) of a POST; `data` goes in as one multipart file."""
    if body is None:
        body, content_type = multipart([(field, name, data, "image/jpeg")])
    request = urllib.request.Request(f"{url}/{route}", data=body, method="POST")
    request.add_header("Content-Type", content_type)
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


def scene_bytes(count: int = 3, seed: int = 0) -> tuple[bytes, list]:
    chips = [cv2.imread(str(p)) for p in utkface_files(count, offset=seed)]
    image, boxes = compose(chips, np.random.default_rng(seed))
    return cv2.imencode(".png", image)[1].tobytes(), boxes


def test_service_predictor_and_cli_give_the_same_answer(server, champion_repo, tmp_path):
    from agegender.images import FILE_LIMITS, decode_image
    from agegender.inference import Predictor
    from agegender.tracking import configure_tracking

    data, boxes = scene_bytes()
    status, _, body = post(server["url"], "predict", data)
    assert status == 200, body
    served = json.loads(body)
    assert served["model"]["version"] == "1" and served["model"]["model"] == "agegender"
    assert served["width"] > served["height"] > 0
    assert all(m is not None for m in match_faces(served["faces"], boxes)), "every pasted face is found"

    configure_tracking(champion_repo, store_uri(champion_repo))
    predictor = Predictor.from_registry("models:/agegender@champion")
    local = predictor.predict_image(decode_image(data, FILE_LIMITS))

    (tmp_path / "scene.png").write_bytes(data)
    cli = run("agegender", "predict", str(tmp_path / "scene.png"), "--json", cwd=champion_repo)
    from_cli = json.loads(cli.stdout.strip().splitlines()[-1])["faces"]

    for other in (local, from_cli):
        assert [f["box"] for f in other] == [f["box"] for f in served["faces"]]
        assert [f["gender"] for f in other] == [f["gender"] for f in served["faces"]]
        np.testing.assert_allclose([f["age"] for f in other], [f["age"] for f in served["faces"]], atol=0.11)


def test_annotate_returns_the_image_with_boxes_and_batch_answers_each_image(server):
    data, _ = scene_bytes(count=2, seed=5)
    status, headers, body = post(server["url"], "annotate", data)
    assert status == 200 and headers["content-type"] == "image/jpeg"
    annotated = cv2.imdecode(np.frombuffer(body, np.uint8), cv2.IMREAD_COLOR)
    original = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    assert annotated.shape == original.shape
    assert np.abs(annotated.astype(int) - original.astype(int)).max() > 100, "boxes and labels are drawn"
    assert headers["x-model-version"] == "1" and int(headers["x-faces"]) >= 2

    other, _ = scene_bytes(count=1, seed=9)
    body, content_type = multipart([("images", "a.png", data, "image/png"), ("images", "b.png", other, "image/png")])
    status, _, answer = post(server["url"], "predict_batch", body=body, content_type=content_type)
    results = json.loads(answer)["results"]
    assert status == 200 and [len(r["faces"]) >= n for r, n in zip(results, (2, 1), strict=True)] == [True, True]


def image_bytes(array: np.ndarray, fmt: str, **options) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt, **options)
    return buf.getvalue()


def test_every_image_kind_decodes_and_a_faceless_image_gives_an_empty_list(server):
    chip = cv2.cvtColor(cv2.imread(str(utkface_files(1, offset=3)[0])), cv2.COLOR_BGR2RGB)
    rgba = np.dstack([chip, np.full(chip.shape[:2], 255, np.uint8)])
    gray16 = cv2.cvtColor(chip, cv2.COLOR_RGB2GRAY).astype(np.uint16) * 257
    kinds = {
        "jpeg": image_bytes(chip, "JPEG"),
        "png-rgba": image_bytes(rgba, "PNG"),
        "webp": image_bytes(chip, "WEBP"),
        "bmp": image_bytes(chip, "BMP"),
        "gray": image_bytes(cv2.cvtColor(chip, cv2.COLOR_RGB2GRAY), "PNG"),
        "png-16-bit": cv2.imencode(".png", gray16)[1].tobytes(),
        # what many cameras write: a JPEG with a second picture appended
        "mpo": image_bytes(chip, "MPO", save_all=True, append_images=[Image.fromarray(chip[::-1])]),
    }
    for kind, data in kinds.items():
        status, _, body = post(server["url"], "predict", data)
        assert status == 200, (kind, body)
        assert len(json.loads(body)["faces"]) == 1, kind
    blank = np.full((240, 320, 3), 128, np.uint8)
    status, _, body = post(server["url"], "predict", image_bytes(blank, "PNG"))
    assert status == 200 and json.loads(body)["faces"] == []


BAD_UPLOADS = {
    "non-image bytes": (b"%PDF-1.4 this is not an image", 415, "not an image"),
    "truncated jpeg": (None, 400, "truncated"),
    "zero bytes": (b"", 400, "0 bytes"),
    "decompression bomb": (bomb_png(30000), 413, "too large"),
    "absurd size": (bomb_png(5000), 413, "too large: 5000x5000 (25.0 megapixels), over serve.max_megapixels = 4"),
    "over max_upload_mb": (b"\xff\xd8\xff" + os.urandom(3 * 2**20), 413, "over serve.max_upload_mb = 2 MB"),
}


def test_bad_uploads_get_a_4xx_that_names_the_problem_and_the_service_lives_on(server):
    good, _ = scene_bytes(count=1, seed=2)
    cases = dict(BAD_UPLOADS)
    cases["truncated jpeg"] = (
        cv2.imencode(".jpg", cv2.imread(str(utkface_files(1)[0])))[1].tobytes()[:2500],
        400,
        "truncated",
    )
    for name, (data, status, words) in cases.items():
        for route in ("predict", "annotate"):
            got, headers, body = post(server["url"], route, data)
            assert got == status and headers["content-type"].startswith("application/json"), (name, route, body)
            assert words in json.loads(body)["error"], (name, json.loads(body))
    wrong_type = post(server["url"], "predict", body=good, content_type="text/plain")
    assert wrong_type[0] == 415 and "multipart/form-data" in json.loads(wrong_type[2])["error"]
    wrong_field = post(server["url"], "predict", good, field="photo")
    assert wrong_field[0] == 400 and "'image'" in json.loads(wrong_field[2])["error"]
    garbled = post(server["url"], "predict", body=b"--x\r\ngarbage", content_type="multipart/form-data; boundary=x")
    assert garbled[0] == 400
    # The batch names the bad image and answers nothing else.
    body, content_type = multipart([("images", "a.png", good, "image/png"), ("images", "b.jpg", b"nope", "image/jpeg")])
    status, _, answer = post(server["url"], "predict_batch", body=body, content_type=content_type)
    assert status == 415 and "image 1" in json.loads(answer)["error"]

    assert server["process"].poll() is None, tail(server["log"])
    status, _, body = post(server["url"], "predict", good)
    assert status == 200 and len(json.loads(body)["faces"]) == 1


def test_uploads_are_files_never_urls_and_their_names_do_not_matter(server):
    """A text value is refused, never fetched; a 300-byte file name works; extra files are a 4xx."""
    hits = []

    class Recorder(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            hits.append(self.path)
            self.send_response(200)
            self.end_headers()

    bait = http.server.HTTPServer(("127.0.0.1", 0), Recorder)
    threading.Thread(target=bait.serve_forever, daemon=True).start()
    try:
        for text in ("hello", f"http://127.0.0.1:{bait.server_port}/photo.jpg"):
            body = f'--b\r\nContent-Disposition: form-data; name="image"\r\n\r\n{text}\r\n--b--\r\n'.encode()
            status, _, answer = post(
                server["url"], "predict", body=body, content_type="multipart/form-data; boundary=b"
            )
            assert status == 400 and "must be a file" in json.loads(answer)["error"], answer
    finally:
        bait.shutdown()
    assert hits == [], "the service fetched a URL a client named"

    good, _ = scene_bytes(count=1, seed=2)
    status, _, answer = post(server["url"], "predict", good, name="a" * 300 + ".png")
    assert status == 200 and len(json.loads(answer)["faces"]) == 1
    two, content_type = multipart([("image", "a.png", good, "image/png")] * 2)
    status, _, answer = post(server["url"], "predict", body=two, content_type=content_type)
    assert status == 400 and "takes one" in json.loads(answer)["error"]
    many, content_type = multipart([("images", "a.png", good, "image/png")] * 17)
    status, _, answer = post(server["url"], "predict_batch", body=many, content_type=content_type)
    assert status == 413 and "over serve.max_batch_images = 16" in json.loads(answer)["error"]


def test_pixels_are_budgeted_per_request_from_the_headers(server):
    """Two 3.6-megapixel images pass serve.max_megapixels = 4 each but not serve.max_request_megapixels = 6."""
    flat = image_bytes(np.full((1800, 2000, 3), 90, np.uint8), "PNG")
    body, content_type = multipart([("images", "a.png", flat, "image/png")] * 2)
    status, _, answer = post(server["url"], "predict_batch", body=body, content_type=content_type)
    assert status == 413, answer
    assert "7.2 megapixels, over serve.max_request_megapixels = 6" in json.loads(answer)["error"]
    body, content_type = multipart([("images", "a.png", flat, "image/png")])
    assert post(server["url"], "predict_batch", body=body, content_type=content_type)[0] == 200


def test_a_stalled_upload_gets_408_after_the_upload_timeout(server):
    port = int(server["url"].rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        head = "POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
        sock.sendall(f"{head}Content-Length: 5000\r\n\r\n--b\r\n".encode())
        started = time.monotonic()
        answer = sock.recv(4096).decode()
        waited = time.monotonic() - started
        while "serve.upload_timeout_s" not in answer and (more := sock.recv(4096)):  # the body may come apart
            answer += more.decode()
    assert answer.startswith("HTTP/1.1 408") and "serve.upload_timeout_s = 3 s" in answer, answer
    assert 2.5 < waited < 15


def test_metadata_names_the_model_and_its_data_version(server, champion_repo):
    import yaml

    data_md5 = yaml.safe_load((champion_repo / "data.dvc").read_text())["outs"][0]["md5"].removesuffix(".dir")
    with urllib.request.urlopen(f"{server['url']}/ui/metadata", timeout=30) as response:
        meta = json.loads(response.read())
    assert meta["model"] == "agegender" and meta["version"] == "1" and meta["data_version"] == data_md5
    status, _, body = post(server["url"], "metadata", body=b"{}", content_type="application/json")
    assert status == 200 and json.loads(body) == meta


def test_demo_page_annotates_a_chosen_image_in_headless_chromium(server, tmp_path):
    from selenium import webdriver
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    data, _ = scene_bytes(count=2, seed=7)
    (tmp_path / "scene.png").write_bytes(data)
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
    ):
        options.add_argument(flag)
    driver_path = shutil.which("chromedriver") or "/usr/bin/chromedriver"
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver_path))
    try:
        driver.get(f"{server['url']}/ui/")
        wait = WebDriverWait(driver, 60)
        wait.until(lambda d: "version 1" in d.find_element(By.ID, "model").text)
        driver.find_element(By.ID, "file").send_keys(str(tmp_path / "scene.png"))
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#faces tbody tr"))
        wait.until(
            lambda d: d.execute_script(
                "const i = document.getElementById('annotated'); return !i.hidden && i.complete && i.naturalWidth > 0;"
            )
        )
        rows = driver.find_elements(By.CSS_SELECTOR, "#faces tbody tr")
        assert len(rows) >= 2 and rows[0].find_elements(By.TAG_NAME, "td")[4].text in ("female", "male")
        width = driver.execute_script("return document.getElementById('annotated').naturalWidth")
        assert width == cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR).shape[1]

        # A bad file shows the service's message, not a broken page.
        (tmp_path / "bad.jpg").write_bytes(b"not an image at all")
        driver.find_element(By.ID, "file").send_keys(str(tmp_path / "bad.jpg"))
        wait.until(lambda d: "not an image" in d.find_element(By.ID, "error").text)
    finally:
        driver.quit()


def test_video_cli_draws_every_frame(champion_repo, tmp_path):
    frames = [
        compose([cv2.imread(str(p)) for p in utkface_files(2, offset=i)], np.random.default_rng(i))[0] for i in range(6)
    ]
    height, width = frames[0].shape[:2]
    source = tmp_path / "in.avi"
    writer = cv2.VideoWriter(str(source), cv2.VideoWriter_fourcc(*"MJPG"), 5.0, (width, height))
    for frame in frames:
        writer.write(cv2.resize(frame, (width, height)))
    writer.release()
    out = tmp_path / "out.avi"
    result = run("agegender", "video", str(source), "--out", str(out), cwd=champion_repo)
    assert "6 frames" in result.stderr and "frames/s" in result.stderr
    capture = cv2.VideoCapture(str(out))
    written = []
    while (frame := capture.read())[0]:
        written.append(frame[1])
    assert len(written) == 6 and written[0].shape == (height, width, 3)
    missing = run("agegender", "video", str(tmp_path / "nope.mp4"), cwd=champion_repo, check=False)
    assert missing.returncode == 1 and "no such video file" in missing.stderr


def test_eval_dir_scores_a_labelled_folder(champion_repo, tmp_path):
    folder = copy_utk_subset(tmp_path / "other", count=40)
    result = run("agegender", "eval-dir", str(folder), "--json", cwd=champion_repo)
    metrics = json.loads(result.stdout)
    assert metrics["n_samples"] == 40 and metrics["skipped"] == {"unlabelled": 2, "unreadable": 0}
    assert 0 < metrics["age_mae"] < 100 and 0 <= metrics["gender_accuracy"] <= 1
    assert metrics["model"]["version"] == "1"


def test_a_built_bento_serves_without_the_registry_and_sheds_overload_with_503_and_retry_after(champion_repo, tmp_path):
    """make bento's three steps in a copy of the build context, then `bentoml serve` the Bento from elsewhere.

    Its params.yaml has serve.max_latency_ms = 300: 64 clients at once are shed, not served late; with
    its model service down the front answers 503 that says so, and recovers once it is back.
    """
    context = tmp_path / "context"
    shutil.copytree(PROJECT / "service", context / "service", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copyfile(PROJECT / "params.yaml", context / "params.yaml")
    set_params(context, {"serve": {"max_latency_ms": 300}})
    env = {**os.environ, "BENTOML_HOME": str(tmp_path / "bentoml"), "MLFLOW_TRACKING_URI": store_uri(champion_repo)}
    run(sys.executable, "-m", "uv", "build", "--wheel", "--out-dir", str(context / "dist"), str(PROJECT), cwd=tmp_path)
    run("agegender", "registry", "to-bentoml", cwd=champion_repo, env=env)
    run("bentoml", "build", "-f", "service/bentofile.yaml", ".", cwd=context, env=env)
    listed = json.loads(run("bentoml", "get", "agegender:latest", "-o", "json", cwd=tmp_path, env=env).stdout)
    assert any(m["tag"].startswith("agegender:") for m in listed["models"])
    # Ready to containerize where a Docker engine runs (none here): a Dockerfile, uv.lock's versions.
    bento = tmp_path / "bentoml" / "bentos" / "agegender" / listed["version"]
    dockerfile = (bento / "env" / "docker" / "Dockerfile").read_text()
    assert "FROM python:3.11-slim" in dockerfile and "TF_CPP_MIN_LOG_LEVEL" in dockerfile
    from importlib.metadata import version

    pinned = (bento / "env" / "python" / "requirements.txt").read_text().splitlines()
    for name in ("tensorflow-cpu", "bentoml", "mlflow", "opencv-python-headless", "prometheus-client"):
        assert f"{name}=={version(name)}" in pinned, name

    # Served from an empty folder with no tracking store: the model can only come from the Bento.
    elsewhere, port, log = tmp_path / "elsewhere", free_port(), tmp_path / "bento.log"
    elsewhere.mkdir()
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{elsewhere / 'empty.db'}"
    process = start(
        ["bentoml", "serve", "agegender:latest", "--host", "127.0.0.1", "--port", str(port)],
        cwd=elsewhere,
        env=env,
        log=log,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: answers_ok(f"{url}/readyz"), what="the Bento serves", seconds=240, process=process, log=log)
        data, _ = scene_bytes(count=1, seed=11)
        status, _, body = post(url, "predict", data)
        answer = json.loads(body)
        assert status == 200 and len(answer["faces"]) == 1
        assert answer["model"]["uri"].startswith("bentoml:agegender:") and answer["model"]["version"] == "1"
        sheds_overload(url)
        answers_503_while_its_model_service_is_gone(url, process, log)
    finally:
        stop(process)


def sheds_overload(url: str) -> None:
    """64 clients, 3 requests each, at a server with serve.max_latency_ms = 300: some served, the rest shed."""
    data, _ = scene_bytes(count=2, seed=3)
    answers, lock = [], threading.Lock()

    def client():
        for _ in range(3):
            status, headers, body = post(url, "predict", data)
            with lock:
                answers.append((status, headers.get("retry-after"), body))

    clients = [threading.Thread(target=client) for _ in range(64)]
    for thread in clients:
        thread.start()
    for thread in clients:
        thread.join(timeout=300)
    statuses = [status for status, _, _ in answers]
    assert len(answers) == 192 and set(statuses) <= {200, 503} and 503 in statuses and 200 in statuses
    for status, retry_after, body in answers:
        if status == 503:
            assert retry_after == "1" and "over serve.max_latency_ms = 300 ms" in json.loads(body)["error"]


def answers_503_while_its_model_service_is_gone(url: str, process: subprocess.Popen, log: Path) -> None:
    """The model service down and its socket gone: a 503 that says so, then recovery once it is back."""
    import psutil

    data, _ = scene_bytes(count=2, seed=3)
    family = psutil.Process(process.pid).children(recursive=True)
    front = next(p for p in family if "AgeGender" in p.cmdline())
    socket_path = Path(json.loads(front.environ()["BENTOML_RUNNER_MAP"])["FaceModel"].removeprefix("file://"))
    socket_path.rename(socket_path.with_suffix(".away"))
    try:
        face_model = next(p for p in family if "FaceModel" in p.cmdline())
        face_model.kill()  # its pooled connections die with it; new ones find no socket
        face_model.wait(timeout=30)
        status, headers, body = post(url, "predict", data)
    finally:
        socket_path.with_suffix(".away").rename(socket_path)
    assert status == 503 and headers["retry-after"] == "1", body
    assert "model service is not reachable" in json.loads(body)["error"]
    assert "No such file or directory" in json.loads(body)["error"]
    wait_until(
        lambda: post(url, "predict", data)[0] == 200,
        what="the restarted model service answers",
        seconds=180,
        process=process,
        log=log,
    )


def scrape(url: str) -> dict[tuple, float]:
    """The service's /metrics as {(sample name, sorted labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"{url}/metrics", timeout=30) as response:
        text = response.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def records_folder(repo: Path) -> Path:
    from agegender.config import load_params

    return Path(load_params(repo / "params.yaml").monitor.records)


def served_records(repo: Path, since, until) -> list[dict]:
    from agegender.monitoring import read_records

    return read_records(str(records_folder(repo)), since=since, until=until)


def test_metrics_and_records_show_what_the_service_saw(server, champion_repo):
    """/metrics counts images, faces, scores, sizes, ages, genders, refusals and the version; a record per image."""
    from datetime import UTC, datetime

    before, since = scrape(server["url"]), datetime.now(UTC)
    scene, _ = scene_bytes(count=3, seed=7)
    status, _, body = post(server["url"], "predict", scene)
    assert status == 200
    faces = json.loads(body)["faces"]
    chips, content_type = multipart([("images", "a.jpg", p.read_bytes(), "image/jpeg") for p in utkface_files(2, 9)])
    assert post(server["url"], "predict_batch", body=chips, content_type=content_type)[0] == 200
    assert post(server["url"], "predict", b"%PDF-1.4 not an image")[0] == 415
    assert post(server["url"], "predict", body=scene, content_type="text/plain")[0] == 415  # refused by the guard
    after = scrape(server["url"])

    def delta(name: str, **labels) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert delta("agegender_images_per_request_count") == 2 and delta("agegender_images_per_request_sum") == 3
    assert delta("agegender_faces_per_request_sum") == len(faces) + 2
    assert delta("agegender_detection_score_count") == delta("agegender_predicted_age_years_count") == len(faces) + 2
    assert delta("agegender_face_side_pixels_count") == len(faces) + 2
    genders = delta("agegender_predicted_gender_total", gender="female") + delta(
        "agegender_predicted_gender_total", gender="male"
    )
    assert genders == len(faces) + 2 and delta("agegender_image_megapixels_count") == 3
    assert delta("agegender_refusals_total", reason="unsupported_type", status="415") == 2
    assert delta("agegender_queue_seconds_count") == 2 and delta("agegender_images_answered_total", version="1") == 3
    assert after[("agegender_model_version", ())] == 1

    # One record per answered image, within monitor.flush_seconds; statistics and predictions, no pixels.
    records = wait_until(
        lambda: (found := served_records(champion_repo, since, datetime.now(UTC))) and len(found) >= 3 and found,
        what="the records are written",
        seconds=30,
        process=server["process"],
        log=server["log"],
    )
    assert len(records) == 3 and [r["route"] for r in records] == ["predict", "predict_batch", "predict_batch"]
    scene_record = records[0]
    assert scene_record["model_version"] == "1" and scene_record["width"] == json.loads(body)["width"]
    assert [f["age"] for f in scene_record["faces"]] == [f["age"] for f in faces]
    assert [f["side"] for f in scene_record["faces"]] == [max(f["box"][2:]) for f in faces]
    assert set(scene_record["faces"][0]) == {"side", "score", "age", "brightness", "contrast", "sharpness", "female"}
    assert "upload" not in scene_record and len(json.dumps(records)) < 4000, "no image data is kept"
    assert not (records_folder(champion_repo) / "uploads").exists()


def drift_window(folder: Path, count: int, *, seed: int, exclude: set[str], adults: bool = False) -> list[Path]:
    """A fixed random sample of well-formed chips, none of the training chips; adults: 18 and over."""
    import random

    files = [p for p in sorted(folder.iterdir()) if p.name.count("_") == 3 and p.name not in exclude]
    files = [p for p in files if int(p.name.split("_")[0]) >= 18] if adults else files
    return random.Random(seed).sample(files, count)


def serve_window(url: str, files: list[Path]) -> tuple:
    """Send the files 16 to a request; (start, end) of the window in UTC."""
    from datetime import UTC, datetime

    start = datetime.now(UTC)
    for first in range(0, len(files), 16):
        body, content_type = multipart(
            [("images", "x.jpg", p.read_bytes(), "image/jpeg") for p in files[first : first + 16]]
        )
        status, _, answer = post(url, "predict_batch", body=body, content_type=content_type)
        assert status == 200, answer
    time.sleep(0.01)
    return start, datetime.now(UTC)


def test_drift_check_on_served_windows_flags_other_ages_and_starts_retraining(server, champion_repo, monkeypatch):
    """Two real served windows against the champion's training reference, through the Prefect drift flow:
    300 unseen part-1 chips (the training distribution) do not drift; 300 adults of parts 2-3 do, and
    with retrain the flow starts a run of the agegender-training/retrain deployment."""
    from prefect.client.orchestration import get_client
    from prefect.testing.utilities import prefect_test_harness

    from agegender.drift_flow import REPORT_HTML, REPORT_JSON, drift_flow
    from agegender.flow import DEPLOYMENT, training_flow

    trained = {p.name for p in utkface_files(TRAIN_CHIPS)}
    same = serve_window(server["url"], drift_window(UTKFACE, 300, seed=0, exclude=trained))
    adults = serve_window(
        server["url"], drift_window(UTKFACE.parent / "utkface-parts23", 300, seed=0, exclude=set(), adults=True)
    )
    wait_until(
        lambda: len(served_records(champion_repo, same[0], adults[1])) >= 600,
        what="both windows' records are written",
        seconds=60,
        process=server["process"],
        log=server["log"],
    )
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store_uri(champion_repo))

    def check(window, retrain: bool) -> dict:
        hours = (window[1] - window[0]).total_seconds() / 3600
        state = drift_flow(
            project_root=str(champion_repo),
            window_hours=hours,
            end=window[1].isoformat(),
            retrain=retrain,
            return_state=True,
        )
        assert state.is_completed(), state.message
        return state.result()

    with prefect_test_harness(server_startup_timeout=120):
        training_flow.to_deployment(name=DEPLOYMENT, parameters={"project_root": str(champion_repo)}).apply()
        quiet = check(same, retrain=True)
        assert quiet["window_faces"] >= 290 and quiet["enough"], quiet["summary"]
        assert not quiet["drifted"] and quiet["retraining_run"] is None, quiet["summary"]
        drift = check(adults, retrain=True)
        assert drift["drifted"], drift["summary"]
        assert drift["summary"].startswith("DRIFT") and drift["model"] == "agegender v1"

        async def read_run(run_id: str):
            async with get_client() as client:
                return await client.read_flow_run(run_id)

        retraining = asyncio.run(read_run(drift["retraining_run"]))
        assert retraining.parameters["force"] is True and retraining.state.is_scheduled()

    reports = champion_repo / "artifacts" / "monitor"
    assert json.loads((reports / REPORT_JSON).read_text())["drifted"] is True
    assert "Drift check: DRIFT" in (reports / REPORT_HTML).read_text()

    # The command a person (or cron) runs: the same check, exit 2 on drift.
    hours = (adults[1] - adults[0]).total_seconds() / 3600
    window = ["--hours", f"{hours:.6f}", "--end", adults[1].isoformat(), "--no-retrain"]
    command = run("agegender", "monitor", "drift", *window, cwd=champion_repo, check=False)
    assert command.returncode == 2, command.stdout + command.stderr
    said = (command.stdout + command.stderr).replace("\n", "")
    assert "DRIFT" in said and str(reports / REPORT_HTML) in said, said


def test_mlflow_models_serve_answers_a_photo_as_the_service_does(server, champion_repo, tmp_path):
    """The registered version is the whole predictor as a pyfunc: image bytes in, the service's faces out."""
    import base64

    port, log = free_port(), tmp_path / "mlflow-serve.log"
    env = {**os.environ, "MLFLOW_TRACKING_URI": store_uri(champion_repo)}
    uri = "models:/agegender@champion"
    args = [
        "mlflow",
        "models",
        "serve",
        "-m",
        uri,
        "--env-manager",
        "local",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    process = start([str(BIN / args[0]), *args[1:]], cwd=tmp_path, env=env, log=log)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: answers_ok(f"{url}/ping"), what="mlflow models serve", seconds=240, process=process, log=log)
        scene, _ = scene_bytes(count=3, seed=12)
        rows = [[base64.b64encode(data).decode()] for data in (scene, b"%PDF-1.4 not an image")]
        body = json.dumps({"dataframe_split": {"columns": ["image"], "data": rows}}).encode()
        status, _, answer = post(url, "invocations", body=body, content_type="application/json")
    finally:
        stop(process)
    assert status == 200, answer
    from_mlflow, refused = json.loads(answer)["predictions"]
    served = json.loads(post(server["url"], "predict", scene)[2])
    assert len(served["faces"]) >= 2 and [f["box"] for f in from_mlflow["faces"]] == [f["box"] for f in served["faces"]]
    assert [f["gender"] for f in from_mlflow["faces"]] == [f["gender"] for f in served["faces"]]
    np.testing.assert_allclose([f["age"] for f in from_mlflow["faces"]], [f["age"] for f in served["faces"]], atol=0.11)
    assert (from_mlflow["width"], from_mlflow["height"]) == (served["width"], served["height"])
    assert from_mlflow["model"]["data_version"] == served["model"]["data_version"]
    assert refused == {"error": "not an image: the bytes are none of JPEG, PNG, WEBP, BMP", "status": 415}


def test_a_new_champion_is_served_without_a_restart_or_a_failed_request(server, champion_repo):
    """Runs last in this module: it changes the registry."""
    import mlflow

    from agegender.registry import register_candidate
    from agegender.tracking import configure_tracking

    data, _ = scene_bytes(count=1, seed=4)
    failures, answered_by, stop_flag = [], set(), threading.Event()

    def keep_asking():
        while not stop_flag.is_set():
            status, _, body = post(server["url"], "predict", data)
            if status != 200:
                failures.append((status, body))
            else:
                answered_by.add(json.loads(body)["model"]["version"])

    client_thread = threading.Thread(target=keep_asking)
    client_thread.start()
    try:
        configure_tracking(champion_repo, store_uri(champion_repo))
        client = mlflow.MlflowClient()
        first = client.get_model_version("agegender", "1")
        decision = {"absolute_pass": True, "full_pass": False, "has_champion": True, "checks": [], "summary": "test"}
        register_candidate(
            client,
            model_name="agegender",
            model_uri=f"runs:/{first.run_id}/model",
            run_id=first.run_id,
            tags={"data_version": first.tags["data_version"]},
            decision=decision,
        )
        run("agegender", "registry", "promote", "2", cwd=champion_repo)

        def serving_two():
            status, _, body = post(server["url"], "metadata", body=b"{}", content_type="application/json")
            return status == 200 and json.loads(body)["version"] == "2"

        wait_until(
            serving_two,
            what="the service picks up version 2",
            seconds=120,
            process=server["process"],
            log=server["log"],
        )
        time.sleep(1)
    finally:
        stop_flag.set()
        client_thread.join(timeout=120)
    assert failures == []
    assert answered_by == {"1", "2"}
    assert "swapped to" in server["log"].read_text()
    assert server["process"].poll() is None, "the same process serves on: no restart"
