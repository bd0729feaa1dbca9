"""files: a staged folder replaces its target only when complete; JSON files are swapped whole."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from agegender.files import atomic_dir, file_md5, write_json


class Crash(Exception):
    """Stands in for any failure while a stage writes its outputs."""


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize("existing", [False, True], ids=["new", "replaces"])
def test_atomic_dir_puts_the_complete_folder_in_place(tmp_path, existing):
    target = tmp_path / "artifacts" / "out"
    if existing:
        target.mkdir(parents=True)
        (target / "stale.txt").write_text("old")
    with atomic_dir(target) as staging:
        assert staging.parent == target.parent and not any(staging.iterdir())
        (staging / "a.txt").write_text("new")
        assert not (target / "a.txt").exists()  # nothing shows before the end
    assert sorted(p.name for p in target.iterdir()) == ["a.txt"]
    assert leftovers(target.parent) == []


@pytest.mark.parametrize("existing", [False, True], ids=["new", "keeps-old"])
def test_atomic_dir_leaves_nothing_on_failure(tmp_path, existing):
    target = tmp_path / "out"
    if existing:
        target.mkdir()
        (target / "old.txt").write_text("old")
    with pytest.raises(Crash), atomic_dir(target) as staging:
        (staging / "half.txt").write_text("half")
        raise Crash
    assert leftovers(tmp_path) == []
    if existing:
        assert [p.name for p in target.iterdir()] == ["old.txt"]
    else:
        assert not target.exists()


def test_write_json_replaces_the_whole_file(tmp_path):
    path = tmp_path / "registry" / "registration.json"
    write_json(path, {"version": 1})
    write_json(path, {"version": 2, "aliases": ["champion"]})
    assert json.loads(path.read_text()) == {"version": 2, "aliases": ["champion"]}
    assert path.read_text().endswith("}\n") and leftovers(path.parent) == []


def test_write_json_keeps_the_old_file_when_the_data_cannot_be_written(tmp_path):
    path = tmp_path / "gate.json"
    write_json(path, {"ok": True})
    with pytest.raises(TypeError):
        write_json(path, {"not json": object()})
    assert json.loads(path.read_text()) == {"ok": True} and leftovers(tmp_path) == []


@pytest.mark.parametrize("data", [b"", b"face", bytes(range(256)) * 1000])
def test_file_md5_is_the_md5_of_the_bytes(tmp_path, data):
    path = tmp_path / "image.jpg"
    path.write_bytes(data)
    assert file_md5(path) == hashlib.md5(data).hexdigest()


def test_atomic_dir_removes_what_a_killed_run_left(tmp_path):
    stale = tmp_path / ".model-abc123"
    (stale / "half").mkdir(parents=True)
    (tmp_path / ".modelling-keep").mkdir()
    with atomic_dir(tmp_path / "model") as staging:
        (staging / "model.keras").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".modelling-keep", "model"]
