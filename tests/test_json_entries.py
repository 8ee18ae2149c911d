"""kdsr/intent/json_entries.py: reading a JSON text again, reusing the last
reading's entries where the text is the same, gives exactly what the whole
parse gives (types, order and all), or declines; never anything else."""

from __future__ import annotations

import copy
import json
import marshal
import random

import pytest

from kdsr.intent import json_entries, load
from kdsr.intent.reload import ENTRY_MAPS

SCAN = load.JSON_DECODER.scan_once


def whole(text: str) -> object:
    try:
        return load.JSON_DECODER.decode(text)
    except Exception:  # noqa: BLE001 - any failure: the text is not readable
        return None


def doc_of(rng: random.Random) -> dict:
    services = {
        f"svc{i}": {"vip": f"10.0.{i // 250}.{i % 250}", "ports": [80, 8000 + i], "pool": f"p{i % 5}"}
        for i in range(rng.randrange(0, 12))
    }
    if rng.random() < 0.3:  # entries that are not objects end where the next character says
        services["n"] = rng.choice([5, -1.5, 2e3, True, None, "x", [1, 2]])
    pools = {f"p{i}": {"servers": [{"address": f"10.1.0.{j}", "weight": j % 3} for j in range(3)]} for i in range(5)}
    doc = {"version": 1, "services": services, "pools": pools, "load_balancers": {"lb": {"interface": "eth0"}}}
    if rng.random() < 0.3:
        doc = dict(reversed(doc.items()))
    return doc


def dumped(doc: object, rng: random.Random) -> str:
    return json.dumps(doc, indent=rng.choice([None, 1, 2, "\t"]), ensure_ascii=rng.random() < 0.5)


def edited_doc(doc: dict, rng: random.Random) -> dict:
    doc = copy.deepcopy(doc)
    services, pools = doc["services"], doc["pools"]
    kind = rng.randrange(6)
    if kind == 0 and services:
        name = rng.choice(sorted(services))
        services[name] = rng.choice([{"vip": "10.9.9.9", "ports": 81, "pool": "p1"}, 12, 1.25, "é"])
    elif kind == 1:
        services[f"new{rng.randrange(100)}"] = {"vip": "10.8.0.1", "ports": 80, "pool": "p0"}
    elif kind == 2 and services:
        del services[rng.choice(sorted(services))]
    elif kind == 3:
        pool = pools[rng.choice(sorted(pools))]
        if isinstance(pool, dict) and "servers" in pool:  # not a service moved here
            rng.choice(pool["servers"])["weight"] = rng.choice([0, 7, 10, 1.0, 1.5])
    elif kind == 4:  # an entry moved from one map to the other
        if services:
            name = rng.choice(sorted(services))
            pools[name] = services.pop(name)
    else:
        doc["version"] = rng.choice([1, 2, 10, "1"])
    return doc


def edited_text(text: str, rng: random.Random) -> str:
    """A character-level edit: often breaks the JSON, sometimes in a way that still parses."""
    at = rng.randrange(len(text) + 1)
    kind = rng.randrange(5)
    if kind == 0:  # a character in
        return text[:at] + rng.choice(' \n\t{}[],:"0123456789.eE-+tfnx') + text[at:]
    if kind == 1:  # one out
        return text[:at] + text[at + 1 :]
    if kind == 2 and text[at : at + 1].isdigit():  # a digit changed, or one more
        return text[:at] + rng.choice("0123456789") * rng.randrange(1, 3) + text[at + 1 :]
    if kind == 3:  # whitespace in
        return text[:at] + rng.choice([" ", "\n", "\r\n", "  \t"]) + text[at:]
    # an entry's text doubled (a name twice) or a line doubled
    lines = text.split("\n")
    i = rng.randrange(len(lines))
    return "\n".join(lines[: i + 1] + [lines[i]] + lines[i + 1 :])


@pytest.mark.parametrize("seed", range(12))
def test_a_reading_after_edits_is_the_whole_parse(seed):
    rng = random.Random(seed)
    doc = doc_of(rng)
    text = dumped(doc, rng)
    last = json_entries.read(text, SCAN, ENTRY_MAPS)
    readable = declined = reused = 0
    for _ in range(150):
        if rng.random() < 0.5:
            doc = edited_doc(doc, rng)
            text = dumped(doc, rng) if rng.random() < 0.2 else json.dumps(doc, indent=1)
        else:
            text = edited_text(text, rng)
        expected = whole(text)
        try:
            reading = json_entries.read(text, SCAN, ENTRY_MAPS, last)
        except json_entries.Unreadable:
            declined += expected is not None
            continue
        assert expected is not None, text
        assert marshal.dumps(reading.doc, 2) == marshal.dumps(expected, 2), text
        reused += any(
            value is old_value
            for key in ENTRY_MAPS
            if key in last.maps and key in reading.maps
            for value in reading.maps[key].values
            for old_value in last.maps[key].values
        )
        readable += 1
        if rng.random() < 0.8:  # the reloader keeps the last valid reading
            last = reading
    assert readable >= 40 and reused >= 20, (readable, reused)
    # Declining is allowed (the whole parse then answers) but is for text
    # that is not a plain object of unique keys, not for ordinary edits.
    assert declined <= 2, declined


def test_an_edit_of_one_entry_reuses_every_other_entry_as_the_same_object():
    doc = {
        "version": 1,
        "services": {f"s{i}": {"vip": f"10.0.0.{i}", "ports": 80, "pool": f"p{i % 4}"} for i in range(200)},
        "pools": {f"p{i}": {"servers": [{"address": f"10.1.0.{i}", "weight": 1}]} for i in range(4)},
        "load_balancers": {"lb": {"interface": "eth0"}},
    }
    before = json_entries.read(json.dumps(doc, indent=2), SCAN, ENTRY_MAPS)
    doc["services"]["s100"]["ports"] = 443
    after = json_entries.read(json.dumps(doc, indent=2), SCAN, ENTRY_MAPS, before)
    assert after.doc == doc
    for key in ENTRY_MAPS:
        for name, value in after.doc[key].items():
            assert (value is before.doc[key][name]) == (name != "s100"), name


def test_a_number_at_the_edge_of_the_common_text_is_read_again():
    # "7" then "77": the common prefix ends inside the number, whose end
    # depends on the character after it.
    before = json_entries.read('{"services": {"a": 7, "b": 1}}', SCAN, ENTRY_MAPS)
    after = json_entries.read('{"services": {"a": 77, "b": 1}}', SCAN, ENTRY_MAPS, before)
    assert after.doc == {"services": {"a": 77, "b": 1}}
    # The same after entries that are reused: the run of them stops before it.
    before = json_entries.read('{"services": {"a": {}, "b": 7}}', SCAN, ENTRY_MAPS)
    after = json_entries.read('{"services": {"a": {}, "b": 77}}', SCAN, ENTRY_MAPS, before)
    assert after.doc == {"services": {"a": {}, "b": 77}}
    assert after.doc["services"]["a"] is before.doc["services"]["a"]


@pytest.mark.parametrize(
    "text",
    [
        '{"services": {"a": {}, "a": {}}}',  # a name twice
        '{"services": {}, "services": {}}',  # a key twice
        '{"services": {"a": {"x": 1, "x": 2}}}',  # inside an entry: the hook's
        "[1, 2]",
        '{"services": {"a": {}}} x',
        '{"services": {"a": {},}}',
        "\ufeff{}",
    ],
)
def test_what_the_reader_declines(text):
    with pytest.raises(json_entries.Unreadable):
        json_entries.read(text, SCAN, ENTRY_MAPS)
