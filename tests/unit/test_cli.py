"""Command-line errors, in-process."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from agegender.cli import app
from tests.conftest import printed_by_new_python


def test_an_error_is_printed_as_written_even_with_brackets_in_it():
    # Rich would read "[odd]" as markup and drop it (or fail on "[/...]"): errors are printed escaped.
    result = CliRunner().invoke(app, ["evaluate", "--params", "[odd]/params.yaml"])
    assert result.exit_code == 1
    assert "error: [odd]/params.yaml: file not found" in result.stderr, result.stderr


@pytest.mark.parametrize(("setting", "seconds"), [(None, 120), ("45", 45)])
def test_prefects_temporary_server_gets_time_to_start_unless_the_user_says(setting, seconds):
    code = (
        "import agegender\nfrom prefect.settings import get_current_settings\n"
        "print(get_current_settings().server.ephemeral.startup_timeout_seconds)"
    )
    variable = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"
    assert printed_by_new_python(code, variable=variable, setting=setting) == str(seconds)
