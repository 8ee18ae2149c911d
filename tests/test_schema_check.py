"""The compiled schema check (kdsr/intent/schema_check.py) gives jsonschema's
verdict on every document, or says it is unsure and leaves it to jsonschema.

The mutants start from the shipped examples and from one document that sets
every optional field the schema has, and change one place at a time: each
value replaced by values chosen to sit on the schema's edges (a whole float
for an integer, true for 1, a bound and one past it, an address with a zone,
a name one character too long), each key deleted or renamed, an unknown key
added, a list emptied or an item repeated.  Hypothesis adds arbitrary values
at one to three places.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kdsr.intent import load, schema_check

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.json"))
SCHEMA = load.schema()
VALIDATOR = load.validator_for(SCHEMA)
FAST = schema_check.compile_check(SCHEMA, VALIDATOR.format_checker.conforms)


def verdict(doc: object) -> bool | None:
    """The fast check's answer; None when it leaves the value to jsonschema."""
    assert FAST is not None
    try:
        return FAST(doc)
    except schema_check.Unsure:
        return None


def every_field() -> dict:
    """An example with every optional field of the schema set somewhere."""
    doc = json.loads((EXAMPLES[0].parent / "l2-bgp-ha.json").read_text())
    doc["services"]["full"] = {
        "vip": "fd00:10::100",
        "ports": [80, "8000-8010"],
        "protocols": ["tcp", "udp"],
        "pool": "full",
        "dsr": {"mode": "l3-ip6tnl", "engine": "nft", "path_mtu": 1480, "mss_clamp": 1400},
        "hashing": {
            "fields": "five-tuple",
            "seed": 7,
            "table_size": 251,
            "flow_pinning": {"timeout": 30, "max_flows": 4096},
        },
        "health": [
            {
                "type": "http",
                "mode": "plain",
                "port": 8080,
                "path": "/ready",
                "host": "web.example",
                "status": [200, "3xx"],
            },
            {"type": "udp", "interval": 2.5, "timeout": 1, "rise": 2, "fall": 3, "jitter": 0.1, "send": "ping"},
            {"type": "https", "status": "2xx", "verify_tls": False, "body": "ok", "expect": "pong"},
        ],
        "announce": {
            "mode": "n+m",
            "load_balancers": ["lb1", "lb2"],
            "active": 1,
            "standby": 1,
            "prepend": 2,
            "standby_med": 50,
            "med": 10,
            "communities": ["65000:1", "65000:2"],
        },
    }
    doc["pools"]["full"] = {
        "servers": [
            {"node": "s1", "weight": 3, "port": 8080},
            {"address": "fd00:10::21", "weight": 0, "mac": "aa:bb:cc:dd:ee:ff"},
        ],
        "health": {"type": "tcp", "port": 80},
        "all_down": "drop",
    }
    bgp = doc["load_balancers"]["lb1"]["bgp"]
    bgp["bird"] = {"config": "/etc/bird/bird.conf", "fragment": "/etc/bird/kdsr.conf", "socket": "/run/bird.ctl"}
    bgp["neighbors"][0].update({"password": "s3cret!", "bfd": True, "multihop": 2})
    doc["services"]["web"]["hashing"] = {"flow_pinning": True}
    doc["services"]["web"]["dsr"] = {"mss_clamp": "off"}
    return doc


DOCS = {p.name: json.loads(p.read_text()) for p in EXAMPLES} | {"every-field": every_field()}

# Values on the schema's edges, and of every JSON type.
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
    0.5,
    0.6,
    7,
    576,
    575,
    3600,
    3600.5,
    10000,
    10001,
    65535,
    65536,
    65537,
    65538,
    2**32 - 1,
    2**32,
    float("nan"),
    float("inf"),
    "",
    "tcp",
    "udp",
    "both",
    "http",
    "l2",
    "l3-gre",
    "nft",
    "ipvs",
    "auto",
    "keep",
    "active-standby",
    "source-ip",
    "10.0.0.1",
    "10.0.0.1/24",
    "fd00::1",
    "fe80::1%eth0",
    "fe80::1%eth0/64",
    "eth0",
    ".",
    "..",
    "a" * 15,
    "a" * 16,
    "a" * 23,
    "a" * 24,
    "A1",
    "s1",
    "1-2",
    "99999-1",
    "123456-1",
    "200",
    "2xx",
    "6xx",
    "65000:100",
    "/etc/x",
    "relative/x",
    "aa:bb:cc:dd:ee:ff",
    "aa:bb:cc:dd:ee",
    [],
    ["tcp", "tcp"],
    ["tcp", "udp"],
    ["tcp", 1],
    [80, "81-82"],
    [0],
    ["lb1", "lb1"],
    [200, "2xx", 600],
    ["10.0.0.1/24"],
    {},
    {"type": "tcp"},
    [{"type": "tcp"}],
    {"node": "s1"},
    {"address": "10.0.0.9"},
]
KEYS = ["zzz", "Bad", "a" * 24, "$schema", "type", "node", "weight", "mode", "bgp", "health", "port"]


def paths_of(doc, prefix=()):
    yield prefix
    if isinstance(doc, dict):
        for key, value in doc.items():
            yield from paths_of(value, (*prefix, key))
    elif isinstance(doc, list):
        for index, value in enumerate(doc):
            yield from paths_of(value, (*prefix, index))


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
                # Every edge value somewhere; a handful at each place.
                for _ in range(6):
                    turn += 1
                    changes.append(("=", EDGES[(turn * 7) % len(EDGES)]))
            if isinstance(value, dict):
                changes += [("del", key) for key in value]
                changes += [("add", KEYS[(turn + i) % len(KEYS)]) for i in range(2)]
                changes += [("rename", key) for key in list(value)[:3]]
            if isinstance(value, list):
                changes += [("=", []), ("=", [*value, *value[:1]]), ("=", [*value, EDGES[turn % len(EDGES)]])]
            for how, arg in changes:
                doc = copy.deepcopy(original)
                if how == "=":
                    if not path:
                        continue
                    at(doc, path[:-1])[path[-1]] = copy.deepcopy(arg)
                elif how == "del":
                    del at(doc, path)[arg]
                elif how == "add":
                    at(doc, path).setdefault(arg, EDGES[turn % len(EDGES)])
                else:
                    target = at(doc, path)
                    target[KEYS[turn % len(KEYS)] if arg != KEYS[turn % len(KEYS)] else "zzz"] = target.pop(arg)
                turn += 1
                yield f"{name} {'/'.join(map(str, path))} {how} {arg!r}"[:160], doc


def test_the_shipped_schema_gets_a_fast_check():
    # Were a keyword added that the module does not implement, every load
    # would quietly fall back to jsonschema: this says so instead.
    assert FAST is not None


@pytest.mark.parametrize("name", sorted(DOCS))
def test_every_example_is_accepted_without_jsonschema(name):
    assert VALIDATOR.is_valid(DOCS[name])
    assert verdict(DOCS[name]) is True


def test_one_change_anywhere_gets_jsonschemas_verdict():
    counts = {True: 0, False: 0, None: 0}
    wrong = []
    for label, doc in mutants():
        expected = VALIDATOR.is_valid(doc)
        got = verdict(doc)
        counts[got] += 1
        if got is not None and got != expected:
            wrong.append(f"{label}: jsonschema says {expected}")
    assert not wrong, "\n".join(wrong[:20])
    # The mutants reach both verdicts, and the check decides nearly all.
    assert counts[True] > 300 and counts[False] > 1500, counts
    assert counts[None] < 0.05 * sum(counts.values()), counts


scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**40), max_value=2**40),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=30),
    st.sampled_from([e for e in EDGES if not isinstance(e, (list, dict))]),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=12), inner, max_size=4)),
    max_leaves=10,
)


@st.composite
def changed_documents(draw):
    doc = copy.deepcopy(draw(st.sampled_from(list(DOCS.values()))))
    for _ in range(draw(st.integers(min_value=1, max_value=3))):
        path = draw(st.sampled_from([p for p in paths_of(doc) if p]))
        at(doc, path[:-1])[path[-1]] = draw(values)
    return doc


@settings(
    max_examples=300, deadline=None, database=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
@given(changed_documents())
def test_arbitrary_values_anywhere_get_jsonschemas_verdict(doc):
    got = verdict(doc)
    assert got is None or got == VALIDATOR.is_valid(doc)


def subschemas(schema: object, pointer: str = ""):
    """(pointer, subschema) for every schema object inside ``schema``."""
    if not isinstance(schema, dict):
        return
    yield pointer, schema
    for keyword in ("items", "additionalProperties", "propertyNames", "if", "then", "else", "not"):
        if keyword in schema:
            yield from subschemas(schema[keyword], f"{pointer}/{keyword}")
    for keyword in ("properties", "$defs"):
        for name, sub in schema.get(keyword, {}).items():
            yield from subschemas(sub, f"{pointer}/{keyword}/{name}")
    for keyword in ("oneOf", "anyOf"):
        for index, sub in enumerate(schema.get(keyword, [])):
            yield from subschemas(sub, f"{pointer}/{keyword}/{index}")


def test_every_part_of_the_schema_gives_jsonschemas_verdict_on_every_edge_value():
    # Each subschema alone (with the root's definitions), against every edge
    # value and each of the edge objects and lists: every keyword where the
    # schema uses it, on the values that sit on its bounds.
    wrong, checked = [], 0
    for pointer, sub in subschemas(SCHEMA):
        part = {"$schema": SCHEMA["$schema"], "$defs": SCHEMA["$defs"], **sub}
        check = schema_check.compile_check(part, VALIDATOR.format_checker.conforms)
        validator = load.validator_for(part)
        for value in EDGES:
            try:
                got = check(value)
            except schema_check.Unsure:
                continue
            checked += 1
            if got != validator.is_valid(value):
                wrong.append(f"{pointer or '/'} on {value!r}: jsonschema says {not got}")
    assert not wrong, "\n".join(wrong[:20])
    assert checked > 5000


@pytest.mark.parametrize(
    "schema",
    [
        {"oneOf": [{"type": "integer"}, {"minimum": 5}]},  # 7 satisfies both: not one
        {"anyOf": [{"type": "string"}, {"maximum": 0}]},
        {"const": 1},
        {"const": True},
        {"const": None},
        {"enum": [0, False, "0", None, 1.5]},
        {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
        {"type": ["integer", "null"]},
        {"type": "string", "minLength": 2, "maxLength": 3},
        {"not": {"type": "string", "pattern": "x"}},
        {"if": {"type": "integer"}, "then": {"minimum": 10}},
        {"if": {"type": "integer"}, "else": {"type": "array", "minItems": 1}},
        {"type": "object", "required": ["type"], "minProperties": 2},
        {"type": "array", "items": {"type": "string"}, "uniqueItems": True, "maxItems": 2},
        {"propertyNames": {"maxLength": 1}},
        True,
        False,
    ],
    ids=lambda schema: json.dumps(schema)[:40],
)
def test_each_keyword_gives_jsonschemas_verdict(schema):
    check = schema_check.compile_check(schema, VALIDATOR.format_checker.conforms)
    validator = load.validator_for(schema)
    values = [*EDGES, 2, 5, 7, 10, 11, "xx", "xxxx", "ab", {"type": "a", "b": 1}, {"a": 1, "bb": 2}, ["a", "b", "c"]]
    for value in values:
        try:
            got = check(value)
        except schema_check.Unsure:
            continue
        assert got == validator.is_valid(value), value


def test_an_unsure_value_is_answered_by_jsonschema():
    doc = copy.deepcopy(DOCS["every-field"])
    doc["services"]["full"]["protocols"] = ["tcp", True]  # uniqueItems over a string and a boolean
    assert verdict(doc) is None
    assert load.is_valid_for(SCHEMA)(doc) is VALIDATOR.is_valid(doc) is False
    doc["services"]["full"]["protocols"] = ["udp", "tcp"]
    assert load.is_valid_for(SCHEMA)(doc) is True


def test_a_schema_with_a_keyword_not_implemented_gets_no_fast_check():
    schema = {"type": "object", "patternProperties": {"^x": {"type": "integer"}}}
    assert schema_check.compile_check(schema, VALIDATOR.format_checker.conforms) is None
    is_valid = load.is_valid_for(schema)
    assert is_valid({"x1": 1}) and not is_valid({"x1": "one"})
    assert schema_check.compile_check({"$ref": "other.json#/x"}, VALIDATOR.format_checker.conforms) is None


NAN = float("nan")


@pytest.mark.parametrize(
    "schema",
    [
        {"const": NAN},  # jsonschema's const (==) never matches NaN, its enum (in) matches the same object
        {"enum": ["a", NAN]},
        {"properties": {"a": {"$schema": "http://json-schema.org/draft-04/schema#", "type": "integer"}}},
        {"$schema": "http://json-schema.org/draft-07/schema#", "type": "integer"},
        {"$defs": {"a": {"$id": "http://x/a.json", "$ref": "#/$defs/b"}, "b": {}}, "$ref": "#/$defs/a"},
        {"$defs": {"a": {"type": "string"}, "b": {"$id": "#$defs/a"}}, "$ref": "#/$defs/a"},
        {"$defs": {"a": {"type": "string"}}, "default": {"$id": "#$defs/a"}, "$ref": "#/$defs/a"},
        {"$defs": {"a": {"$anchor": "x"}}},
        {"$defs": {"a b": {"type": "string"}, "a%20b": {"type": "integer"}}, "$ref": "#/$defs/a%20b"},
        {"uniqueItems": 1},
        {"properties": {"a": {"pattern": "("}}},
        {"type": "foo"},
    ],
    ids=lambda schema: json.dumps(schema)[:50],
)
def test_a_schema_jsonschema_would_read_another_way_gets_no_fast_check(schema):
    # Found by review: each of these made the compiled check disagree with
    # jsonschema (or crash) before it refused them.
    assert schema_check.compile_check(schema, VALIDATOR.format_checker.conforms) is None


def test_subclasses_of_json_types_are_left_to_jsonschema():
    class Mapping(dict):
        def __getitem__(self, key):
            return 5  # jsonschema reads values by key

    class Items(list):
        def __iter__(self):
            return iter([1])  # jsonschema reads items by index

    class Text(str):
        pass

    schema = {"properties": {"a": {"type": "integer"}}, "items": {"type": "string"}}
    check = schema_check.compile_check(schema, VALIDATOR.format_checker.conforms)
    for value in (Mapping(a="x"), Items(["x"]), Text("x")):
        with pytest.raises(schema_check.Unsure):
            check(value)
        assert load.is_valid_for(schema)(value) is load.validator_for(schema).is_valid(value) is True


def test_a_schema_may_refer_to_itself():
    tree = {"type": "object", "properties": {"children": {"type": "array", "items": {"$ref": "#"}}}}
    check = schema_check.compile_check(tree, VALIDATOR.format_checker.conforms)
    assert check({"children": [{"children": []}, {}]})
    assert not check({"children": [{"children": [1]}]})
