"""Command-line errors, in-process."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from agegender.cli import app


def test_an_error_is_printed_as_written_even_with_brackets_in_it():
    # Rich would read "[odd]" as markup and drop it (or fail on "[/...]"): errors are printed escaped.
    result = CliRunner().invoke(app, ["evaluate", "--params", "[odd]/params.yaml"])
    assert result.exit_code == 1
    assert "error: [odd]/params.yaml: file not found" in result.stderr, result.stderr


@pytest.mark.parametrize(("setting", "seconds"), [(None, 120), ("45", 45)])
def test_prefects_temporary_server_gets_time_to_start_unless_the_user_says(setting, seconds):
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"}
    if setting is not None:
        env["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = setting
    code = (
        "import agegender\nfrom prefect.settings import get_current_settings\n"
        "print(get_current_settings().server.ephemeral.startup_timeout_seconds)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == str(seconds)
