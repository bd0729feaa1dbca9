"""Prefect flows that orchestrate the DVC pipeline.

- `python -m flows.training`: run the training flow once (what `make run` runs).
- `python -m flows.retrain`: serve it as the `retrain` deployment on the cron schedule
  in params.yaml (`schedule.cron`, `schedule.timezone`), against a real Prefect server.
"""
