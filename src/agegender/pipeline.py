"""The pipeline as a whole, for the flow: its stages, whether to retrain, what a run reports.

The stages themselves are the `agegender` commands in dvc.yaml; this module only reads
what they wrote (candidates.json, gate.json, registration.json) to report a run.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from agegender import paths
from agegender.registry import ChampionInfo


@dataclass(frozen=True)
class RetrainDecision:
    retrain: bool
    reason: str
    data_version: str
    champion: ChampionInfo | None


def pipeline_stages(root: Path) -> list[str]:
    """The stage names of dvc.yaml, in the order they are defined (and run)."""
    return list(yaml.safe_load((root / "dvc.yaml").read_text())["stages"])


def stage_is_stale(root: Path, stage: str) -> bool:
    """True when DVC would run the stage: a dependency, parameter or output changed since dvc.lock."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        return bool(repo.status(targets=[stage]))


def decide_retrain(
    data_version: str, champion: ChampionInfo | None, *, force: bool, model_name: str
) -> RetrainDecision:
    """Retrain when forced, when there is no champion, or when the data is not the champion's."""

    def decision(retrain: bool, reason: str) -> RetrainDecision:
        return RetrainDecision(retrain=retrain, reason=reason, data_version=data_version, champion=champion)

    if force:
        return decision(True, "forced: the data version is not checked")
    if champion is None:
        return decision(True, f"no champion of model {model_name!r} in the registry")
    if not champion.data_version:
        return decision(True, f"the champion (version {champion.version}) has no data_version tag")
    if champion.data_version == data_version:
        return decision(False, f"data version {data_version} is the champion's (version {champion.version})")
    return decision(
        True,
        f"data changed: the champion (version {champion.version}) has {champion.data_version}, "
        f"data.dvc has {data_version}",
    )


@dataclass
class RunReport:
    """What one flow run did, built from the stage outputs it left behind."""

    decision: RetrainDecision
    fetched: str
    ran: list[str] = field(default_factory=list)
    up_to_date: list[str] = field(default_factory=list)
    candidates: list[dict] = field(default_factory=list)
    gate: dict | None = None
    registration: dict | None = None
    champion_after: ChampionInfo | None = None

    @property
    def status(self) -> str:
        if not self.decision.retrain:
            return "skipped"
        return "trained" if "train" in self.ran else "updated" if self.ran else "up to date"

    def message(self) -> str:
        if not self.decision.retrain:
            return f"skipped: {self.decision.reason}"
        text = f"{self.status}: DVC ran {', '.join(self.ran) or 'no stage (all up to date)'}"
        return text + (f"; gate: {self.gate['summary']}" if self.gate else "")

    def as_dict(self) -> dict:
        return {**asdict(self), "status": self.status}

    def markdown(self) -> str:
        lines = [f"# agegender training: {self.status}", "", self.message(), ""]
        lines += markdown_table(
            [
                {"": "data version (data.dvc)", " ": f"`{self.decision.data_version}` ({self.fetched})"},
                {"": "champion before", " ": describe_champion(self.decision.champion)},
                {"": "decision", " ": ("retrain: " if self.decision.retrain else "skip: ") + self.decision.reason},
                {"": "DVC ran", " ": ", ".join(self.ran) or "nothing"},
                {"": "up to date (skipped by DVC)", " ": ", ".join(self.up_to_date) or "nothing"},
            ]
        )
        if self.candidates:
            lines += ["", "## Candidates", "", "The lowest validation age MAE wins.", ""]
            lines += markdown_table(self.candidates)
        if self.gate:
            lines += ["", "## Gate", "", f"**Decision: {self.gate['summary']}**", ""]
            lines += markdown_table(self.gate["checks"])
        if self.registration or self.champion_after:
            lines += ["", "## Registry", ""]
            lines += [self.registration["summary"], ""] if self.registration else []
            lines += [f"champion now: {describe_champion(self.champion_after)}"]
        return "\n".join(lines) + "\n"


def collect_outputs(root: Path, report: RunReport) -> None:
    """Fill the report from the stage outputs in the project (they are up to date after a run)."""
    report.candidates = read_json(root / paths.MODEL / paths.CANDIDATES) or []
    report.gate = read_json(root / paths.EVAL / paths.GATE)
    report.registration = read_json(root / paths.REGISTRY / paths.REGISTRATION)


def describe_champion(champion: ChampionInfo | None) -> str:
    if champion is None:
        return "none"
    return f"version {champion.version} (data {champion.data_version}, run {champion.run_id})"


def markdown_table(rows: list[dict]) -> list[str]:
    header = list(dict.fromkeys(key for row in rows for key in row))

    def cell(value) -> str:
        return str(value).replace("|", "\\|").replace("\n", " ")

    return [
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *("| " + " | ".join(cell(row.get(key, "")) for key in header) + " |" for row in rows),
    ]


def read_json(path: Path):
    return json.loads(path.read_text()) if path.exists() else None
