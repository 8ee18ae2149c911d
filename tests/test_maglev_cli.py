"""`kdsr maglev`: per-server shares and what a change would move (intent only)."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from kdsr import maglev
from kdsr.cli import main
from kdsr.compile.selectors import selectors_for
from kdsr.errors import EXIT_USAGE
from kdsr.intent import load_intent


def run(*args: str):
    return CliRunner().invoke(main, ["maglev", *args])


def test_text_report(example_path):
    result = run(str(example_path), "--service", "web")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[1].startswith("table pool-web-v4-60e94c: 4093 slots (default")
    rows = [line.split() for line in lines if line.startswith("  10.10.0.")]
    assert [(r[0], r[1], int(r[3])) for r in rows] == [
        ("10.10.0.11", "s1", 1365),
        ("10.10.0.12", "s2", 1364),
        ("10.10.0.13", "s3", 1364),
    ]
    assert "max/mean 1.0005, min/mean 0.9998" in result.stdout


def test_json_report_matches_the_table_compile_builds(example_path):
    result = run(str(example_path), "--service", "dns", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    sel = next(s for s in selectors_for(load_intent(example_path)) if any(x.name == "dns" for x in s.services))
    counts = maglev.shares(sel.table())
    assert {row["server"]: row["slots"] for row in data["servers"]} == counts
    assert data["selector"] == sel.name and data["table_size"] == sel.table_size
    assert data["max_over_mean"] == pytest.approx(max(counts.values()) / (sel.table_size / 3))
    assert data["change"] is None


def test_without_a_server_of_a_fixed_size_table(tmp_path, example_path):
    doc = json.loads(example_path.read_text())
    doc["services"]["web"]["hashing"]["table_size"] = 4093
    path = tmp_path / "fixed.json"
    path.write_text(json.dumps(doc))
    data = json.loads(run(str(path), "--service", "web", "--without", "s3", "--json").stdout)
    change = data["change"]
    gone = next(r for r in data["servers"] if r["node"] == "s3")
    assert not change["table_size_changed"]
    assert change["unavoidable"] == pytest.approx(gone["share"])
    assert change["moved_slots"] == pytest.approx(change["moved"], abs=1e-3)
    assert change["unavoidable"] <= change["moved"] <= change["unavoidable"] + 0.01


def test_with_a_server_within_a_rung_keeps_the_table_size(example_path):
    data = json.loads(run(str(example_path), "--service", "web", "--with", "10.10.0.14", "--json").stdout)
    change = data["change"]
    assert not change["table_size_changed"] and change["table_size"] == 4093
    # The new server takes its quarter; Maglev's own reshuffle adds under a point.
    assert change["moved"] == pytest.approx(0.25, abs=0.01)


def test_with_a_server_says_when_the_table_size_changes(tmp_path, example_path):
    doc = json.loads(example_path.read_text())
    doc["pools"]["web"]["servers"].append({"address": "10.10.0.14"})
    path = tmp_path / "four.json"
    path.write_text(json.dumps(doc))
    result = run(str(path), "--service", "web", "--with", "10.10.0.15")
    assert result.exit_code == 0, result.output
    assert "4093 -> 8191" in result.stdout and "every flow is re-slotted" in result.stdout
    data = json.loads(run(str(path), "--service", "web", "--with", "10.10.0.15", "--json").stdout)
    assert data["change"]["table_size_changed"] and data["change"]["moved"] > 0.5


@pytest.mark.parametrize(
    ("args", "text"),
    [
        (["--service", "nope"], "no service 'nope'"),
        (["--service", "web", "--without", "s9"], "not a member of pool web"),
        (["--service", "web", "--with", "fd00::1"], "holds IPv4 servers"),
        (["--service", "web", "--with", "10.10.0.11"], "already a member"),
    ],
)
def test_mistakes_are_usage_errors(example_path, args, text):
    result = run(str(example_path), *args)
    assert result.exit_code == EXIT_USAGE, result.output
    assert text in result.output  # stderr too (click 8.1 mixes it in; 8.2 keeps both)


def test_help_has_an_example():
    result = CliRunner().invoke(main, ["maglev", "--help"])
    assert result.exit_code == 0 and "Example: kdsr maglev" in result.output
