"""Command-line errors, in-process."""

from __future__ import annotations

from typer.testing import CliRunner

from agegender.cli import app


def test_an_error_is_printed_as_written_even_with_brackets_in_it():
    # Rich would read "[odd]" as markup and drop it (or fail on "[/...]"): errors are printed escaped.
    result = CliRunner().invoke(app, ["evaluate", "--params", "[odd]/params.yaml"])
    assert result.exit_code == 1
    assert "error: [odd]/params.yaml: file not found" in result.stderr, result.stderr
