"""Plan rendering (text + JSON against its schema) and the nft JSON codec."""

import json
from pathlib import Path

import jsonschema

from kdsr.compile import compile_node
from kdsr.diff import diff
from kdsr.intent import load_intent
from kdsr.kernel.nft_json import decode_element, decode_table, devices_from_text, encode_element
from kdsr.model import NftElement, Observed
from kdsr.plan_format import render_json, render_text

ROOT = Path(__file__).resolve().parent.parent


def test_plan_json_matches_schema(example_path):
    schema = json.loads((ROOT / "schemas" / "plan.schema.json").read_text())
    it = load_intent(example_path)
    for node in it.node_names():
        doc = json.loads(render_json(diff(compile_node(it, node), Observed()), "x.json"))
        jsonschema.Draft202012Validator(schema).validate(doc)
        assert doc["summary"]["add"] > 0


def test_text_plan_has_symbols_pointers_and_summary(example_path):
    it = load_intent(example_path)
    text = render_text(diff(compile_node(it, "lb1"), Observed()))
    assert "  + nft table netdev kdsr" in text
    assert "# /services" in text
    assert text.rstrip().splitlines()[-1].startswith("Plan: 12 to add, 0 to change, 0 to replace, 0 to destroy.")


def test_no_change_plan_says_so(example_path):
    it = load_intent(example_path)
    desired = compile_node(it, "lb1")
    plan = diff(desired, Observed(tables=desired.tables))
    assert plan.empty
    assert "No changes." in render_text(plan)


def test_replace_names_the_field(example_path):
    import dataclasses

    it = load_intent(example_path)
    desired = compile_node(it, "lb1")
    table = desired.tables[0]
    ingress = table.chain("ingress")
    moved = dataclasses.replace(ingress, hook=dataclasses.replace(ingress.hook, device="eth9"))
    old = dataclasses.replace(table, chains=tuple(moved if c.name == "ingress" else c for c in table.chains))
    plan = diff(desired, Observed(tables=(old,)))
    text = render_text(plan)
    assert "-/+ nft chain netdev kdsr/ingress" in text and "device eth9 -> eth0 forces replacement" in text


def test_element_codec_round_trip():
    for key, value in [
        (("10.0.0.1", "tcp", (80, 80)), ("jump", "pool-x")),
        (("fd00::1", "udp", (5000, 5010)), ("jump", "pool-y")),
        (7, "10.0.0.11"),
        (3, "02:00:00:00:00:01"),
    ]:
        elem = NftElement(value=value, comment="/services/a/ports/0")
        assert decode_element(encode_element(key, elem)) == (key, elem)


def test_decode_kernel_listing():
    # Shape of `nft -j list table netdev kdsr` as nft 1.0.6 prints it.
    listing = [
        {"table": {"family": "netdev", "name": "kdsr", "handle": 1}},
        {
            "map": {
                "family": "netdev",
                "name": "s",
                "table": "kdsr",
                "type": ["ipv4_addr", "inet_proto", "inet_service"],
                "handle": 4,
                "map": "verdict",
                "flags": ["interval"],
                "stmt": [{"counter": None}],
                "elem": [
                    [
                        {
                            "elem": {
                                "val": {"concat": ["10.0.0.10", "tcp", {"range": [80, 90]}]},
                                "counter": {"packets": 3, "bytes": 180},
                            }
                        },
                        {"jump": {"target": "p"}},
                    ],
                    [
                        {"elem": {"val": {"concat": ["10.0.0.10", "udp", 53]}, "counter": {"packets": 0, "bytes": 0}}},
                        {"jump": {"target": "p"}},
                    ],
                ],
            }
        },
        {
            "chain": {
                "family": "netdev",
                "table": "kdsr",
                "name": "ingress",
                "handle": 3,
                "type": "filter",
                "hook": "ingress",
                "prio": 10,
                "policy": "accept",
            }
        },
        {
            "rule": {
                "family": "netdev",
                "table": "kdsr",
                "chain": "ingress",
                "handle": 9,
                "comment": "kdsr:abc /x",
                "expr": [],
            }
        },
        {"rule": {"family": "netdev", "table": "kdsr", "chain": "ingress", "handle": 10, "expr": []}},
    ]
    text = (
        "table netdev kdsr {\n\tchain ingress {\n"
        '\t\ttype filter hook ingress device "eth0" priority filter + 10; policy accept;\n'
    )
    table = decode_table(listing, devices_from_text(text))
    nmap = table.map("s")
    assert nmap.counter and nmap.flags == ("interval",)
    assert dict(nmap.elements)[("10.0.0.10", "tcp", (80, 90))].value == ("jump", "p")
    assert ("10.0.0.10", "udp", (53, 53)) in dict(nmap.elements)
    chain = table.chain("ingress")
    assert chain.hook.device == "eth0" and chain.hook.priority == 10
    assert chain.rules[0].digest == "abc"
    assert chain.rules[1].comment.startswith("foreign")  # hand-added rule: drift
