"""Scheduled retraining: serve the training flow as a deployment on params.yaml's cron schedule.

    prefect server start                                          # terminal 1 (keep it running)
    prefect config set PREFECT_API_URL=http://127.0.0.1:4200/api  # once
    python -m flows.retrain                                       # terminal 2, in the project

This registers the deployment `agegender-training/retrain` with the schedule
`schedule.cron` in `schedule.timezone` and keeps a runner polling for its runs (stop it
with Ctrl-C; its schedule is paused until it is served again). A scheduled run has
force=False: it retrains only when the dataset version in data.dvc differs from the one
the registry's champion was trained on. Trigger a run by hand with
`prefect deployment run agegender-training/retrain` (add `--param force=true` to retrain
on unchanged data).

Schedules do not fire on Prefect's temporary (ephemeral) server, so this refuses to start
without PREFECT_API_URL.
"""

from __future__ import annotations

import argparse
import sys
import urllib.request
from pathlib import Path

DEPLOYMENT = "retrain"

HOW_TO_START = """\
error: PREFECT_API_URL is not set.
Scheduled runs need a running Prefect server (they do not fire on Prefect's temporary server):

    prefect server start
    prefect config set PREFECT_API_URL=http://127.0.0.1:4200/api

then run `python -m flows.retrain` again."""


def reachable(api_url: str) -> str | None:
    """None if the Prefect API answers its health check, else what went wrong."""
    try:
        with urllib.request.urlopen(f"{api_url.rstrip('/')}/health", timeout=10) as response:
            return None if response.status == 200 else f"HTTP {response.status}"
    except OSError as err:
        return str(err)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m flows.retrain",
        description="Serve the training flow as a deployment with the cron schedule in params.yaml "
        "(schedule.cron, schedule.timezone), against the Prefect server at PREFECT_API_URL.",
    )
    parser.add_argument("--project-root", default=".", help="the project (git + DVC repo); default: here")
    parser.add_argument("--name", default=DEPLOYMENT, help=f"deployment name (default: {DEPLOYMENT})")
    args = parser.parse_args(argv)

    from prefect.settings import PREFECT_API_URL

    from agegender.config import ConfigError, load_params

    api_url = PREFECT_API_URL.value()
    if not api_url:
        print(HOW_TO_START, file=sys.stderr)
        return 2
    problem = reachable(api_url)
    if problem:
        print(
            f"error: the Prefect API at PREFECT_API_URL={api_url} does not answer ({problem}).\n"
            "Start it with `prefect server start` (or fix PREFECT_API_URL).",
            file=sys.stderr,
        )
        return 2

    root = Path(args.project_root).expanduser().resolve()
    try:
        params = load_params(root / "params.yaml")
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    cron, timezone = params.schedule.cron, params.schedule.timezone

    from prefect.schedules import Cron

    from flows.training import FLOW_NAME, training_flow

    print(
        f"Serving deployment '{FLOW_NAME}/{args.name}' against the Prefect API at {api_url}",
        flush=True,
    )
    print(
        f"Schedule: cron '{cron}' ({timezone}) from {root / 'params.yaml'}; a scheduled run "
        "retrains only when data.dvc's data version differs from the champion's.",
        flush=True,
    )
    training_flow.serve(
        name=args.name,
        schedules=[Cron(cron, timezone=timezone)],
        parameters={"project_root": str(root), "force": False},
        description="Retrain when the data version differs from the registry champion's.",
        tags=["agegender", "retrain"],
        limit=1,  # one pipeline at a time in this project
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
