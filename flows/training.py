"""The training flow: fetch data -> retrain? -> every stage of dvc.yaml in order -> gate -> report.

Each stage task is `dvc repro <stage>` in the project, the same command a person runs,
so DVC's lock file and caches decide what actually runs: an unchanged stage is skipped
and a later `dvc repro` by hand has nothing to do. The stages themselves are the
`agegender` commands named in dvc.yaml; there is no second implementation here. The
flow adds the orchestration: retries with backoff on the tasks that touch the network
or the tracking store, a timeout on every task (a timed-out stage's processes are
killed), the stages' output in the run logs, and a markdown report artifact (candidates
with their MLflow runs, the gate decision).

With force=False (what the scheduled deployment passes) the flow first compares the
dataset version in data.dvc with the data version of the registry's champion and stops,
reporting "skipped", when they are equal. force=True only lifts that check; DVC still
skips the stages whose inputs did not change.

Run it once with `python -m flows.training` (what `make run` runs); serve it on the
schedule with `python -m flows.retrain`.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.states import Completed

FLOW_NAME = "agegender-training"
REPORT_KEY = "agegender-training-report"
CANDIDATES_KEY = "agegender-candidates"

# Tasks that talk to a DVC remote, a data URL or the MLflow tracking store/registry.
NETWORK_RETRIES: dict[str, Any] = {"retries": 2, "retry_delay_seconds": [10, 30]}
# evaluate loads the champion from the registry; register writes to it.
RETRIED_STAGES = {"evaluate", "register"}
STAGE_TIMEOUTS = {"train": 2 * 3600}  # seconds; CPU training on real data takes a while
DEFAULT_STAGE_TIMEOUT = 3600

MODEL_DIR = Path("artifacts/model")
GATE_FILE = Path("artifacts/eval/gate.json")
REGISTRATION_FILE = Path("artifacts/registry/registration.json")
CANDIDATE_FILES = (Path("artifacts/candidates.json"), MODEL_DIR / "candidates.json")

RUNNING = re.compile(r"Running stage '([^']+)'")
CACHED = re.compile(r"Stage '([^']+)' is cached")
UNCHANGED = re.compile(r"Stage '([^']+)' didn't change")
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def resolve_root(project_root: str) -> Path:
    return Path(project_root).expanduser().resolve()


def pipeline_stages(root: Path) -> list[str]:
    """The stage names of dvc.yaml, in the order they are defined."""
    spec = yaml.safe_load((root / "dvc.yaml").read_text()) or {}
    return list((spec.get("stages") or {}).keys())


# ---------------------------------------------------------------- tasks


@task(name="fetch-data", timeout_seconds=3600, **NETWORK_RETRIES)
def fetch_data(project_root: str) -> dict:
    """What `agegender data fetch` does: dvc pull data.dvc, else ingest data.source."""
    from agegender.config import load_params
    from agegender.data.fetch import fetch_dataset

    logger = get_run_logger()
    root = resolve_root(project_root)
    params = load_params(root / "params.yaml")
    logger.info(
        "Fetching the dataset data.dvc names (dvc pull); if no copy exists, ingesting data.source=%r",
        params.data.source,
    )
    result = fetch_dataset(root, params.data.source, params.data.demo)
    if result["how"] == "dvc pull":
        logger.info("data/ is at DVC version %s (dvc pull of data.dvc)", result["data_version"])
        return result
    logger.info(
        "%s: %d images added, %d skipped (content already present); DVC version %s in data.dvc",
        result["how"],
        result["added"],
        result["skipped_duplicates"],
        result["data_version"],
    )
    if result.get("demo"):
        logger.warning("This is the procedurally drawn DEMO dataset, not real faces.")
    if result.get("push_error"):
        logger.warning("%s; the dataset is tracked locally, run `dvc push` later", result["push_error"])
    elif result.get("remote"):
        logger.info("Pushed to DVC remote %r", result["remote"])
    else:
        logger.info("No DVC remote set: not pushed")
    return result


def champion_info(model_name: str) -> dict | None:
    """The registry's champion and the data version it was trained on; None if there is none."""
    import mlflow

    from agegender.registry import champion

    client = mlflow.MlflowClient()
    version = champion(client, model_name)
    if version is None:
        return None
    data = (version.tags or {}).get("data_version")
    if not data and version.run_id:  # no tag on the version: the training run carries it
        data = client.get_run(version.run_id).data.tags.get("data_version")
    return {"version": str(version.version), "run_id": version.run_id, "data_version": data}


@task(name="check-data-version", timeout_seconds=300, **NETWORK_RETRIES)
def check_retrain(project_root: str, force: bool) -> dict:
    """Retrain if forced, if there is no champion or if data.dvc's version is not the champion's."""
    from agegender.config import load_params
    from agegender.data.versioning import data_version
    from agegender.tracking import configure_tracking

    logger = get_run_logger()
    root = resolve_root(project_root)
    current = data_version(root / "data.dvc")
    decision: dict[str, Any] = {"data_version": current, "champion": None}
    if force:
        decision.update(retrain=True, reason="forced (force=True): the data version is not checked")
        logger.info("Retraining: %s", decision["reason"])
        return decision

    model_name = load_params(root / "params.yaml").registry.model_name
    uri = configure_tracking(root, os.environ.get("MLFLOW_TRACKING_URI"))
    best = champion_info(model_name)
    decision["champion"] = best
    if best is None:
        decision.update(
            retrain=True,
            reason=f"no champion of model {model_name!r} in the registry at {uri}",
        )
    elif not best["data_version"]:
        decision.update(retrain=True, reason=f"the champion (version {best['version']}) has no data_version tag")
    elif best["data_version"] == current:
        decision.update(
            retrain=False,
            reason=f"data version {current} is the champion's (version {best['version']})",
        )
    else:
        decision.update(
            retrain=True,
            reason=f"data changed: champion (version {best['version']}) has "
            f"{best['data_version']}, data.dvc has {current}",
        )
    logger.info("%s: %s", "Retraining" if decision["retrain"] else "Not retraining", decision["reason"])
    return decision


def stream_lines(proc: subprocess.Popen) -> Iterator[str]:
    """The process's output line by line, waking twice a second so a task timeout can interrupt."""
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        for line in proc.stdout:
            lines.put(line.rstrip("\n"))
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    while True:
        try:
            line = lines.get(timeout=0.5)
        except queue.Empty:
            continue
        if line is None:
            return
        yield line


def stop(proc: subprocess.Popen) -> None:
    """Terminate the process group (dvc and its stage command); kill it if it lingers."""
    for sig, grace in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


def run_stage(project_root: str, stage: str) -> dict:
    """`dvc repro <stage>` in the project, its output in the run log; returns which stages ran."""
    logger = get_run_logger()
    root = resolve_root(project_root)
    # Unbuffered and wide (Rich wraps at 80 columns without a terminal): readable run logs.
    env = dict(os.environ, PYTHONUNBUFFERED="1", COLUMNS="200")
    # The stage commands are the `agegender` CLI of this environment, even when it is not activated.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    command = [sys.executable, "-m", "dvc", "repro", stage]
    logger.info("$ dvc repro %s   (in %s)", stage, root)
    result: dict[str, Any] = {"stage": stage, "ran": [], "cached": [], "unchanged": []}
    tail: list[str] = []
    proc = subprocess.Popen(
        command,
        cwd=root,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        start_new_session=True,
    )
    try:
        for raw in stream_lines(proc):
            line = ANSI.sub("", raw).rstrip()
            if not line.strip():
                continue
            tail = (tail + [line])[-20:]
            for pattern, key in ((RUNNING, "ran"), (CACHED, "cached"), (UNCHANGED, "unchanged")):
                if (match := pattern.search(line)) and match.group(1) not in result[key]:
                    result[key].append(match.group(1))
            level = {"ERROR": "error", "WARNING": "warning"}.get(line.split(":")[0], "info")
            getattr(logger, level)(line)
        code = proc.wait()
    finally:
        if proc.poll() is None:  # timed out or interrupted: do not leave the stage running
            logger.error("Stopping `dvc repro %s` (pid %d)", stage, proc.pid)
            stop(proc)
    if code != 0:
        raise RuntimeError(f"`dvc repro {stage}` exited with {code}:\n" + "\n".join(tail))
    if result["ran"]:
        logger.info("DVC ran: %s", ", ".join(result["ran"]))
    elif result["cached"]:
        logger.info("DVC restored from its run cache: %s", ", ".join(result["cached"]))
    else:
        logger.info("Stage %r is up to date: DVC skipped it", stage)
    return result


def stage_task(stage: str):
    """The task for one stage: its own name, timeout and (for the registry) retries."""
    options: dict[str, Any] = {
        "name": f"dvc-repro-{stage}",
        "timeout_seconds": STAGE_TIMEOUTS.get(stage, DEFAULT_STAGE_TIMEOUT),
    }
    if stage in RETRIED_STAGES:
        options.update(NETWORK_RETRIES)
    return task(run_stage).with_options(**options)


@task(name="gate", timeout_seconds=120)
def read_gate(project_root: str) -> dict | None:
    """The evaluation gate's decision (artifacts/eval/gate.json), if there is an evaluate stage."""
    logger = get_run_logger()
    path = resolve_root(project_root) / GATE_FILE
    if not path.exists():
        logger.info("No %s: the pipeline has no evaluation gate yet", GATE_FILE)
        return None
    gate = json.loads(path.read_text())
    logger.info("Gate decision: %s", describe_decision(gate))
    return gate


@task(name="report", timeout_seconds=300)
def publish_report(project_root: str, summary: dict) -> str:
    """The markdown artifact (and a table artifact of the candidates) for this run."""
    logger = get_run_logger()
    root = resolve_root(project_root)
    skipped = summary["status"] == "skipped"
    candidates = [] if skipped else read_candidates(root)
    links = RunLinks(None, None) if skipped else RunLinks.for_project(root)
    registry = None
    if "register" in summary["stages"]:
        registry = registry_now(root)
        if registry is None:
            logger.warning("Could not read the registry's champion for the report")
    markdown = render_report(root, summary, candidates, links, registry)
    create_markdown_artifact(
        key=REPORT_KEY,
        markdown=markdown,
        description=f"agegender training: {summary['status']} (data {summary['data_version']})",
    )
    if candidates:
        create_table_artifact(
            key=CANDIDATES_KEY,
            table=[{**c, "mlflow_run": links.url(c.get("run_id")) or c.get("run_id")} for c in candidates],
            description="Training candidates (the lowest validation age MAE wins)",
        )
    logger.info("Report artifact %r published", REPORT_KEY)
    return markdown


# ---------------------------------------------------------------- the flow


@flow(name=FLOW_NAME, description="Fetch data, run the DVC pipeline (validate ... register), report.")
def training_flow(project_root: str = ".", force: bool = False):
    """Fetch the data, decide whether to retrain, run every dvc.yaml stage in order, report.

    Returns the run summary; the final state is named "Skipped" when the data version is
    the champion's (and force is False).
    """
    logger = get_run_logger()
    root = str(resolve_root(project_root))
    fetched = fetch_data(root)
    decision = check_retrain(root, force)
    summary: dict[str, Any] = {
        "project_root": root,
        "data_version": decision["data_version"],
        "fetched": fetched["how"],
        "force": force,
        "retrain": decision["retrain"],
        "reason": decision["reason"],
        "champion": decision["champion"],
        "stages": [],
        "ran": [],
        "cached": [],
        "unchanged": [],
        "gate": None,
    }
    if not decision["retrain"]:
        summary["status"] = "skipped"
        publish_report(root, summary)
        return Completed(name="Skipped", message=f"skipped: {decision['reason']}", data=summary)

    stages = pipeline_stages(Path(root))
    summary["stages"] = stages
    logger.info("Stages in dvc.yaml, in order: %s", ", ".join(stages))
    gate_read = False
    for stage in stages:
        result = stage_task(stage)(root, stage)
        for key in ("ran", "cached", "unchanged"):
            summary[key] += [name for name in result[key] if name not in summary[key]]
        if stage == "evaluate":  # evaluate -> gate -> register
            summary["gate"], gate_read = read_gate(root), True
    if not gate_read:
        summary["gate"] = read_gate(root)

    ran = summary["ran"] + summary["cached"]
    # `dvc repro <stage>` reports its upstream stages as unchanged once earlier tasks ran them.
    summary["unchanged"] = [name for name in summary["unchanged"] if name not in ran]
    summary["status"] = "trained" if "train" in ran else "updated" if ran else "up to date"
    publish_report(root, summary)
    message = f"{summary['status']}: DVC ran {', '.join(ran) or 'no stage (all up to date)'}"
    if summary["gate"] is not None:
        message += f"; gate: {describe_decision(summary['gate'])}"
    return Completed(message=message, data=summary)


# ---------------------------------------------------------------- the report


def registry_now(root: Path) -> dict | None:
    """The registered model's champion after this run, for the report; None if unreadable."""
    from agegender.config import load_params
    from agegender.tracking import configure_tracking

    try:
        model_name = load_params(root / "params.yaml").registry.model_name
        configure_tracking(root, os.environ.get("MLFLOW_TRACKING_URI"))
        return {"model_name": model_name, "champion": champion_info(model_name)}
    except Exception:  # noqa: BLE001 - the report must not fail the run
        return None


def read_candidates(root: Path) -> list[dict]:
    for path in CANDIDATE_FILES:
        if (root / path).exists():
            return json.loads((root / path).read_text())
    return []


class RunLinks:
    """Links to MLflow runs in the tracking UI; only run ids when the store is a local file."""

    def __init__(self, ui: str | None, experiment_id: str | None) -> None:
        self.ui, self.experiment_id = ui, experiment_id

    @classmethod
    def for_project(cls, root: Path) -> RunLinks:
        from agegender.tracking import EXPERIMENT, resolve_tracking_uri

        uri = resolve_tracking_uri(root, os.environ.get("MLFLOW_TRACKING_URI"))
        if not uri.startswith(("http://", "https://")):
            return cls(None, None)
        try:
            import mlflow

            experiment = mlflow.MlflowClient(uri).get_experiment_by_name(EXPERIMENT)
        except Exception:  # noqa: BLE001 - links are a convenience; ids are still shown
            return cls(None, None)
        return cls(uri.rstrip("/"), experiment.experiment_id if experiment else None)

    def url(self, run_id: str | None) -> str | None:
        if not (self.ui and self.experiment_id and run_id):
            return None
        return f"{self.ui}/#/experiments/{self.experiment_id}/runs/{run_id}"

    def cell(self, run_id: str | None) -> str:
        if not run_id:
            return ""
        url = self.url(run_id)
        return f"[`{run_id}`]({url})" if url else f"`{run_id}`"


def describe_decision(gate: dict) -> str:
    """One line: what the gate decided (agegender.evaluation's gate.json, or any mapping)."""
    if "full_pass" in gate or "absolute_pass" in gate:
        if gate.get("full_pass"):
            verdict = "promote to champion"
        elif gate.get("absolute_pass"):
            verdict = "challenger only (passed the absolute gates, not the champion comparison)"
        else:
            verdict = "rejected (registered without an alias)"
        return f"{verdict}; {gate['summary']}" if gate.get("summary") else verdict
    scalars = [f"{k}={v}" for k, v in gate.items() if not isinstance(v, dict | list)]
    return ", ".join(scalars) or "see gate.json"


def fmt(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict | list):
        return f"`{json.dumps(value, sort_keys=True)}`"
    return str(value).replace("|", "\\|").replace("\n", " ")


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *("| " + " | ".join(row) + " |" for row in rows),
    ]


def read_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.exists() else None


def stale_note(summary: dict, stage: str, path: Path) -> list[str]:
    """A line saying the file is from an earlier run, when DVC did not run its stage this time."""
    if stage in summary["ran"] + summary["cached"]:
        return []
    return [f"_From an earlier run: DVC did not re-run `{stage}` ({path} is up to date)._", ""]


def render_report(root: Path, summary: dict, candidates: list[dict], links: RunLinks, registry: dict | None) -> str:
    best = summary.get("champion") or {}
    lines = [f"# agegender training: {summary['status']}", ""]
    rows = [
        ["project", f"`{summary['project_root']}`"],
        ["data version (data.dvc)", f"`{summary['data_version']}` ({summary['fetched']})"],
        [
            "champion before this run",
            f"version {best['version']}, data `{best.get('data_version')}`"
            if best
            else "not checked (forced)"
            if summary["force"]
            else "none",
        ],
        ["decision", ("retrain: " if summary["retrain"] else "skip: ") + fmt(summary["reason"])],
    ]
    if summary["status"] != "skipped":
        rows += [
            ["DVC ran", ", ".join(summary["ran"]) or "nothing"],
            ["restored from DVC's run cache", ", ".join(summary["cached"]) or "nothing"],
            ["unchanged (skipped by DVC)", ", ".join(summary["unchanged"]) or "nothing"],
        ]
    lines += table(["", ""], rows) + [""]
    if summary["status"] == "skipped":
        lines += [
            "Nothing ran: the data has not changed since the champion was trained. "
            "Run with `force=True` to retrain anyway.",
            "",
        ]
        return "\n".join(lines)

    if candidates:
        skip = {"name", "run_id", "parent_run_id", "winner"}
        metrics = [k for k in candidates[0] if k not in skip]
        lines += ["## Candidates", ""]
        lines += stale_note(summary, "train", MODEL_DIR / "candidates.json")
        lines += ["The lowest validation age MAE wins (the test split is not used to choose).", ""]
        lines += table(
            ["candidate", "winner", *metrics, "MLflow run"],
            [
                [
                    fmt(c.get("name")),
                    "**yes**" if c.get("winner") else "",
                    *(fmt(c.get(m, "")) for m in metrics),
                    links.cell(c.get("run_id")),
                ]
                for c in candidates
            ],
        )
        if not links.ui:
            lines += [
                "",
                "Run ids in the local store; browse them with "
                f"`mlflow ui --backend-store-uri sqlite:///{root / 'mlflow.db'}`.",
            ]
        lines.append("")

    gate = summary.get("gate")
    lines += ["## Gate", ""]
    if gate is None:
        lines += ["No gate decision: the pipeline has no evaluate stage (no gate.json).", ""]
    else:
        lines += stale_note(summary, "evaluate", GATE_FILE)
        lines += [f"**Decision: {fmt(describe_decision(gate))}**", ""]
        lines += render_gate(gate) + [""]
        test_metrics = read_json(root / GATE_FILE.parent / "metrics.json") or {}
        scalars = [[k, fmt(v)] for k, v in test_metrics.items() if isinstance(v, int | float)]
        if scalars:
            lines += ["Test split metrics (artifacts/eval/metrics.json):", ""]
            lines += table(["metric", "value"], scalars) + [""]

    registration = read_json(root / REGISTRATION_FILE)
    if registration is not None or registry is not None:
        lines += ["## Registry", ""]
    if registration is not None:
        lines += stale_note(summary, "register", REGISTRATION_FILE)
        lines += [fmt(registration.get("summary", "")), ""]
    if registry is not None:
        now = registry.get("champion")
        lines += table(
            ["model", "champion now", "its data version", "its MLflow run"],
            [
                [
                    f"`{registry['model_name']}`",
                    f"version {now['version']}" if now else "none",
                    f"`{now['data_version']}`" if now else "",
                    links.cell(now["run_id"]) if now else "",
                ]
            ],
        )
        lines.append("")
    return "\n".join(lines)


def render_gate(gate: dict) -> list[str]:
    """gate.json as tables: its checks, then every other entry."""
    lines: list[str] = []
    checks = gate.get("checks")
    if isinstance(checks, list) and checks and all(isinstance(c, dict) for c in checks):
        header = list(dict.fromkeys(k for c in checks for k in c))
        lines += table(
            header,
            [
                [("pass" if c.get(k) else "**FAIL**") if k == "passed" else fmt(c.get(k, "")) for k in header]
                for c in checks
            ],
        )
        lines.append("")
    rest = [[fmt(k), fmt(v)] for k, v in gate.items() if k != "checks"]
    if rest:
        lines += table(["", ""], rest)
    return lines


# ---------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m flows.training",
        description="Run the training flow once: fetch data, run the dvc.yaml stages (DVC skips "
        "what did not change), report. Without PREFECT_API_URL Prefect starts a temporary server.",
    )
    parser.add_argument("--project-root", default=".", help="the project (git + DVC repo); default: here")
    parser.add_argument(
        "--only-if-data-changed",
        action="store_true",
        help="what a scheduled run does: skip when data.dvc's version is the registry champion's",
    )
    args = parser.parse_args(argv)
    state = training_flow(
        project_root=str(resolve_root(args.project_root)),
        force=not args.only_if_data_changed,
        return_state=True,
    )
    print(state.message, file=sys.stderr)
    return 0 if state.is_completed() else 1


if __name__ == "__main__":
    sys.exit(main())
