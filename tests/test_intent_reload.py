"""Reloading an intent (kdsr run's SIGHUP): only the changed entries are
validated and built, and the result is what a cold load gives, problems included."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from kdsr.errors import IntentError
from kdsr.intent import parse_intent
from kdsr.intent.reload import Reloader, same_json

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "l2-web.json"
SOURCE = "intent.json"


def example() -> dict:
    return json.loads(EXAMPLE.read_text())


def reloaded(first: dict, then: dict) -> tuple:
    """(the reload's first intent, its second) after loading ``first`` then ``then``."""
    reloader = Reloader()
    before = reloader.parse(json.dumps(first), SOURCE)
    return before, reloader.parse(json.dumps(then), SOURCE)


def cold_problems(doc: dict) -> list:
    with pytest.raises(IntentError) as cold:
        parse_intent(json.dumps(doc), SOURCE)
    return cold.value.problems


def reload_problems(broken: dict) -> list:
    """The problems a reload of ``broken`` reports, after the example loaded."""
    reloader = Reloader()
    reloader.parse(json.dumps(example()), SOURCE)
    with pytest.raises(IntentError) as warm:
        reloader.parse(json.dumps(broken), SOURCE)
    return warm.value.problems


def edit(change) -> dict:
    doc = example()
    change(doc)
    return doc


EDITS = {
    "a weight": lambda d: d["pools"]["web"]["servers"][0].update(weight=5),
    "a member removed": lambda d: d["pools"]["web"]["servers"].pop(1),
    "a service added": lambda d: d["services"].update(extra={"vip": "10.10.0.102", "ports": 8080, "pool": "web"}),
    "a service removed": lambda d: d["services"].pop("media"),
    "a service's ports": lambda d: d["services"]["web"].update(ports=[443, 80, 8443]),
    "a server node moved": lambda d: d["servers"]["s1"].update(addresses=["10.10.0.21/24", "fd00:10::11/64"]),
    "a load balancer's interface": lambda d: d["load_balancers"]["lb1"].update(interface="eth1"),
    "nothing": lambda d: None,
}


@pytest.mark.parametrize("name", EDITS)
def test_a_reload_builds_what_a_cold_load_builds(name):
    doc = edit(EDITS[name])
    _, warm = reloaded(example(), doc)
    cold = parse_intent(json.dumps(doc), SOURCE)
    assert warm == cold
    # Pointers are not part of equality; a kept object must still point right.
    assert [p.pointer for s in warm.services for p in s.ports] == [p.pointer for s in cold.services for p in s.ports]
    assert [m.pointer for p in warm.pools for m in p.members] == [m.pointer for p in cold.pools for m in p.members]


def test_unchanged_entries_keep_their_objects_and_the_services_tuple():
    before, after = reloaded(example(), edit(EDITS["a weight"]))
    assert after.services is before.services  # a CompileCache's identity checks then hold
    assert after.pool("web6") is before.pool("web6")
    assert after.pool("web") is not before.pool("web")
    assert after.pool("web").members[0].weight == 5
    # The same services, grouped by pool once: not sorted again per reload.
    assert after.services_on("web") is before.services_on("web")
    assert after.services_on("web") == parse_intent(json.dumps(edit(EDITS["a weight"])), SOURCE).services_on("web")


def test_a_changed_service_is_new_and_the_others_are_kept():
    before, after = reloaded(example(), edit(EDITS["a service's ports"]))
    kept = {s.name for s in after.services if s is before.services[[b.name for b in before.services].index(s.name)]}
    assert kept == {"dns", "media", "web6"}
    assert after.pools is before.pools


def test_a_server_node_change_rebuilds_every_pool():
    # A member naming a node takes its address from the node: no pool is kept.
    before, after = reloaded(example(), edit(EDITS["a server node moved"]))
    assert all(a is not b for a, b in zip(after.pools, before.pools, strict=True))
    assert str(after.pool("web").members[0].address) == "10.10.0.21"


def test_true_where_the_last_file_had_1_is_still_refused():
    # Python's True == 1: an entry equal by == to the last one must not skip validation.
    first = edit(lambda d: d["pools"]["web"]["servers"][2].update(weight=1))
    then = edit(lambda d: d["pools"]["web"]["servers"][2].update(weight=True))
    assert first == then  # the trap
    reloader = Reloader()
    reloader.parse(json.dumps(first), SOURCE)
    with pytest.raises(IntentError) as warm:
        reloader.parse(json.dumps(then), SOURCE)
    assert warm.value.problems == cold_problems(then)
    assert any(p.pointer == "/pools/web/servers/2/weight" for p in warm.value.problems)


def test_problems_are_the_ones_a_cold_load_reports():
    def break_things(d: dict) -> None:
        d["services"]["web"]["vip"] = "10.10.0.300"  # schema (format), a changed entry
        d["services"]["Bad_Name"] = copy.deepcopy(d["services"]["dns"])  # schema (name), a new entry
        d["pools"]["web"]["servers"][0]["weight"] = -1  # schema, a changed pool
        d["services"]["media"]["pool"] = "nowhere"  # verify

    broken = edit(break_things)
    problems = reload_problems(broken)
    assert problems == cold_problems(broken)
    assert len(problems) >= 3


@pytest.mark.parametrize(
    "change",
    [
        lambda d: d["services"].update({"9lives": copy.deepcopy(d["services"]["dns"])}),  # a new name only
        lambda d: d.update(version=2),  # outside the maps
        lambda d: d.update(services={}),  # the map's own keyword (minProperties)
        lambda d: d["services"]["dns"].update(ports=0),  # one changed entry only
    ],
    ids=["name", "top level", "map keyword", "entry"],
)
def test_each_part_the_split_checks_is_checked(change):
    broken = edit(change)
    assert reload_problems(broken) == cold_problems(broken)


def test_a_refused_reload_leaves_the_last_valid_document():
    reloader = Reloader()
    first = reloader.parse(json.dumps(example()), SOURCE)
    with pytest.raises(IntentError):
        reloader.parse(json.dumps(edit(lambda d: d["pools"]["web"]["servers"][0].update(weight="x"))), SOURCE)
    after = reloader.parse(json.dumps(edit(EDITS["a weight"])), SOURCE)
    assert after.services is first.services  # kept from the last valid load, not the refused one


def test_yaml_reloads_too():
    reloader = Reloader()
    first = reloader.parse(json.dumps(example()), "intent.json")
    yaml_text = EXAMPLE.read_text()  # JSON is YAML
    again = reloader.parse(yaml_text, "intent.yaml")
    assert again.source == "intent.yaml"
    assert again.services is first.services and again.pools is first.pools


@pytest.mark.parametrize(
    ("a", "b", "same"),
    [
        (1, 1, True),
        (1, True, False),
        (0, False, False),
        (1, 1.0, False),
        ({"a": [1, {"b": True}]}, {"a": [1, {"b": True}]}, True),
        ({"a": [1, {"b": True}]}, {"a": [1, {"b": 1}]}, False),
        ({"a": 1}, {"a": 1, "b": 2}, False),
        ([1, 2], [1, 2, 3], False),
        ("x", "x", True),
        (None, None, True),
    ],
)
def test_same_json_is_strict_about_types(a, b, same):
    assert same_json(a, b) is same
