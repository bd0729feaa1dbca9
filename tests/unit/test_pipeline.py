"""The flow's domain logic in-process: the retrain decision, the run report, stage time limits."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import psutil
import pytest

from agegender.pipeline import RetrainDecision, RunReport, decide_retrain, markdown_table
from agegender.registry import ChampionInfo as Champion

DATA = "a" * 32


@pytest.mark.parametrize(
    ("champion", "force", "retrain", "reason"),
    [
        (None, False, True, "no champion of model 'agegender'"),
        (Champion(3, "r1", None), False, True, "version 3) has no data_version tag"),
        (Champion(3, "r1", DATA), False, False, f"data version {DATA} is the champion's (version 3)"),
        (Champion(3, "r1", "b" * 32), False, True, f"has {'b' * 32}, data.dvc has {DATA}"),
        (Champion(3, "r1", DATA), True, True, "forced"),
    ],
)
def test_decide_retrain(champion, force, retrain, reason):
    decision = decide_retrain(DATA, champion, force=force, model_name="agegender")
    assert decision.retrain is retrain and reason in decision.reason
    assert decision.data_version == DATA and decision.champion == champion


def test_report_of_a_skipped_run_says_why():
    champion = Champion(2, "run2", DATA)
    report = RunReport(decision=decide_retrain(DATA, champion, force=False, model_name="m"), fetched="dvc pull")
    assert report.status == "skipped"
    assert report.message() == f"skipped: data version {DATA} is the champion's (version 2)"
    assert report.markdown().startswith("# agegender training: skipped")
    assert "## Candidates" not in report.markdown()


def test_report_of_a_training_run_has_candidates_gate_and_registry():
    gate = {"summary": "promote to champion", "checks": [{"name": "max_age_mae", "value": 9.1, "passed": True}]}
    report = RunReport(
        decision=RetrainDecision(True, "forced", DATA, None),
        fetched="ingest demo",
        ran=["validate", "train"],
        up_to_date=["preprocess"],
        candidates=[{"name": "wide|r", "run_id": "f" * 32, "winner": True, "val_age_mae": 7.5}],
        gate=gate,
        registration={"summary": "registered version 4; champion"},
        champion_after=Champion(4, "f" * 32, DATA),
    )
    text = report.markdown()
    assert (
        report.status == "trained" and report.message() == "trained: DVC ran validate, train; gate: promote to champion"
    )
    for part in ("## Candidates", "f" * 32, "wide\\|r", "## Gate", "**Decision: promote to champion**", "max_age_mae"):
        assert part in text
    assert "## Registry" in text and f"champion now: version 4 (data {DATA}" in text
    assert report.as_dict()["status"] == "trained"


def test_markdown_table_takes_the_union_of_columns():
    assert markdown_table([{"a": 1}, {"b": "x"}]) == ["| a | b |", "|---|---|", "| 1 |  |", "|  | x |"]


def test_run_logged_streams_lines_and_reports_the_exit_code(tmp_path: Path):
    from agegender.flow import run_logged

    lines: list[str] = []
    run_logged(
        [sys.executable, "-c", "print('one'); print(); print('two')"], cwd=tmp_path, seconds=60, log=lines.append
    )
    assert lines == ["one", "two"]
    with pytest.raises(RuntimeError, match="exited with 3"):
        run_logged([sys.executable, "-c", "raise SystemExit(3)"], cwd=tmp_path, seconds=60, log=lines.append)


def test_a_stage_past_its_time_limit_is_stopped_with_its_children(tmp_path: Path):
    from agegender.flow import run_logged

    # A parent that starts a child and waits, as dvc does with a stage command.
    script = "import subprocess, sys; print(subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']).pid, flush=True); time.sleep(60)"
    pids: list[str] = []
    started = time.monotonic()
    with pytest.raises(TimeoutError, match="limit of 2 s"):
        run_logged([sys.executable, "-c", "import time; " + script], cwd=tmp_path, seconds=2, log=pids.append)
    assert time.monotonic() - started < 30
    time.sleep(0.5)
    child = int(pids[0])
    assert not psutil.pid_exists(child) or psutil.Process(child).status() == psutil.STATUS_ZOMBIE
