"""`kdsr run`'s log lines: levels, `--log-format json`, journald priority prefixes."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kdsr.health import logs
from kdsr.health.daemon import Runner, log_line
from kdsr.health.probes import Result
from kdsr.kernel.fake import FakeKernel
from kdsr.kernel.state import StateStore

ROOT = Path(__file__).resolve().parents[1]


def test_a_json_line_is_one_object_with_ts_level_event_first_and_no_none_fields():
    line = logs.json_line(
        "health", {"node": "lb1", "pool": "web", "server": "10.10.0.12", "state": "down", "error": None, "n": 3}
    )
    assert "\n" not in line
    record = json.loads(line)
    assert list(record)[:3] == ["ts", "level", "event"]
    assert record["level"] == "warning" and record["event"] == "health" and record["n"] == 3
    assert "error" not in record
    assert record["ts"].endswith("Z") and len(record["ts"]) == len("2026-01-01T00:00:00.000Z")


def test_a_field_named_like_a_header_does_not_replace_it():
    record = json.loads(logs.json_line("applied", {"level": "debug", "reason": "start"}))
    assert record["level"] == "info" and record["reason"] == "start"


@pytest.mark.parametrize(
    ("event", "fields", "level"),
    [
        ("applied", {}, "info"),
        ("health", {"state": "up"}, "info"),
        ("health", {"state": "down"}, "warning"),
        ("pool", {"state": "all-down-kept"}, "warning"),
        ("receipt-failed", {}, "warning"),
        ("apply-failed", {}, "error"),
        ("reload-failed", {}, "error"),
        ("something-new", {}, "info"),
    ],
)
def test_levels(event, fields, level):
    assert logs.level_of(event, fields) == level


def test_every_event_the_daemon_logs_has_a_level():
    """A new event needs a row in logs.LEVELS (else it is info, which an error is not)."""
    logged = set()
    for path in (ROOT / "kdsr").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "log"
                and node.args
                and isinstance(node.args[0], ast.Constant)
                and isinstance(node.args[0].value, str)
            ):
                logged.add(node.args[0].value)
    assert {"started", "applied", "apply-failed", "reloaded", "stopped"} <= logged  # the scan finds them
    assert logged - set(logs.LEVELS) == set()


def test_journal_priorities_prefix_each_line_only_when_asked():
    to_journal = logs.formatter("text", journal=True)
    assert to_journal("apply-failed", node="lb1", error="EBUSY").startswith("<3>ts=")
    assert to_journal("health", state="down").startswith("<4>ts=")
    assert to_journal("applied", changes=2).startswith("<6>ts=")
    assert logs.formatter("json", journal=True)("applied").startswith('<6>{"ts":')
    plain = logs.formatter("text", journal=False)("applied", node="lb1", changes=2)
    assert plain.split(" ", 1)[1] == log_line("applied", node="lb1", changes=2).split(" ", 1)[1]


def test_stderr_is_the_journal_when_journal_stream_names_its_device_and_inode(tmp_path):
    with open(tmp_path / "stream", "w") as stream:
        status = os.fstat(stream.fileno())
        named = {"JOURNAL_STREAM": f"{status.st_dev}:{status.st_ino}"}
        assert logs.stderr_is_journal(named, stream.fileno())
        # systemd's variable survives into children whose stderr is elsewhere (a pipe, a file).
        assert not logs.stderr_is_journal({"JOURNAL_STREAM": f"{status.st_dev}:{status.st_ino + 1}"}, stream.fileno())
        assert not logs.stderr_is_journal({"JOURNAL_STREAM": "8:x"}, stream.fileno())
        assert not logs.stderr_is_journal({}, stream.fileno())


def test_an_unknown_format_is_refused():
    with pytest.raises(ValueError, match="text, json"):
        logs.formatter("xml")


def test_the_daemon_logs_json_when_asked(tmp_path):
    from kdsr.intent import load_intent

    path = tmp_path / "intent.json"
    path.write_text((ROOT / "examples" / "l2-web.json").read_text())
    lines: list[str] = []
    runner = Runner(
        lambda: load_intent(path),
        "lb1",
        FakeKernel(),
        StateStore(tmp_path / "state"),
        emit=lines.append,
        probe_fn=lambda target: Result(True, 0.001),
        log_format=logs.formatter("json", journal=False),
    )
    runner.start()
    runner._stop_probes()
    records = [json.loads(line) for line in lines]
    assert [r["event"] for r in records] == ["started", "applied"]
    assert all(r["level"] == "info" and r["node"] == "lb1" for r in records)
    assert records[1]["changes"] > 0 and records[1]["reason"] == "start"


def test_kdsr_run_offers_log_format_and_refuses_another_value(tmp_path):
    from cli_in_process import run_kdsr

    assert "--log-format [text|json]" in run_kdsr(tmp_path, "run", "--help").output
    refused = subprocess.run(
        [sys.executable, "-m", "kdsr", "run", "x.json", "--log-format", "xml"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert refused.returncode == 4 and "'xml' is not one of 'text', 'json'" in refused.stderr
