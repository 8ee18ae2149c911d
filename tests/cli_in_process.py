"""The real kdsr CLI, run in process (click's runner), for tests.

A module of its own, not conftest: ``pytest tests netns-lab`` imports both
directories' conftest files as one module name, so names imported from
``conftest`` resolve to whichever came first.
"""

from __future__ import annotations

from click.testing import CliRunner

from kdsr import cli


def run_kdsr(tmp_path, *args: str):
    """``kdsr --state-dir <tmp_path>/state <args>``; returns click's Result."""
    return CliRunner().invoke(cli.main, ["--state-dir", str(tmp_path / "state"), *args])
