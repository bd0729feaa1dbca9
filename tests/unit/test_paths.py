"""dvc.yaml names the paths of agegender.paths: they cannot drift apart."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from agegender import paths

PROJECT = Path(__file__).resolve().parents[2]
DVC = yaml.safe_load((PROJECT / "dvc.yaml").read_text())
STAGES = DVC["stages"]


def names(entries: list) -> list[Path]:
    """Paths of a dvc.yaml list whose entries are strings or {path: options}."""
    return [Path(next(iter(e)) if isinstance(e, dict) else e) for e in entries]


def test_dvc_yaml_has_the_stages_paths_knows():
    assert list(STAGES) == list(paths.stage_outputs())


@pytest.mark.parametrize("stage", list(STAGES))
def test_stage_outputs_match(stage):
    spec = STAGES[stage]
    declared = names(spec.get("outs", []) + spec.get("metrics", []) + spec.get("plots", []))
    assert sorted(declared) == sorted(paths.stage_outputs()[stage])


@pytest.mark.parametrize("stage", list(STAGES))
def test_stage_inputs_are_data_code_or_earlier_outputs(stage):
    order = list(STAGES)
    earlier = {p for name in order[: order.index(stage)] for p in paths.stage_outputs()[name]}
    for dep in names(STAGES[stage]["deps"]):
        assert dep == paths.DATA or dep.parts[0] == "src" or dep in earlier, dep


def plot_files(entry) -> list[Path]:
    """The files a top-level dvc.yaml plot reads: a path, or {title: {y: {file: columns}}}."""
    if isinstance(entry, str):
        return [Path(entry)]
    (spec,) = entry.values()
    return [Path(file) for file in spec["y"]]


@pytest.mark.parametrize("entry", DVC["plots"], ids=str)
def test_top_level_plots_read_stage_outputs(entry):
    outputs = [out for stage in paths.stage_outputs().values() for out in stage]
    for file in plot_files(entry):
        assert any(file == out or out in file.parents for out in outputs), file
