"""The xdp engine against the fake kernel: the map contents compile wants,
plan, apply, no-op, drift repair, drain, foreign program, destroy, and the
slot hash, which must be nft's."""

import json
from pathlib import Path

import pytest
from intent_docs import IntentDocs

from kdsr import operations
from kdsr.compile import compile_node
from kdsr.compile.selectors import selectors_for
from kdsr.errors import ForeignObjectError, IntentError
from kdsr.kernel.fake import FakeKernel
from kdsr.kernel.xdp import SELECTOR, U32

XDP = {"mode": "l2", "engine": "xdp"}
BASE = {
    "version": 1,
    "services": {
        "web": {"vip": "10.10.0.100", "ports": [80, 443], "protocols": "tcp", "pool": "web", "dsr": XDP},
        "media": {"vip": "10.10.0.101", "ports": "5000-5010", "protocols": "udp", "pool": "web", "dsr": XDP},
        "web6": {"vip": "fd00:10::100", "ports": 80, "protocols": "both", "pool": "web6", "dsr": XDP},
    },
    "pools": {
        "web": {
            "servers": [
                {"address": "10.10.0.11", "mac": "02:00:00:00:00:11"},
                {"address": "10.10.0.12", "mac": "02:00:00:00:00:12"},
                {"address": "10.10.0.13", "mac": "02:00:00:00:00:13"},
            ]
        },
        "web6": {"servers": [{"address": "fd00:10::11"}, {"address": "fd00:10::12"}]},
    },
    "load_balancers": {"lb1": {"interface": "eth0", "addresses": ["10.10.0.2/24", "fd00:10::2/64"]}},
}


intent = IntentDocs(BASE, "test.json").intent


@pytest.fixture
def kernel():
    k = FakeKernel()
    for family in ("ipv4", "ipv6"):
        k.sysctl.values[f"net/{family}/conf/eth0/forwarding"] = "0"
    return k


def run(it, kernel, store, node="lb1", adopt=False):
    prepared = operations.prepare(it, node, kernel, store, adopt=adopt)
    operations.apply(prepared, kernel, store)
    return prepared.plan


def test_compile_uses_the_nft_engines_tables():
    it = intent()
    desired = compile_node(it, "lb1")
    assert desired.tables == ()  # no nft table: every service is on xdp
    xdp = desired.xdp
    assert [s.ident for s in xdp.services] == sorted(
        [
            "tcp 10.10.0.100:80",
            "tcp 10.10.0.100:443",
            "udp 10.10.0.101:5000-5010",
            "tcp [fd00:10::100]:80",
            "udp [fd00:10::100]:80",
        ]
    )
    # The same intent on the nft engine: the same selectors and tables.
    nft = intent(lambda d: [s["dsr"].update(engine="nft") for s in d["services"].values()])
    by_name = {s.name: s.addresses() for s in selectors_for(nft)}
    assert {s.name: s.table for s in xdp.selectors} == by_name
    # Unpinned IPv6 servers are resolved by bpf_fib_lookup: forwarding on eth0 for v6 only.
    assert [s.key for s in desired.sysctls] == ["net/ipv6/conf/eth0/forwarding"]


def test_l3_mode_is_refused_at_validation():
    def l3(doc):
        doc["services"]["web"]["dsr"] = {"mode": "l3-ipip", "engine": "xdp"}

    with pytest.raises(IntentError) as err:
        intent(l3)
    text = str(err.value)
    assert "/services/web/dsr/mode" in text and "xdp engine does not do l3-ipip" in text


def test_apply_noop_drift_and_destroy(kernel, store):
    plan = run(intent(), kernel, store)
    kinds = {c.kind for c in plan.changes}
    assert {"xdp program", "xdp server", "xdp selector", "xdp service"} <= kinds
    assert kernel.xdp.io.attached["eth0"].name == "kdsr_xdp"
    # servers without a pinned MAC get a managed neighbour entry (bpf_fib_lookup finds their MAC)
    assert kernel.xdp.io.neighbours["eth0"] == {"fd00:10::11", "fd00:10::12"}
    writes = kernel.writes
    plan = run(intent(), kernel, store)
    assert plan.empty and kernel.writes == writes  # second apply: nothing

    # drift: a slot changed by hand is planned and repaired (by a flip)
    info = kernel.xdp.io.attached["eth0"]
    selectors = kernel.xdp.io.maps[info.maps["selectors"]]
    index, raw = next((k, v) for k, v in selectors.items() if SELECTOR.unpack(v)[1])
    active, size, _seed, _fields, base0, base1, _name = SELECTOR.unpack(raw)
    slots = kernel.xdp.io.maps[info.maps["slots"]]
    slot_key = U32.pack((base0, base1)[active] + 7)
    slots[slot_key] = U32.pack(4095)
    prepared = operations.prepare(intent(), "lb1", kernel, store)
    assert [(c.action, c.kind) for c in prepared.plan.changes] == [("update", "xdp selector")]
    operations.apply(prepared, kernel, store)
    assert SELECTOR.unpack(selectors[index])[0] == 1 - active  # the new table went into the other half
    assert run(intent(), kernel, store).empty

    # drift: the program detached by hand is planned and put back
    kernel.xdp.io.detach("eth0")
    plan = run(intent(), kernel, store)
    assert ("create", "xdp program") in [(c.action, c.kind) for c in plan.changes]
    assert run(intent(), kernel, store).empty

    prepared = operations.prepare_destroy("lb1", kernel, store)
    assert [(c.action, c.kind) for c in prepared.plan.changes if c.kind.startswith("xdp")] == [
        ("delete", "xdp program")
    ]
    operations.apply(prepared, kernel, store)
    assert kernel.xdp.io.attached == {} and kernel.xdp.io.maps == {}
    assert kernel.xdp.io.neighbours["eth0"] == set()
    assert store.load("lb1").xdp == set()


def test_drain_flips_one_table(kernel, store):
    run(intent(), kernel, store)

    def drain(doc):
        doc["pools"]["web"]["servers"][0]["weight"] = 0

    plan = run(intent(drain), kernel, store)
    assert [(c.action, c.kind) for c in plan.changes] == [("update", "xdp selector")]
    (change,) = plan.changes
    assert "10.10.0.11" in change.before.table and "10.10.0.11" not in change.after.table
    assert run(intent(drain), kernel, store).empty


def test_every_server_drained_drops(kernel, store):
    def drain_all(doc):
        for server in doc["pools"]["web6"]["servers"]:
            server["weight"] = 0

    run(intent(drain_all), kernel, store)
    assert run(intent(drain_all), kernel, store).empty
    assert run(intent(), kernel, store).changes  # back: the table is filled again
    assert run(intent(), kernel, store).empty


def test_foreign_program_is_refused_unless_adopted(kernel, store):
    kernel.xdp.io.foreign("eth0", "their_prog")
    with pytest.raises(ForeignObjectError) as err:
        operations.prepare(intent(), "lb1", kernel, store)
    assert err.value.exit_code == 8 and "their_prog" in str(err.value)
    assert kernel.xdp.io.attached["eth0"].name == "their_prog"
    run(intent(), kernel, store, adopt=True)
    assert kernel.xdp.io.attached["eth0"].name == "kdsr_xdp"
    assert run(intent(), kernel, store).empty


def test_destroy_leaves_a_foreign_program_alone(kernel, store):
    kernel.xdp.io.foreign("eth0", "their_prog")
    prepared = operations.prepare_destroy("lb1", kernel, store)
    assert not [c for c in prepared.plan.changes if c.kind.startswith("xdp")]
    assert kernel.xdp.io.attached["eth0"].name == "their_prog"


def test_show_lists_the_programs_services_and_servers(kernel, store):
    run(intent(), kernel, store)
    report = operations.show(kernel, store, "lb1")
    assert [p["interface"] for p in report["xdp"]] == ["eth0"]
    rows = {(s["vip"], s["protocol"], s["port"]) for s in report["services"] if s.get("engine") == "xdp"}
    assert ("10.10.0.101", "udp", "5000-5010") in rows and ("fd00:10::100", "tcp", "80") in rows
    servers = {s["server"]: s["slots"] for s in report["servers"] if s.get("engine") == "xdp"}
    assert servers["10.10.0.11"] + servers["10.10.0.12"] + servers["10.10.0.13"] == 4093
    assert "xdp program kdsr_xdp on eth0 (driver)" in operations.format_show(report)


def test_kdsr_maglev_reports_an_xdp_services_table():
    from kdsr.commands import maglev as maglev_command

    data = maglev_command.report(intent(), "web", without="10.10.0.13")
    nft = intent(lambda d: [s["dsr"].update(engine="nft") for s in d["services"].values()])
    assert data == maglev_command.report(nft, "web", without="10.10.0.13")


def test_a_program_from_an_older_object_is_replaced(kernel, store):
    from kdsr.kernel.xdp import CONFIG

    run(intent(), kernel, store)
    info = kernel.xdp.io.attached["eth0"]
    config = kernel.xdp.io.maps[info.maps["config"]]
    key = U32.pack(0)
    mac, ifindex, _digest = CONFIG.unpack(config[key])
    config[key] = CONFIG.pack(mac, ifindex, b"oldobjct")  # as an older kdsr's object left it
    plan = run(intent(), kernel, store)
    replaced = [c for c in plan.changes if c.kind == "xdp program"]
    assert [(c.action, c.reason) for c in replaced] == [("replace", "program object (build/kdsr_xdp.o)")]
    assert kernel.xdp.io.attached["eth0"].prog_id != info.prog_id
    assert run(intent(), kernel, store).empty


def test_plan_json_of_xdp_changes_matches_the_plan_schema():
    import jsonschema

    from kdsr.diff import diff
    from kdsr.model import Observed
    from kdsr.plan_format import render_json, render_text

    schema = json.loads((Path(__file__).resolve().parent.parent / "schemas" / "plan.schema.json").read_text())
    plan = diff(compile_node(intent(), "lb1"), Observed())
    doc = json.loads(render_json(plan))
    jsonschema.Draft202012Validator(schema).validate(doc)
    assert {"xdp program", "xdp server", "xdp selector", "xdp service"} <= {c["kind"] for c in doc["changes"]}
    text = render_text(plan)
    assert "+ xdp service udp 10.10.0.101:5000-5010: -> pool-web-v4-" in text
    assert "+ xdp server 10.10.0.11: MAC 02:00:00:00:00:11" in text
