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


def test_a_batch_with_shared_verdicts_is_the_same_batch():
    """batch_for encodes each distinct verdict once per batch: the JSON (and
    the nft text) are what one object per element gives."""
    from kdsr.diff import diff_table
    from kdsr.kernel import nft_json, nft_text
    from kdsr.model import NftMap, NftTable, element

    slots = tuple((k, element(("goto", f"server-{k % 3}"))) for k in range(12))
    services = tuple(
        (("10.0.0.1", "tcp", (p, p)), element(("jump", f"pool-{p % 2}"), f"/services/s{p}")) for p in range(4)
    )
    table = NftTable(
        family="netdev",
        name="kdsr",
        chains=(),
        maps=(
            NftMap(name="slots", key_type=("mark",), data_type="verdict", elements=slots),
            NftMap(
                name="services",
                key_type=("ipv4_addr", "inet_proto", "inet_service"),
                data_type="verdict",
                elements=services,
            ),
        ),
    )
    batch = nft_json.batch_for(diff_table(table, None, []))
    one_each = [[k, nft_json.encode_value(e.value)] for k, e in slots]
    (sent,) = [
        c["add"]["element"]["elem"]
        for c in batch
        if "element" in c.get("add", {}) and c["add"]["element"]["name"] == "slots"
    ]
    assert json.dumps(sent) == json.dumps(one_each)
    assert sent[0][1] is sent[3][1], "one object per distinct verdict"
    assert "0 : goto server-0" in nft_text.render(batch)


def test_share_verdicts_keeps_the_listing():
    from kdsr.kernel.nft_json import share_verdicts

    items = [[k, {"goto": {"target": f"server-{k % 2}"}}] for k in range(6)] + [[9, "10.0.0.1"]]
    before = json.dumps(items)
    shared = share_verdicts(items)
    assert json.dumps(shared) == before
    assert shared[0][1] is shared[2][1] and shared[0][1] is not shared[1][1]


def test_the_items_of_one_table_in_a_listing_of_its_family():
    from kdsr.kernel.nft_json import table_items

    listing = [
        {"metainfo": {"json_schema_version": 1}},
        {"table": {"family": "netdev", "name": "other"}},
        {"chain": {"family": "netdev", "table": "other", "name": "ingress", "hook": "ingress"}},
        {"table": {"family": "netdev", "name": "kdsr"}},
        {"chain": {"family": "netdev", "table": "kdsr", "name": "ingress", "hook": "ingress"}},
        {"map": {"family": "netdev", "table": "kdsr", "name": "m", "type": "mark", "map": "mark"}},
    ]
    mine = table_items(listing, "kdsr")
    assert [next(iter(i)) for i in mine] == ["table", "chain", "map"]
    assert all(next(iter(i.values())).get("table", "kdsr") == "kdsr" for i in mine)
    assert table_items(listing[:3], "kdsr") is None  # no such table


def test_devices_of_one_table_from_the_family_s_chains():
    text = (
        "table netdev other {\n\tchain ingress {\n"
        '\t\ttype filter hook ingress device "peer0" priority filter; policy accept;\n\t}\n}\n'
        "table netdev kdsr {\n\tchain ingress {\n"
        '\t\ttype filter hook ingress device "eth0" priority filter + 10; policy accept;\n\t}\n'
        "\tchain pool-x {\n\t}\n}\n"
    )
    assert devices_from_text(text, "kdsr") == {"ingress": "eth0"}
    assert devices_from_text(text, "other") == {"ingress": "peer0"}
