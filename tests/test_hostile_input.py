"""Hostile and broken intent files: a clear error naming the file, exit code 3
(invalid intent), bounded time and memory, and no kernel access at all.

Every case runs `validate`, `plan` and `apply` through the CLI with a fake
kernel that counts what is asked of it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from kdsr import cli
from kdsr.errors import EXIT_INVALID_INTENT, EXIT_USAGE, IntentError
from kdsr.files import read_bounded
from kdsr.kernel.fake import FakeKernel

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "l2-web.json"


class _Recorded:
    """One backend of the fake kernel, recording every method called on it."""

    def __init__(self, backend, name: str, calls: list[str]) -> None:
        self._backend, self._name, self._calls = backend, name, calls

    def __getattr__(self, attr: str):
        value = getattr(self._backend, attr)
        if callable(value):
            self._calls.append(f"{self._name}.{attr}")
        return value


class CountingKernel(FakeKernel):
    """A fake kernel that records every method called on it or on its backends."""

    def __init__(self) -> None:
        super().__init__()
        object.__setattr__(self, "calls", [])
        for name in ("nft", "links", "ipvs", "bird", "keepalived", "sysctl", "xdp"):
            object.__setattr__(self, name, _Recorded(getattr(self, name), name, self.calls))

    def __getattribute__(self, name: str):
        value = object.__getattribute__(self, name)
        if callable(value) and not name.startswith("_"):
            object.__getattribute__(self, "calls").append(name)
        return value


@pytest.fixture
def kernel(monkeypatch):
    k = CountingKernel()
    monkeypatch.setattr(cli, "_kernel", lambda store=None: k)
    return k


def run_all(path, tmp_path, kernel) -> list[str]:
    outputs = []
    for command in (["validate"], ["plan", "--node", "lb1"], ["apply", "--node", "lb1"]):
        result = CliRunner().invoke(cli.main, ["--state-dir", str(tmp_path / "state"), *command, str(path)])
        assert result.exit_code == EXIT_INVALID_INTENT, (command, result.output)
        assert "Traceback" not in result.output
        errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
        assert errors and all(str(path) in line for line in errors), result.output
        assert "nothing was changed" in result.output
        outputs.append(result.output)
    assert kernel.calls == [] and kernel.writes == 0, kernel.calls
    return outputs


def test_a_missing_file_is_a_usage_error_naming_the_path(tmp_path, kernel):
    path = tmp_path / "nope.json"
    for command in (["validate"], ["plan", "--node", "lb1"], ["apply", "--node", "lb1"]):
        result = CliRunner().invoke(cli.main, ["--state-dir", str(tmp_path / "state"), *command, str(path)])
        assert result.exit_code == EXIT_USAGE, (command, result.output)
        assert f"error: {path}: no such file" in result.output
    assert kernel.calls == [] and kernel.writes == 0, kernel.calls


def test_a_directory(tmp_path, kernel):
    (tmp_path / "dir.json").mkdir()
    assert "is a directory" in run_all(tmp_path / "dir.json", tmp_path, kernel)[0]


def test_symlink_to_dev_zero_is_refused_without_reading(tmp_path, kernel):
    link = tmp_path / "zero.json"
    link.symlink_to("/dev/zero")
    assert "not a regular file" in run_all(link, tmp_path, kernel)[0]


def test_a_fifo_with_no_writer_does_not_hang(tmp_path, kernel):
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)
    assert "not a regular file" in run_all(fifo, tmp_path, kernel)[0]


def test_a_100_mb_file_is_refused_by_its_size(tmp_path, kernel):
    big = tmp_path / "big.json"
    with big.open("wb") as f:
        f.truncate(100 * 1024 * 1024)  # sparse: costs no disk
    assert "larger than 64 MiB" in run_all(big, tmp_path, kernel)[0]


def test_the_size_bound_holds_for_files_that_grow_while_read(tmp_path):
    path = tmp_path / "small.json"
    path.write_bytes(b"x" * 2000)
    with pytest.raises(IntentError, match="larger than"):
        read_bounded(path, str(path), limit=1000)
    assert read_bounded(path, str(path), limit=2000) == b"x" * 2000


def test_invalid_utf8(tmp_path, kernel):
    bad = tmp_path / "latin1.json"
    bad.write_bytes(b'{"version": 1, "services": {"caf\xe9": {}}}')
    assert "not UTF-8" in run_all(bad, tmp_path, kernel)[0]


def test_duplicate_keys(tmp_path, kernel, example_path):
    text = example_path.read_text().replace('"version": 1,', '"version": 1, "version": 1,', 1)
    dup = tmp_path / "dup.json"
    dup.write_text(text)
    assert "appears twice" in run_all(dup, tmp_path, kernel)[0]


def test_yaml_alias_bomb_is_stopped_by_the_node_budget(tmp_path, kernel):
    lines = ['a0: &a0 ["x","x","x","x","x","x","x","x","x","x"]']
    for i in range(1, 9):  # 10^9 leaves once expanded
        lines.append(f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]")
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("\n".join(lines) + "\nversion: 1\n")
    assert "expands to more than" in run_all(bomb, tmp_path, kernel)[0]


def test_self_referencing_yaml_anchor(tmp_path, kernel):
    loop = tmp_path / "loop.yaml"
    loop.write_text("version: 1\nservices: &s\n  web: *s\n")
    assert "nests deeper" in run_all(loop, tmp_path, kernel)[0]


@pytest.mark.parametrize("depth", [100, 100_000])
def test_deeply_nested_json(tmp_path, kernel, depth):
    deep = tmp_path / "deep.json"
    deep.write_text('{"version": 1, "x": ' + "[" * depth + "]" * depth + "}")
    assert "nests deeper" in run_all(deep, tmp_path, kernel)[0]


HOSTILE_NAMES = [
    '"; flush ruleset; "',
    "web\nflush ruleset",
    "web}",
    "$web",
    "../../etc/passwd",
    "web\x00",
    "w" * 300,
    "wéb",
]


@pytest.mark.parametrize("name", HOSTILE_NAMES, ids=range(len(HOSTILE_NAMES)))
def test_hostile_names_are_rejected_by_the_schema(tmp_path, kernel, example_path, name):
    doc = json.loads(example_path.read_text())
    doc["services"][name] = doc["services"].pop("web")
    doc["pools"][name] = doc["pools"].pop("web")
    doc["services"][name]["pool"] = name
    path = tmp_path / "hostile.json"
    path.write_text(json.dumps(doc))
    out = run_all(path, tmp_path, kernel)[0]
    assert "/services/" in out and "/pools/" in out


HUGE = 10_000_000


def _with(mutate) -> dict:
    doc = json.loads(EXAMPLE.read_text())
    mutate(doc)
    return doc


# Each puts one huge value where an error message quotes it.
HUGE_VALUES = {
    "vip": lambda d: d["services"]["web"].update(vip="1" * HUGE),
    "pool reference": lambda d: d["services"]["web"].update(pool="p" * HUGE),
    "member address": lambda d: d["pools"]["web"]["servers"].append({"address": "1" * (HUGE // 10)}),
    "member node": lambda d: d["pools"]["web"]["servers"].append({"node": "n" * (HUGE // 10)}),
    "node address": lambda d: d["load_balancers"]["lb1"]["addresses"].append("1" * (HUGE // 10)),
    "service name": lambda d: d["services"].update({"k" * (HUGE // 10): dict(d["services"]["web"])}),
    "unknown field": lambda d: d["services"]["web"].update({"f" * (HUGE // 10): 1}),
    "port range": lambda d: d["services"]["web"].update(ports="9" * (HUGE // 10)),
}


@pytest.mark.parametrize("case", sorted(HUGE_VALUES))
def test_an_error_quotes_a_short_prefix_of_a_huge_value(case, tmp_path, kernel):
    path = tmp_path / "intent.json"
    path.write_text(json.dumps(_with(HUGE_VALUES[case])))
    for output in run_all(path, tmp_path, kernel):
        assert len(output) < 2000, f"{len(output):,} bytes of error for one huge value"
        assert " characters)" in output, output  # the length stands in for the rest
