"""The CLI's contract: exit codes and messages for bad input (no kernel needed)."""

import json

from click.testing import CliRunner

from kdsr.cli import main
from kdsr.errors import EXIT_INVALID_INTENT


def test_validate_example(example_path):
    result = CliRunner().invoke(main, ["validate", str(example_path)])
    assert result.exit_code == 0, result.output
    assert "valid (4 services" in result.output


def test_invalid_intent_lists_every_problem(tmp_path, example_path):
    doc = json.loads(example_path.read_text())
    doc["services"]["web"]["ports"] = [70000]
    doc["pools"]["web6"]["servers"] = []
    doc["load_balancers"]["lb1"]["interface"] = "a-very-long-interface-name"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(doc))
    for command in (["validate"], ["plan"], ["apply"], ["apply", "--dry-run"]):
        result = CliRunner().invoke(main, command + [str(bad)])
        assert result.exit_code == EXIT_INVALID_INTENT, (command, result.output)
        errors = [line for line in result.output.splitlines() if line.startswith("error:")]
        assert len(errors) >= 3, result.output
        assert all("bad.json: /" in line for line in errors)
        assert "nothing was changed" in result.output


def test_malformed_json_points_at_line(tmp_path):
    bad = tmp_path / "broken.json"
    bad.write_text('{"version": 1,\n  "services": {,}\n}')
    result = CliRunner().invoke(main, ["validate", str(bad)])
    assert result.exit_code == EXIT_INVALID_INTENT
    assert "broken.json" in result.output and "line 2" in result.output


def test_every_command_has_help_with_example():
    for command in ("validate", "plan", "apply", "show", "destroy"):
        result = CliRunner().invoke(main, [command, "--help"])
        assert result.exit_code == 0
        assert "Example: kdsr" in result.output


def test_command_line_mistake_exits_with_usage_code_not_changes_pending():
    import subprocess
    import sys

    from kdsr.errors import EXIT_USAGE

    result = subprocess.run([sys.executable, "-m", "kdsr", "plan", "--bogus"], capture_output=True, text=True)
    assert result.returncode == EXIT_USAGE, result.stderr
    assert "No such option" in result.stderr
