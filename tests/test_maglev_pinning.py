"""Flow pinning: intent, compile, fake-kernel transitions and the nft text form."""

from __future__ import annotations

import collections
import copy
import json

import pytest

from kdsr import operations
from kdsr.compile import compile_node
from kdsr.compile import selectors as selectors_module
from kdsr.compile.effective import effective_intent
from kdsr.compile.lb_nft_l2 import PIN_KEY_MOD, pins_map_name, servers_map_name
from kdsr.compile.selectors import selectors_for, server_id
from kdsr.diff import diff
from kdsr.errors import IntentError
from kdsr.intent import parse_intent
from kdsr.intent.model import DEFAULT_PIN_MAX_FLOWS, DEFAULT_PIN_TIMEOUT, FlowPinning
from kdsr.kernel import KernelError, nft_text
from kdsr.kernel.fake import FakeKernel
from kdsr.kernel.nft_json import batch_for, decode_map
from kdsr.kernel.state import StateStore
from kdsr.model import Observed

BASE = {
    "version": 1,
    "services": {
        "web": {
            "vip": "10.10.0.100",
            "ports": 80,
            "pool": "web",
            "hashing": {"flow_pinning": {"timeout": 60, "max_flows": 4096}},
        },
        "dns": {"vip": "10.10.0.100", "ports": 53, "protocols": "udp", "pool": "web"},
        "web6": {"vip": "fd00:10::100", "ports": 80, "pool": "web6", "hashing": {"flow_pinning": True}},
    },
    "pools": {
        "web": {"servers": [{"address": f"10.10.0.{11 + i}"} for i in range(3)]},
        "web6": {"servers": [{"address": f"fd00:10::{11 + i}"} for i in range(3)]},
    },
    "load_balancers": {"lb1": {"interface": "eth0", "addresses": ["10.10.0.2/24", "fd00:10::2/64"]}},
}


def intent(mutate=None):
    doc = copy.deepcopy(BASE)
    if mutate:
        mutate(doc)
    return parse_intent(json.dumps(doc), "pinning.json")


def lb_table(it):
    (table,) = compile_node(it, "lb1").tables
    return table


def test_intent_forms():
    it = intent()
    by_name = {s.name: s for s in it.services}
    assert by_name["web"].hashing.pinning == FlowPinning(timeout=60, max_flows=4096)
    assert by_name["web6"].hashing.pinning == FlowPinning(DEFAULT_PIN_TIMEOUT, DEFAULT_PIN_MAX_FLOWS)
    assert by_name["dns"].hashing.pinning is None
    off = intent(lambda d: d["services"]["web"]["hashing"].update(flow_pinning=False))
    assert {s.name: s for s in off.services}["web"].hashing.pinning is None


@pytest.mark.parametrize(
    ("value", "pointer", "text"),
    [
        ({"timeout": 0}, "/services/web/hashing/flow_pinning/timeout", "0 is less than 1"),
        ({"max_flows": 10}, "/services/web/hashing/flow_pinning/max_flows", "10 is less than 1024"),
        ({"timeot": 5}, "/services/web/hashing/flow_pinning/timeot", 'unknown field "timeot"'),
        ("yes", "/services/web/hashing/flow_pinning", "expected a boolean or an object"),
    ],
)
def test_bad_flow_pinning_is_explained(value, pointer, text):
    with pytest.raises(IntentError) as caught:
        intent(lambda d: d["services"]["web"]["hashing"].update(flow_pinning=value))
    problems = {p.pointer: p for p in caught.value.problems}
    assert pointer in problems, caught.value
    assert text in problems[pointer].message, problems[pointer]


def test_flow_pinning_needs_the_l2_nft_fast_path():
    def ipvs(doc):
        doc["services"]["web"]["dsr"] = {"mode": "l2", "engine": "ipvs"}

    with pytest.raises(IntentError) as caught:
        intent(ipvs)
    assert any(
        p.pointer == "/services/web/hashing/flow_pinning" and "nft engine only" in p.message
        for p in caught.value.problems
    ), caught.value


def test_pinned_selector_chain_and_maps():
    it = intent()
    table = lb_table(it)
    web = next(s for s in selectors_for(it) if s.family == 4 and s.hashing.pinning)
    chain = table.chain(web.name)
    exprs = [rule.expr for rule in chain.rules]
    kinds = [[next(iter(stmt)) for stmt in e] for e in exprs]
    assert kinds == [
        ["mangle"],  # slot
        ["mangle"],  # the table's server id
        ["map"],  # pin a new flow, refresh a known one
        ["mangle"],  # the pinned server id
        ["fwd"],  # to its server (counted), when the servers map still has it
        ["map"],  # else the pin is stale: unpin
        ["mangle", "mangle", "map"],  # the table's choice, pinned afresh
        ["fwd"],
        ["drop"],  # no server at all (empty table)
    ]
    pin = exprs[2][0]["map"]
    assert pin["op"] == "update" and pin["map"] == "@pins-web-v4"
    assert pin["elem"]["elem"]["timeout"] == 60
    assert pin["elem"]["elem"]["val"]["jhash"]["mod"] == PIN_KEY_MOD
    assert exprs[4][0]["fwd"]["addr"]["map"]["data"] == "@servers-web-v4"
    unpin = exprs[5][0]["map"]
    # The kernel wants data with a dynset on a map, even to delete (EINVAL without).
    assert unpin == {"op": "delete", "map": "@pins-web-v4", "elem": pin["elem"]["elem"]["val"], "data": pin["data"]}
    assert exprs[6] == [exprs[0][0], exprs[1][0], exprs[2][0]]  # the same slot, id and pin as the first walk
    assert exprs[7] == exprs[4]
    assert len({rule.comment for rule in chain.rules}) == len(chain.rules)

    slots = table.map(web.name)
    assert slots.data_type == "mark" and len(slots.elements) == web.table_size
    ids = {server_id(m): str(m.address) for m in web.members}
    assert {elem.value for _slot, elem in slots.elements} == set(ids)
    servers = table.map(servers_map_name("web", 4))
    # Each server id -> the server's address, named in the comment, counted per element.
    assert {k: (e.value, e.comment) for k, e in servers.elements} == {k: (a, a) for k, a in ids.items()}
    assert servers.counter
    assert ids[server_id(web.members[0])] == "10.10.0.11" and server_id(web.members[0]) == 0x0A0A000B
    pins = table.map(pins_map_name("web", 4))
    assert (pins.key_type, pins.data_type, pins.flags, pins.size, pins.elements) == (
        ("integer",),
        "mark",
        ("timeout",),
        4096,
        (),
    )
    # The unpinned service on the same pool keeps the stateless selector.
    dns = next(s for s in selectors_for(it) if s.family == 4 and not s.hashing.pinning)
    assert len(table.chain(dns.name).rules) == 2 and table.map(dns.name).data_type == "mark"
    assert table.map(pins_map_name("web6", 6)).size == DEFAULT_PIN_MAX_FLOWS


def test_unpinned_selector_names_do_not_change():
    plain = intent(lambda d: d["services"]["web"]["hashing"].pop("flow_pinning"))
    names = {s.name for s in selectors_for(plain)}
    # Pinning adds to the profile only when on: the name is the one an
    # unpinned selector of this size always had.
    assert "pool-web-v4-60e94c" in names  # sha256("source-ip-port/1801745266/4093")[:6]


def test_drained_member_keeps_its_pins_and_a_removed_one_is_gone():
    def drain_and_remove(doc):
        doc["pools"]["web"]["servers"][0]["weight"] = 0
        doc["pools"]["web"]["servers"].pop()

    table = lb_table(intent(drain_and_remove))
    servers = {e.comment for _k, e in table.map(servers_map_name("web", 4)).elements}
    assert servers == {"10.10.0.11", "10.10.0.12"}
    web = next(s for s in selectors_for(intent(drain_and_remove)) if s.family == 4 and s.hashing.pinning)
    assert {e.value for _k, e in table.map(web.name).elements} == {0x0A0A000C}


def test_health_down_members_leave_the_servers_map_and_drained_ones_stay():
    """Down and drained are both weight 0 in the table; only a down member's
    pinned flows must move (its id leaves the servers map), a drained one
    keeps serving them."""
    it = intent()
    down = frozenset({("web", "10.10.0.11")})
    drained = frozenset({"10.10.0.12"})
    table = lb_table(effective_intent(it, down, drained).intent)
    servers = {e.comment for _k, e in table.map(servers_map_name("web", 4)).elements}
    assert servers == {"10.10.0.12", "10.10.0.13"}
    web = next(
        s for s in selectors_for(effective_intent(it, down, drained).intent) if s.family == 4 and s.hashing.pinning
    )
    assert {e.value for _k, e in table.map(web.name).elements} == {0x0A0A000D}
    # Drained and down at once: down wins (its pinned flows would go to a server that does not answer).
    both = effective_intent(it, frozenset({("web", "10.10.0.12")}), drained).intent
    assert {e.comment for _k, e in lb_table(both).map(servers_map_name("web", 4)).elements} == {
        "10.10.0.11",
        "10.10.0.13",
    }
    # Every server down and the pool keeps its table (health ignored): nobody is down for pinning either.
    everyone = frozenset(("web", f"10.10.0.{11 + i}") for i in range(3))
    kept = lb_table(effective_intent(it, everyone).intent)
    assert len(kept.map(servers_map_name("web", 4)).elements) == 3


def test_show_reports_maglev_shares_of_a_pinned_pool(tmp_path):
    """`kdsr show` for a pinned pool: per server its slots in the table, the
    servers map's counts, and a drained member with 0 slots, marked."""

    def drain_first(doc):
        doc["pools"]["web"]["servers"][0]["weight"] = 0

    kernel, store = FakeKernel(), StateStore(tmp_path)
    it = intent(drain_first)
    operations.apply(operations.prepare(it, "lb1", kernel, store), kernel, store)
    kernel.nft.counts[(servers_map_name("web", 4), 0x0A0A000C)] = (7, 700)
    report = operations.show(kernel, store, "lb1", it)
    web = next(s for s in selectors_for(it) if s.family == 4 and s.hashing.pinning)
    shares = dict(collections.Counter(web.addresses()))
    assert report["selectors"][web.name]["slots"] == {"10.10.0.11": 0, **shares}
    doc = operations.show_document(report)
    (service,) = [s for s in doc["services"] if s["service"] == "web" and s["vip"] == "10.10.0.100"]
    rows = {r["server"]: r for r in service["servers"]}
    assert {a: r["slots"] for a, r in rows.items()} == {"10.10.0.11": 0, **shares}
    assert sum(r["slots"] for r in rows.values()) == web.table_size
    assert rows["10.10.0.11"]["state"] == "drained" and rows["10.10.0.11"]["reason"] == "weight 0 in the intent"
    assert rows["10.10.0.12"]["state"] == "up" and (rows["10.10.0.12"]["packets"], rows["10.10.0.12"]["bytes"]) == (
        7,
        700,
    )
    # The servers and pins maps are no selectors of their own.
    assert not [n for n in report["selectors"] if n.startswith(("servers-", "pins-"))], report["selectors"]
    text = operations.format_show(report, doc)
    line = next(line for line in text.splitlines() if line.strip().startswith("10.10.0.11 "))
    assert "drained" in line and "  0.0%" in line and "weight 0" in line, text


def test_show_says_when_pinned_selectors_share_their_pools_counts(tmp_path):
    def second_profile(doc):
        doc["services"]["api"] = {
            "vip": "10.10.0.101",
            "ports": 80,
            "pool": "web",
            "hashing": {"seed": 5, "flow_pinning": {"timeout": 60, "max_flows": 4096}},
        }

    kernel, store = FakeKernel(), StateStore(tmp_path)
    it = intent(second_profile)
    operations.apply(operations.prepare(it, "lb1", kernel, store), kernel, store)
    report = operations.show(kernel, store, "lb1")
    pinned = [s for s in selectors_for(it) if s.family == 4 and s.hashing.pinning]
    assert len(pinned) == 2
    for sel in pinned:
        slots = report["selectors"][sel.name]["slots"]
        assert sum(slots.values()) == sel.table_size and len(slots) == 3
    # One counter per member of the pool, whichever selector sent the packet.
    rows = [r for r in report["servers"] if r["pool"] == "web" and r["family"] == 4]
    every = sorted(s.name for s in selectors_for(it) if s.family == 4 and s.pool.name == "web")
    assert len(rows) == 3 and {r["selector"] for r in rows} == {",".join(every)}
    assert {r["counted_in"] for r in rows} == {servers_map_name("web", 4)}


def test_pins_survive_a_new_table_size(tmp_path):
    """Growing the pool past a rung (3 -> 5 servers: 4093 -> 8191 slots) makes a new selector, but the pins stay."""
    kernel, store = FakeKernel(), StateStore(tmp_path)
    operations.apply(operations.prepare(intent(), "lb1", kernel, store), kernel, store)

    def add(doc):
        doc["pools"]["web"]["servers"] += [{"address": "10.10.0.14"}, {"address": "10.10.0.15"}]

    sizes = {s.table_size for s in selectors_for(intent(add)) if s.family == 4 and s.hashing.pinning}
    assert sizes == {8191}
    plan = operations.prepare(intent(add), "lb1", kernel, store).plan
    touched = {(c.kind, c.ident.split("/")[1].split("[")[0], c.action) for c in plan.changes}
    for name in (pins_map_name("web", 4), servers_map_name("web", 4)):
        assert not [t for t in touched if t[1] == name and t[0] != "nft element"], touched
    assert ("nft element", servers_map_name("web", 4), "create") in touched
    assert ("nft map", pins_map_name("web", 4), "create") not in touched
    operations.apply(operations.prepare(intent(add), "lb1", kernel, store), kernel, store)
    assert operations.prepare(intent(add), "lb1", kernel, store).plan.empty


def test_second_apply_of_a_pinned_intent_writes_nothing(tmp_path):
    kernel, store = FakeKernel(), StateStore(tmp_path)
    operations.apply(operations.prepare(intent(), "lb1", kernel, store), kernel, store)
    writes = kernel.writes
    assert operations.prepare(intent(), "lb1", kernel, store).plan.empty
    assert kernel.writes == writes


def test_ipv6_server_id_collision_is_an_error(monkeypatch):
    monkeypatch.setattr(selectors_module, "server_id", lambda member: 7)
    with pytest.raises(IntentError) as caught:
        compile_node(intent(), "lb1")
    assert "share one" in str(caught.value)


def test_pinned_maps_read_back_without_their_flows():
    listed = {
        "name": "pins-web-v4",
        "type": "integer",
        "map": "mark",
        "flags": ["timeout"],
        "size": 4096,
        "elem": [[123, 168427531]],
    }
    decoded = decode_map(listed)
    assert decoded.elements == () and decoded.size == 4096 and decoded.timeout is None
    assert decode_map({"name": "m", "type": "mark", "map": "mark", "size": 9, "elem": [[1, 2]]}).elements


def batch(it) -> list[dict]:
    return [cmd for td in diff(compile_node(it, "lb1"), Observed()).tables for cmd in batch_for(td)]


def test_text_form_of_a_pinned_batch():
    commands = batch(intent())
    assert nft_text.needs_text(commands)
    text = nft_text.render(commands)
    assert "add map netdev kdsr pins-web-v4 { typeof symhash mod 2 : meta mark; flags timeout; size 4096; }" in text
    assert (
        "update @pins-web-v4 { jhash ip saddr . ip daddr . meta l4proto . th sport . th dport "
        "mod 2147483647 seed 0x6b647372 timeout 60s : meta mark }"
    ) in text
    assert 'fwd ip6 to meta mark map @servers-web6-v6 device "eth0"' in text
    assert "add map netdev kdsr servers-web6-v6 { type mark : ipv6_addr; counter; }" in text
    assert len(text.splitlines()) == len(commands)


def test_unpinned_batches_stay_json():
    plain = intent(lambda d: [s.get("hashing", {}).pop("flow_pinning", None) for s in d["services"].values()])
    assert not nft_text.needs_text(batch(plain))


def test_text_form_passes_listed_statements_through_and_refuses_the_unknown():
    rule = {
        "add": {
            "rule": {
                "family": "netdev",
                "table": "kdsr",
                "chain": "c",
                "expr": ["update @p { meta mark : meta mark }", {"drop": None}],
                "comment": "kdsr:1 /x",
            }
        }
    }
    assert nft_text.needs_text([rule])
    assert (
        nft_text.render([rule])
        == 'add rule netdev kdsr c update @p { meta mark : meta mark } drop comment "kdsr:1 /x"\n'
    )
    rule["add"]["rule"]["expr"] = [{"queue": {"num": 1}}]
    with pytest.raises(KernelError, match="queue"):
        nft_text.render([rule])
