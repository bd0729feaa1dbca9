"""The `agegender` command: one thin command per pipeline stage, plus tools.

Each command loads params.yaml once, calls one library function, and says what it
wrote where. Heavy imports (TensorFlow, Great Expectations, DVC) happen inside the
commands so `--help` and data ingest stay fast.
"""

from __future__ import annotations

import os
import subprocess
from contextlib import contextmanager
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

from agegender import paths
from agegender.config import ConfigError, Params, load_params

app = typer.Typer(help="Age and gender estimation from face images: pipeline stages and tools.", no_args_is_help=True)
data_app = typer.Typer(help="Manage the raw dataset in data/ (tracked by DVC in data.dvc).", no_args_is_help=True)
app.add_typer(data_app, name="data")
registry_app = typer.Typer(
    help="The registered model in the MLflow model registry: versions and aliases.", no_args_is_help=True
)
app.add_typer(registry_app, name="registry")
stack_app = typer.Typer(
    help="The team stack on this machine: PostgreSQL, an S3 store, MLflow and Prefect servers.", no_args_is_help=True
)
app.add_typer(stack_app, name="stack")
flow_app = typer.Typer(
    help="The Prefect training flow: run it once, serve it on a schedule, or deploy it to a work pool.",
    no_args_is_help=True,
)
app.add_typer(flow_app, name="flow")
monitor_app = typer.Typer(help="What production sees: the drift check on the service's records.", no_args_is_help=True)
app.add_typer(monitor_app, name="monitor")
console = Console(stderr=True, soft_wrap=True)  # no hard wraps: messages stay greppable in logs

PARAMS = typer.Option(Path("params.yaml"), "--params", help="Parameters file.")
ROOT = Path(".")  # relative, so messages name paths as dvc.yaml does


def fail(message: str) -> typer.Exit:
    console.print(f"[bold red]error:[/] {escape(message)}")  # escaped: errors quote text like "[Errno 111]"
    return typer.Exit(code=1)


def params_or_exit(path: Path) -> Params:
    try:
        return load_params(path)
    except ConfigError as err:
        raise fail(str(err)) from None


@data_app.command("ingest")
def ingest_command(
    source: str = typer.Argument(
        ...,
        help="'demo', a UTKFace folder or .tar.gz/.zip archive, a CSV manifest (path,age,gender[,race]), or an http(s)/s3 URL of an archive.",
    ),
    append: bool = typer.Option(False, "--append", help="Add to the current dataset, skipping images already present."),
    replace: bool = typer.Option(
        False, "--replace", help="Allow replacing the dataset with one under half its size (refused otherwise)."
    ),
    sha256: str | None = typer.Option(
        None, "--sha256", help="Expected SHA-256 of the archive (local or downloaded); a mismatch changes nothing."
    ),
    params_file: Path = PARAMS,
) -> None:
    """Write SOURCE into data/ (images + labels.csv), track it with DVC and push it if a remote is set.

    All or nothing: every image must decode and an archive must be complete, or nothing changes.
    """
    from agegender.data.fetch import ingest_tracked

    params = params_or_exit(params_file)
    console.print(f"Ingesting {source!r} into {paths.DATA}/{' (append)' if append else ''}")
    with data_errors():
        result = ingest_tracked(
            Path.cwd(),
            source,
            append=append,
            demo=params.data.demo,
            replace=replace,
            sha256=sha256,
            checks=params.data.ingest,
        )
    console.print(result.summary, markup=False)


@data_app.command("fetch")
def fetch_command(params_file: Path = PARAMS) -> None:
    """Get the dataset data.dvc names (DVC cache or remote); if none has it, ingest data.source."""
    from agegender.data.fetch import fetch_dataset

    params = params_or_exit(params_file)
    console.print(
        f"Fetching the dataset named by data.dvc (dvc pull), else ingesting data.source={params.data.source!r}"
    )
    with data_errors():
        result = fetch_dataset(Path.cwd(), params.data.source, params.data.demo, params.data.ingest)
    console.print(result.summary, markup=False)


@contextmanager
def data_errors():
    from agegender.data.sources import SourceError
    from agegender.data.versioning import VersioningError

    try:
        yield
    except (SourceError, VersioningError, OSError) as err:
        raise fail(f"{err}\nNothing was changed in {paths.DATA}/.") from None


@app.command("validate")
def validate_command(params_file: Path = PARAMS) -> None:
    """Check data/ with Great Expectations; quarantine bad rows; fail if too many or a table check fails."""
    from agegender.validation import ValidationFailed, run_validate_stage

    params = params_or_exit(params_file)
    console.print(f"Validating {paths.DATA / paths.LABELS} and its images")
    try:
        report = run_validate_stage(ROOT, params)
    except ValidationFailed as err:
        console.print(err.report.summary, markup=False)
        raise fail(str(err)) from None
    except (FileNotFoundError, ValueError) as err:
        raise fail(str(err)) from None
    console.print(report.summary, markup=False)


@app.command("preprocess")
def preprocess_command(params_file: Path = PARAMS) -> None:
    """Detect and crop the valid faces, split them stratified, cache the crops in artifacts/prepared."""
    from agegender.preprocess import run_preprocess_stage

    params = params_or_exit(params_file)
    manifest = paths.VALIDATION / paths.MANIFEST
    console.print(f"Preprocessing {manifest} with the {params.preprocess.detector!r} face detector")
    try:
        result = run_preprocess_stage(ROOT, params)
    except (FileNotFoundError, ValueError) as err:
        raise fail(str(err)) from None
    console.print(result.summary, markup=False)


@app.command("train")
def train_command(params_file: Path = PARAMS) -> None:
    """Train the multi-task Keras model on artifacts/prepared; track the run in MLflow."""
    from agegender.distributed import cluster_from_tf_config
    from agegender.training import TrainingError, run_train_stage

    params = params_or_exit(params_file)
    try:  # set on each host of a multi-worker training (README: Multi-worker training)
        cluster = cluster_from_tf_config(os.environ.get("TF_CONFIG"))
    except ValueError as err:
        raise fail(str(err)) from None
    names = ", ".join(c.name for c in params.candidates)
    where = f" as worker {cluster.index} of {cluster.size}" if cluster else ""
    console.print(f"Training candidates {names} on {paths.PREPARED}/{where}")
    try:
        result = run_train_stage(ROOT, params, tracking_uri=env_tracking_uri(), cluster=cluster)
    except (TrainingError, FileNotFoundError, RuntimeError) as err:
        raise fail(str(err)) from None
    console.print(result.summary, markup=False)


@app.command("evaluate")
def evaluate_command(params_file: Path = PARAMS) -> None:
    """Score the trained model and the current champion on the test split; decide the gates."""
    from agegender.evaluation import run_evaluate_stage

    params = params_or_exit(params_file)
    console.print(f"Evaluating {paths.MODEL} on the test split")
    try:
        result = run_evaluate_stage(ROOT, params, tracking_uri=env_tracking_uri())
    except (FileNotFoundError, ValueError) as err:
        raise fail(str(err)) from None
    console.print(result.summary, markup=False)


@app.command("register")
def register_command(params_file: Path = PARAMS) -> None:
    """Register the evaluated model as a new version; move aliases as the gate decided."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from agegender.registry import run_register_stage

    params = params_or_exit(params_file)
    try:
        result = run_register_stage(ROOT, params, tracking_uri=env_tracking_uri())
    except MlflowException as err:
        raise fail(
            f"registering in the MLflow registry at {mlflow.get_tracking_uri()} failed; run "
            f"`agegender register` again when it answers (it ends what this attempt left). MLflow said: {err.message}"
        ) from None
    console.print(result.summary, markup=False)


def registry_client(params_file: Path):
    import mlflow

    params = params_or_exit(params_file)
    use_project_store()
    return mlflow.MlflowClient(), params.registry.model_name


@registry_app.command("list")
def registry_list_command(params_file: Path = PARAMS) -> None:
    """Every registered version with its aliases, data version, metrics and gate outcome."""
    from agegender.registry import list_versions

    client, name = registry_client(params_file)
    versions = list_versions(client, name)
    if not versions:
        console.print(f"No versions of '{name}' registered yet")
        return
    for v in versions:
        aliases = ", ".join(v["aliases"]) or "-"
        metrics = ", ".join(f"{k} {v['metrics'][k]}" for k in ("age_mae", "gender_accuracy") if k in v["metrics"])
        print(
            f"{name} v{v['version']}  aliases: {aliases}  data {str(v['data_version'])[:8]}  {metrics}  "
            f"run {v['run_id']}  {v['created']}\n    gate: {v['gate_summary']}"
        )


@registry_app.command("promote")
def registry_promote_command(version: str, params_file: Path = PARAMS) -> None:
    """Make VERSION the champion (the previous champion is kept in the history for rollback)."""
    from agegender.registry import RegistryError, promote

    client, name = registry_client(params_file)
    try:
        promote(client, name, version)
    except RegistryError as err:
        raise fail(str(err)) from None
    console.print(f"'{name}' version {version} is now the champion")


@registry_app.command("rollback")
def registry_rollback_command(params_file: Path = PARAMS) -> None:
    """Return the champion alias to the previous champion."""
    from agegender.registry import RegistryError, rollback

    client, name = registry_client(params_file)
    try:
        version = rollback(client, name).version
    except RegistryError as err:
        raise fail(str(err)) from None
    console.print(f"'{name}' champion rolled back to version {version}")


MODEL = typer.Option(
    None,
    "--model",
    help="models:/NAME@ALIAS, models:/NAME/VERSION or a trained model folder [default: serve.model_uri]",
)


def load_predictor(model: str | None, params: Params):
    """The one Predictor, from the registry (MLFLOW_TRACKING_URI or the project store) or a model folder."""
    from agegender.inference import Predictor

    model = model or params.serve.model_uri
    console.print(f"Loading model {model}")
    try:
        if model.startswith("models:/"):
            use_project_store()
            return Predictor.from_registry(model)
        return Predictor.from_path(Path(model))
    except Exception as err:  # MLflow raises many types; every one means "no usable model here"
        raise fail(f"cannot load model {model}: {err}") from None


def image_paths(paths: list[Path]) -> list[Path]:
    from agegender.data.sources import SourceError, list_images

    found = []
    for path in paths:
        if path.is_dir():
            try:
                found.extend(list_images(path))
            except SourceError as err:
                raise fail(str(err)) from None
        elif path.exists():
            found.append(path)
        else:
            raise fail(f"{path}: no such file or folder")
    return found


@app.command("predict")
def predict_command(
    paths: list[Path] = typer.Argument(..., help="Image files and folders of images."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per image on stdout."),
    annotate: Path | None = typer.Option(None, "--annotate", help="Write annotated JPEGs into this folder."),
    model: str | None = MODEL,
    params_file: Path = PARAMS,
) -> None:
    """Find the faces in images and estimate each one's age and gender."""
    import json

    from agegender.images import ImageError, read_image
    from agegender.render import draw_faces, encode_jpeg

    params = params_or_exit(params_file)
    files = image_paths(paths)
    predictor = load_predictor(model, params)
    if annotate:
        annotate.mkdir(parents=True, exist_ok=True)
    failed = 0
    for path in files:
        try:
            image = read_image(path, params.serve.image_limits)  # what the service would accept
        except ImageError as err:
            console.print(f"[red]{path}: {err}[/]")
            failed += 1
            continue
        faces = predictor.predict_image(image)
        if as_json:
            print(json.dumps({"file": str(path), "faces": faces, "model": predictor.describe()}))
        else:
            summary = "; ".join(f"{f['age']:.0f} {f['gender']} at {f['box']}" for f in faces) or "no faces"
            print(f"{path}: {summary}")
        if annotate:
            (annotate / f"{path.stem}.jpg").write_bytes(encode_jpeg(draw_faces(image, faces)))
    done = f"{len(files) - failed} of {len(files)} images predicted with {predictor.info.uri}"
    console.print(done + (f"; annotated images in {annotate}/" if annotate else ""))
    if failed:
        raise typer.Exit(code=1)


@app.command("video")
def video_command(
    source: str = typer.Argument(..., help="A camera index (0, 1, ...) or a video file."),
    out: Path | None = typer.Option(None, "--out", help="Write the annotated video here (.mp4 or .avi)."),
    max_frames: int = typer.Option(0, "--max-frames", help="Stop after this many frames (0: until the end)."),
    model: str | None = MODEL,
    params_file: Path = PARAMS,
) -> None:
    """Boxes, ages and genders drawn on every frame of a camera or video, with a frames-per-second readout."""
    from agegender.video import annotate_video, open_capture

    params = params_or_exit(params_file)
    try:
        capture = open_capture(source)
    except (OSError, ValueError) as err:
        raise fail(str(err)) from None
    predictor = load_predictor(model, params)
    try:
        stats = annotate_video(predictor, capture, name=source, out=out, max_frames=max_frames)
    except (OSError, ValueError) as err:
        raise fail(str(err)) from None
    console.print(
        f"{stats['frames']} frames, {stats['faces']} faces, {stats['fps']:.1f} frames/s"
        + (f"; annotated video in {out}" if out else "")
    )


@app.command("eval-dir")
def eval_dir_command(
    source: str = typer.Argument(..., help="A labelled folder (UTKFace names), archive or CSV manifest."),
    model: str | None = MODEL,
    as_json: bool = typer.Option(False, "--json", help="Print the metrics as JSON."),
    params_file: Path = PARAMS,
) -> None:
    """Score any labelled images against any model: age and gender metrics, for cross-dataset checks."""
    import json

    from agegender.data.sources import SourceError
    from agegender.evaluation import score_labelled_source

    params = params_or_exit(params_file)
    predictor = load_predictor(model, params)
    console.print(f"Scoring {source} with {predictor.info.uri}")
    try:
        metrics = score_labelled_source(predictor, source, params.validate_.age_buckets)
    except (SourceError, ValueError) as err:
        raise fail(str(err)) from None
    if as_json:
        print(json.dumps(metrics, indent=2))
        return
    for key in ("n_samples", "age_mae", "age_rmse", "age_cs5", "gender_accuracy", "gender_accuracy_18plus"):
        print(f"{key:24} {metrics[key]}")
    console.print(f"skipped: {metrics['skipped']}")


@registry_app.command("to-bentoml")
def registry_to_bentoml_command(model: str | None = MODEL, params_file: Path = PARAMS) -> None:
    """Copy a registered model into the BentoML model store, so `bentoml build` can pack it into a Bento."""
    from agegender.inference import import_to_bentoml

    params = params_or_exit(params_file)
    model = model or params.serve.model_uri
    use_project_store()
    try:
        tag = import_to_bentoml(model)
    except Exception as err:  # MLflow raises many types; every one means "no such model"
        raise fail(f"cannot import {model}: {err}") from None
    console.print(f"{model} is now {tag} in the BentoML model store (bentoml models list)")


@flow_app.command("run")
def flow_run_command(
    only_if_data_changed: bool = typer.Option(
        False, "--only-if-data-changed", help="What a scheduled run does: skip when data.dvc is the champion's data."
    ),
) -> None:
    """Fetch the data and run every dvc.yaml stage as a Prefect flow (DVC skips what did not change)."""
    from agegender.flow import training_flow

    console.print("Running the training flow (without PREFECT_API_URL Prefect starts a temporary server)")
    state = training_flow(project_root=str(Path.cwd()), force=not only_if_data_changed, return_state=True)
    console.print(state.message)
    if not state.is_completed():
        raise typer.Exit(code=1)


@flow_app.command("serve")
def flow_serve_command(params_file: Path = PARAMS) -> None:
    """Serve the flow as deployment agegender-training/retrain on schedule.cron, against PREFECT_API_URL."""
    from agegender.deployments import serve_deployment
    from agegender.drift_flow import DEPLOYMENT as DRIFT
    from agegender.drift_flow import FLOW_NAME as DRIFT_FLOW
    from agegender.flow import DEPLOYMENT, FLOW_NAME

    params = params_or_exit(params_file)
    api = require_prefect_api()
    schedule = params.schedule
    console.print(
        f"Serving deployment '{FLOW_NAME}/{DEPLOYMENT}' against the Prefect API at {api}; cron "
        f"'{schedule.cron}' ({schedule.timezone}): a scheduled run retrains only when data.dvc's data version "
        f"differs from the champion's. Beside it '{DRIFT_FLOW}/{DRIFT}', cron '{params.monitor.drift.cron}'. "
        "Stop with Ctrl-C."
    )
    serve_deployment(
        Path.cwd(), name=DEPLOYMENT, cron=schedule.cron, timezone=schedule.timezone, monitor=params.monitor
    )


def require_prefect_api() -> str:
    """PREFECT_API_URL, once its server answers: schedules and workers need a real Prefect server."""
    import urllib.request

    from prefect.settings import PREFECT_API_URL

    api = PREFECT_API_URL.value()
    if not api:
        raise fail(
            "PREFECT_API_URL is not set; schedules do not fire on Prefect's temporary server. Start one with "
            "`prefect server start` and `prefect config set PREFECT_API_URL=http://127.0.0.1:4200/api`."
        )
    try:
        urllib.request.urlopen(f"{api.rstrip('/')}/health", timeout=10).close()
    except OSError as err:
        raise fail(
            f"the Prefect API at PREFECT_API_URL={api} does not answer ({err}); start `prefect server start`"
        ) from None
    return api


@flow_app.command("deploy")
def flow_deploy_command(params_file: Path = PARAMS) -> None:
    """Deploy prefect.yaml's deployments on the work pool at the current commit; workers run them."""
    from agegender.deployments import deploy_to_work_pool

    params = params_or_exit(params_file)
    require_prefect_api()
    # Workers clone the deployed commit from origin: it must be there.
    fetched = subprocess.run(["git", "fetch", "-q", "origin"], capture_output=True, text=True)
    if fetched.returncode != 0:
        raise fail(f"cannot fetch from the git remote 'origin', which workers clone: {fetched.stderr.strip()}")
    pushed = subprocess.run(["git", "branch", "-r", "--contains", "HEAD"], capture_output=True, text=True)
    if not pushed.stdout.strip():
        raise fail("HEAD is on no branch of the git remote 'origin', which workers clone: `git push` it first")
    schedule = params.schedule
    try:
        names = deploy_to_work_pool(Path.cwd(), schedule, log=lambda line: console.print(line, markup=False))
    except (OSError, RuntimeError) as err:  # prefect.yaml missing, or `prefect deploy` failed (its output is above)
        raise fail(str(err)) from None
    console.print(
        f"Deployed {', '.join(names)} (retrain on cron '{schedule.cron}', {schedule.timezone}). "
        "Start workers on any host: prefect worker start --pool agegender"
    )


@flow_app.command("multiworker")
def flow_multiworker_command(
    workers: list[str] = typer.Argument(..., help="host:port of every worker, the chief first (TF_CONFIG order)."),
) -> None:
    """Train one model across hosts: a train-multiworker run per host, each with its TF_CONFIG."""
    from prefect.exceptions import ObjectNotFound

    from agegender.deployments import MULTIWORKER, start_multiworker_runs, work_queue_of, worker_command
    from agegender.flow import FLOW_NAME

    require_prefect_api()
    try:
        runs = start_multiworker_runs(workers)
    except ValueError as err:  # a malformed address, or a host without its work queue
        raise fail(str(err)) from None
    except ObjectNotFound:
        raise fail(
            f"no deployment '{FLOW_NAME}/{MULTIWORKER}' on the Prefect server: `agegender flow deploy` first"
        ) from None
    for index, (worker, run) in enumerate(zip(workers, runs, strict=True)):
        role = "chief: evaluates and registers" if index == 0 else "trains with the chief"
        console.print(f"{run.name} ({run.id}) on work queue {work_queue_of(worker)!r}, {role}", markup=False)
    console.print(
        f"Started {len(runs)} runs of '{FLOW_NAME}/{MULTIWORKER}'. Each host's worker takes its own: "
        + worker_command("agegender")
    )


@monitor_app.command("drift")
def monitor_drift_command(
    hours: float | None = typer.Option(None, "--hours", help="Window length [default: monitor.drift.window_hours]."),
    end: str | None = typer.Option(None, "--end", help="Window end, ISO time (UTC unless it says) [default: now]."),
    retrain: bool | None = typer.Option(
        None,
        "--retrain/--no-retrain",
        help="On drift, start agegender-training/retrain [default: monitor.drift.retrain].",
    ),
    params_file: Path = PARAMS,
) -> None:
    """Compare the service's records of a window with the champion's training reference; report; exit 2 on drift."""
    from agegender.drift_flow import drift_flow

    params = params_or_exit(params_file)
    console.print(f"Checking drift on the records in {params.monitor.records} against {params.serve.model_uri}")
    state = drift_flow(project_root=str(Path.cwd()), window_hours=hours, end=end, retrain=retrain, return_state=True)
    if not state.is_completed():
        raise fail(state.message or "the drift check failed")
    result = state.result()
    console.print(state.message, markup=False)
    console.print(
        f"Report: {result['report']}"
        + (f"; retraining run {result['retraining_run']}" if result["retraining_run"] else "")
    )
    if result["drifted"]:
        raise typer.Exit(code=2)


def env_tracking_uri() -> str | None:
    """The tracking store named by MLFLOW_TRACKING_URI; None means the project's own."""
    return os.environ.get("MLFLOW_TRACKING_URI")


def stack_config(params_file: Path):
    """The stack section of params.yaml and the stack's folder (relative to the current folder)."""
    cfg = params_or_exit(params_file).stack
    return cfg, Path.cwd() / cfg.dir


@stack_app.command("up")
def stack_up_command(params_file: Path = PARAMS) -> None:
    """Start PostgreSQL, the S3 store (SeaweedFS), the MLflow and the Prefect server; running ones are kept."""
    from agegender.stack import StackError, stack_up, urls

    cfg, root = stack_config(params_file)
    console.print(f"Starting the team stack on {cfg.host}; data, logs and secrets.env in {root}/")
    try:
        stack_up(root, cfg, base_env=os.environ, report=console.print)
    except StackError as err:
        raise fail(str(err)) from None
    where = urls(cfg)
    console.print(
        f'Stack is up. Point clients at it: eval "$(agegender stack env)"\n'
        f"  MLflow UI {where['mlflow']}   Prefect UI {where['prefect']}   S3 {where['s3']}"
    )


@stack_app.command("env")
def stack_env_command(params_file: Path = PARAMS) -> None:
    """Print `export` lines with the stack's URLs and credentials: eval "$(agegender stack env)"."""
    import shlex

    from agegender.stack import StackError, client_env, urls

    cfg, root = stack_config(params_file)
    try:
        values = client_env(root, cfg)
    except StackError as err:
        raise fail(str(err)) from None
    for key, value in values.items():
        print(f"export {key}={shlex.quote(value)}")
    remote = f"dvc remote add -d team s3://{cfg.buckets.dvc} && dvc remote modify team endpointurl {urls(cfg)['s3']}"
    print(f"# DVC remote, once per repository: {remote}")


@stack_app.command("status")
def stack_status_command(params_file: Path = PARAMS) -> None:
    """Which services run and answer, where, and their logs; exits 1 unless all are up."""
    from agegender.stack import stack_status

    cfg, root = stack_config(params_file)
    rows = stack_status(root, cfg)
    for row in rows:
        if row["running"]:
            state = "up" if row["answering"] else "running, not answering"
        else:
            state = "down, port held by another" if row["answering"] else "down"
        print(f"{row['service']:9} {state:24} {row['url']:28} log: {row['log']}")
    if not all(row["running"] and row["answering"] for row in rows):
        raise typer.Exit(code=1)


@stack_app.command("down")
def stack_down_command(params_file: Path = PARAMS) -> None:
    """Stop every service of the stack; databases, stored objects and credentials stay for the next `up`."""
    from agegender.stack import StackError, stack_down

    cfg, root = stack_config(params_file)
    try:
        stack_down(root, report=console.print)
    except StackError as err:
        raise fail(str(err)) from None
    console.print(f"Stack stopped; its data stays in {root}/")


def use_project_store() -> str:
    """Point MLflow at MLFLOW_TRACKING_URI, or else the project's own store; returns the URI."""
    from agegender.tracking import configure_tracking

    return configure_tracking(Path.cwd(), env_tracking_uri())


if __name__ == "__main__":
    app()
