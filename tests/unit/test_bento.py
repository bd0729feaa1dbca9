"""The Bento ships uv.lock's versions: service/requirements.txt is the lock, exported."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import PROJECT

EXPORT = "uv export --frozen --no-dev --no-hashes --no-emit-project --no-annotate --format requirements.txt"


def pins(text: str) -> list[str]:
    return [line for line in text.splitlines() if line and not line.startswith("#")]


def test_the_bentos_requirements_are_the_lock_file_exported():
    exported = subprocess.run(
        [sys.executable, "-m", *EXPORT.split()], cwd=PROJECT, capture_output=True, text=True, check=True
    ).stdout
    written = (PROJECT / "service" / "requirements.txt").read_text()
    assert pins(written) == pins(exported), (
        f"service/requirements.txt is stale: run `{EXPORT} -o service/requirements.txt`"
    )
    assert any(line.startswith("tensorflow-cpu==") for line in pins(written))
