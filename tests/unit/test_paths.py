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


STAGE_MODULES = {
    "validate": "validation",
    "preprocess": "preprocess",
    "train": "training",
    "evaluate": "evaluation",
    "register": "registry",
}


def imported_modules(module: str) -> set[str]:
    """Every agegender module `module` imports, at the top or inside functions, transitively."""
    import ast

    seen, todo = set(), [module]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        tree = ast.parse(module_file(name).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("agegender"):
                parts = [node.module] if node.module != "agegender" else [f"agegender.{a.name}" for a in node.names]
                todo += [p.removeprefix("agegender.") for p in parts]
    return seen


def module_file(name: str) -> Path:
    base = PROJECT / "src" / "agegender" / Path(*name.split("."))
    return base / "__init__.py" if base.is_dir() else base.with_suffix(".py")


@pytest.mark.parametrize("stage", list(STAGES))
def test_stage_deps_name_every_module_the_stage_imports(stage):
    declared = {str(p) for p in names(STAGES[stage]["deps"])}
    needed = {str(module_file(m).relative_to(PROJECT)) for m in imported_modules(STAGE_MODULES[stage])}
    assert sorted(needed - declared) == [], f"add these to the deps of stage {stage!r} in dvc.yaml"
