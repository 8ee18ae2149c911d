"""The schema's yes or no (kdsr/intent/load.py ``is_valid_for``: jsonschema-rs,
then jsonschema on a "no") is jsonschema's verdict, with kdsr's address and
interface formats, on documents one change away from the shipped examples;
and without jsonschema-rs the same problems are reported.

The changes put values that sit on the schema's edges (a whole float for an
integer, true for 1, a bound and one past it, an address with a zone, a name
one character too long, a name ending in a newline) at every place, delete
and rename keys, add unknown ones, empty lists and repeat an item.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from test_fuzz_intent import paths_of

from kdsr.errors import IntentError
from kdsr.intent import load

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.json"))
DOCS = {p.name: json.loads(p.read_text()) for p in EXAMPLES}
SCHEMA = load.schema()

EDGES = [
    None,
    True,
    False,
    0,
    1,
    1.0,
    80.0,
    80.5,
    -1,
    7,
    65535,
    65536,
    65537,
    2**32 - 1,
    2**32,
    float("nan"),
    "",
    "tcp",
    "both",
    "l3-gre",
    "ipvs",
    "10.0.0.1",
    "10.0.0.1/24",
    "fd00::1",
    "fe80::1%eth0",
    "eth0",
    "..",
    "a" * 16,
    "a" * 24,
    "web\n",
    "A1",
    "1-2",
    "123456-1",
    "2xx",
    "65000:100",
    "aa:bb:cc:dd:ee",
    [],
    ["tcp", "tcp"],
    ["tcp", 1],
    [80, "81-82"],
    {},
    {"type": "tcp"},
    {"node": "s1"},
]
KEYS = ["zzz", "Bad", "a" * 24, "type", "node", "weight", "mode", "health", "port"]


def at(doc, path):
    for step in path:
        doc = doc[step]
    return doc


def mutants():
    """(label, document) with one place changed; deterministic."""
    turn = 0
    for name, original in DOCS.items():
        for path in paths_of(original):
            value = at(original, path)
            changes = []
            if path:
                for _ in range(4):
                    turn += 1
                    changes.append(("=", EDGES[(turn * 7) % len(EDGES)]))
            if isinstance(value, dict):
                changes += [("del", key) for key in value]
                changes += [("add", KEYS[turn % len(KEYS)])]
                changes += [("rename", key) for key in list(value)[:2]]
            if isinstance(value, list):
                changes += [("=", []), ("=", [*value, *value[:1]])]
            for how, arg in changes:
                doc = copy.deepcopy(original)
                if how == "=":
                    at(doc, path[:-1])[path[-1]] = copy.deepcopy(arg)
                elif how == "del":
                    del at(doc, path)[arg]
                elif how == "add":
                    at(doc, path).setdefault(arg, EDGES[turn % len(EDGES)])
                else:
                    target = at(doc, path)
                    target["zzz" if arg == KEYS[turn % len(KEYS)] else KEYS[turn % len(KEYS)]] = target.pop(arg)
                turn += 1
                yield f"{name} {'/'.join(map(str, path))} {how} {arg!r}"[:160], doc


def test_jsonschema_rs_is_installed_here():
    # Were it missing, every test below would pass on the jsonschema path
    # alone and prove nothing about the fast one.
    assert load.jsonschema_rs is not None


def test_one_change_anywhere_gets_jsonschemas_verdict():
    validator = load.validator_for(SCHEMA)
    is_valid = load.is_valid_for(SCHEMA)
    counts = {True: 0, False: 0}
    wrong = []
    for label, doc in mutants():
        expected = validator.is_valid(doc)
        counts[expected] += 1
        if is_valid(doc) is not expected:
            wrong.append(f"{label}: jsonschema says {expected}")
    assert not wrong, "\n".join(wrong[:20])
    assert counts[True] > 100 and counts[False] > 500, counts  # the mutants reach both verdicts


@pytest.mark.parametrize(
    "change",
    [
        ("services", "web", "ports", 0, 70000),
        ("services", "web", "vip", "10.10.0.300"),
        ("load_balancers", "lb1", "interface", "e" * 16),
        ("pools", "web", "servers", 0, "weight", 1.5),
    ],
    ids=lambda change: "/".join(map(str, change[:-1])),
)
def test_without_jsonschema_rs_the_same_problems_are_reported(change, monkeypatch):
    doc = copy.deepcopy(DOCS["l2-web.json"])
    *path, value = change
    at(doc, path[:-1])[path[-1]] = value
    doc["services"]["web"]["protocols"] = "tcpx"  # and a second problem elsewhere
    text = json.dumps(doc)

    def problems() -> list[str]:
        with pytest.raises(IntentError) as caught:
            load.parse_intent(text, "x.json")
        return [str(p) for p in caught.value.problems]

    fast = problems()
    monkeypatch.setattr(load, "jsonschema_rs", None)
    load._is_valid.cache_clear()  # made again, now without jsonschema-rs
    try:
        assert problems() == fast
    finally:
        monkeypatch.undo()
        load._is_valid.cache_clear()
    assert len(fast) == 2 and all(p.startswith("x.json: /") for p in fast), fast
