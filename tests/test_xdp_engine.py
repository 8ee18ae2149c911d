"""The xdp engine against the fake kernel: the map contents compile wants,
plan, apply, no-op, drift repair, drain, foreign program, destroy, and the
slot hash, which must be nft's."""

import ipaddress
import json
from pathlib import Path

import pytest
from intent_docs import IntentDocs

from kdsr import operations
from kdsr.compile import compile_node, lb_nft_l3
from kdsr.compile.selectors import selectors_for
from kdsr.compile.targets import targets_for
from kdsr.errors import ForeignObjectError
from kdsr.kernel.fake import FakeKernel
from kdsr.kernel.xdp import CONFIG, COUNTER, SELECTOR, U32, service_key

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


L3 = {
    "version": 1,
    "services": {
        "web": {"vip": "10.9.0.100", "ports": [80, 443], "protocols": "tcp", "pool": "web",
                "dsr": {"mode": "l3-ipip", "engine": "xdp", "path_mtu": 1400}},
        "dns": {"vip": "10.9.0.100", "ports": 53, "protocols": "both", "pool": "web",
                "dsr": {"mode": "l3-ipip", "engine": "xdp"}},
        "media": {"vip": "10.9.0.101", "ports": "5000-5010", "protocols": "udp", "pool": "web",
                  "dsr": {"mode": "l3-gre", "engine": "xdp"}},
        "web6": {"vip": "fd00:9::100", "ports": 80, "protocols": "both", "pool": "web6",
                 "dsr": {"mode": "l3-ip6tnl", "engine": "xdp"}},
    },
    "pools": {
        "web": {"servers": [{"address": "10.3.0.11"}, {"address": "10.3.0.12"}, {"address": "10.3.0.13"}]},
        "web6": {"servers": [{"address": "fd00:3::11"}, {"address": "fd00:3::12"}]},
    },
    "load_balancers": {"lb1": {"interface": "eth0", "addresses": ["10.2.0.2/24", "fd00:2::2/64"]}},
}  # fmt: skip
l3_intent = IntentDocs(L3, "l3.json").intent


def on_nft(doc):
    for service in doc["services"].values():
        service["dsr"]["engine"] = "nft"


def test_l3_modes_compile_to_the_nft_engines_l3_tables():
    """ipip, gre and ip6tnl on the xdp engine: the selectors (names, sizes,
    seeds, slot -> server tables) of the same intent on the nft engine's L3
    path, each with its tunnel and the path MTU the nft engine's "too big"
    rule uses; the tunnels' source is the nft engine's (the load balancer's
    first address of the family); no tunnel link, route or module: the
    program pushes the outer header itself."""
    desired = compile_node(l3_intent(), "lb1")
    assert desired.tables == () and desired.links == () and desired.routes == () and desired.modules == ()
    xdp = desired.xdp
    nft = compile_node(l3_intent(on_nft), "lb1")
    nft_tables = {s.name: s for s in selectors_for(l3_intent(on_nft), lb_nft_l3.wanted)}
    assert {s.name: (s.table, s.mode, s.size) for s in xdp.selectors} == {
        name: (s.addresses(), s.mode, s.table_size) for name, s in nft_tables.items()
    }
    assert {s.mode: s.path_mtu for s in xdp.selectors} == {"l3-ipip": 1400, "l3-gre": 1500, "l3-ip6tnl": 1500}
    assert (xdp.source4, xdp.source6) == ("10.2.0.2", "fd00:2::2")
    assert {link.local for link in nft.links} == {"10.2.0.2", "fd00:2::2"}  # the nft engine's tunnel source
    assert {s.address: (s.mac, s.neighbour) for s in xdp.servers} == {
        a: ("", False) for a in ("10.3.0.11", "10.3.0.12", "10.3.0.13", "fd00:3::11", "fd00:3::12")
    }
    assert [s.ident for s in xdp.services] == sorted(
        ["tcp 10.9.0.100:80", "tcp 10.9.0.100:443", "tcp 10.9.0.100:53", "udp 10.9.0.100:53",
         "udp 10.9.0.101:5000-5010", "tcp [fd00:9::100]:80", "udp [fd00:9::100]:80"]
    )  # fmt: skip
    # bpf_fib_lookup needs forwarding on the front interface; the packets the
    # program hands the stack to forward need IPv6 forwarding in `all`, and
    # accept_local for their IPv4 source, this balancer's own address.
    assert {s.key: s.value for s in desired.sysctls} == {
        "net/ipv4/conf/eth0/forwarding": "1",
        "net/ipv4/conf/eth0/accept_local": "1",
        "net/ipv6/conf/eth0/forwarding": "1",
        "net/ipv6/conf/all/forwarding": "1",
    }


def test_l2_and_l3_selectors_are_sized_apart_as_the_nft_engine_sizes_them():
    """Each set within its own slot budget: a pool on both l2 and l3-ipip
    gets the same two tables as on the nft engine."""

    def both(doc):
        doc["services"]["lan"] = {"vip": "10.2.0.100", "ports": 80, "protocols": "tcp", "pool": "web",
                                  "dsr": {"mode": "l2", "engine": "xdp"}}  # fmt: skip
        doc["pools"]["web"]["servers"] = [{"address": f"10.2.0.{10 + i}"} for i in range(1, 4)]
        for service in doc["services"].values():
            service.setdefault("hashing", {})["table_size"] = 65537
        doc["pools"]["extra"] = {"servers": [{"address": f"10.2.0.{50 + i}"} for i in range(1, 4)]}
        doc["services"]["big"] = {"vip": "10.2.0.101", "ports": 80, "protocols": "tcp", "pool": "extra",
                                  "dsr": {"mode": "l2", "engine": "xdp"}, "hashing": {"table_size": 65537}}  # fmt: skip
        del doc["services"]["web6"]

    xdp = compile_node(l3_intent(both), "lb1").xdp
    nft = l3_intent(lambda d: (both(d), on_nft(d)))
    expected = selectors_for(nft) + selectors_for(nft, lb_nft_l3.wanted)
    assert sorted((s.name, s.size) for s in xdp.selectors) == sorted((s.name, s.table_size) for s in expected)
    assert {s.mode for s in xdp.selectors} == {"l2", "l3-ipip", "l3-gre"}


def test_a_dsr_monitor_of_an_l3_pool_gets_the_nft_engines_tunnels_for_its_probes():
    """The balancer's own probe, marked for one server, leaves through the
    tunnel link, table and rule the nft engine makes for that server."""

    def monitored(doc):
        doc["pools"]["web"]["health"] = {"type": "tcp", "port": 80}

    desired = compile_node(l3_intent(monitored), "lb1")
    nft = compile_node(l3_intent(lambda d: (monitored(d), on_nft(d))), "lb1")
    ipip = {link for link in nft.links if link.kind == "ipip"}
    assert set(desired.links) == ipip and len(ipip) == 3
    assert {r for r in desired.routes} == {r for r in nft.routes if r.family == 4 and r.dev in {x.name for x in ipip}}
    assert {r.fwmark for r in desired.rules} == {t.mark for t in targets_for(l3_intent(monitored))}
    assert desired.modules == ("ipip",)


def test_flow_pinning_is_still_refused_on_the_xdp_engine():
    def pinned(doc):
        doc["services"]["web"]["hashing"] = {"flow_pinning": True}

    problems = l3_intent_problems(pinned)
    assert (
        "flow pinning is available for L2 DSR with the nft engine only"
        in problems["/services/web/hashing/flow_pinning"]
    )
    problems = IntentDocs(BASE, "test.json").problems(
        lambda d: d["services"]["web"].update(hashing={"flow_pinning": True})
    )
    hint = problems["/services/web/hashing/flow_pinning"]
    assert "The xdp engine keeps no per-flow state; remove flow_pinning, or use mode l2 with engine nft." in hint


l3_intent_problems = IntentDocs(L3, "l3.json").problems


def test_l3_apply_writes_tunnel_sources_and_path_mtus_and_changes_them_in_place(kernel, store):
    kernel.sysctl.values.update({"net/ipv4/conf/eth0/accept_local": "0", "net/ipv6/conf/all/forwarding": "0"})
    run(l3_intent(), kernel, store, node="lb1")
    info = kernel.xdp.io.attached["eth0"]
    maps = kernel.xdp.io.maps
    mac, _ifindex, _digest, source4, source6 = CONFIG.unpack(maps[info.maps["config"]][U32.pack(0)])
    assert (source4, source6) == (bytes([10, 2, 0, 2]), ipaddress.ip_address("fd00:2::2").packed)
    descriptors = {d[8].rstrip(b"\0").decode(): d for d in map(SELECTOR.unpack, maps[info.maps["selectors"]].values())}
    encaps = [(d[6], d[7]) for d in descriptors.values() if d[1]]
    assert sorted(encaps) == [(1, 1400), (2, 1500), (3, 1500)]  # ENCAP_IPIP, _GRE, _IP6TNL and their MTUs
    assert kernel.sysctl.values["net/ipv4/conf/eth0/accept_local"] == "1"
    assert run(l3_intent(), kernel, store).empty

    # path_mtu: the selector's descriptor, rewritten in place (no flip: the table is the same)
    def mtu(doc):
        doc["services"]["web"]["dsr"]["path_mtu"] = 1300

    before = dict(maps[info.maps["selectors"]])
    plan = run(l3_intent(mtu), kernel, store)
    assert [(c.action, c.kind) for c in plan.changes] == [("update", "xdp selector")]
    (changed,) = [k for k, v in maps[info.maps["selectors"]].items() if before[k] != v]
    old, new = SELECTOR.unpack(before[changed]), SELECTOR.unpack(maps[info.maps["selectors"]][changed])
    assert (old[0], old[7], new[0], new[7]) == (old[0], 1400, old[0], 1300)
    assert run(l3_intent(mtu), kernel, store).empty

    # the load balancer's address changes: the tunnels' source does
    def moved(doc):
        mtu(doc)
        doc["load_balancers"]["lb1"]["addresses"] = ["10.2.0.7/24", "fd00:2::2/64"]

    plan = run(l3_intent(moved), kernel, store)
    assert [(c.action, c.kind, c.reason) for c in plan.changes] == [("update", "xdp config", "tunnel source")]
    assert CONFIG.unpack(maps[info.maps["config"]][U32.pack(0)])[3] == bytes([10, 2, 0, 7])
    assert run(l3_intent(moved), kernel, store).empty
    text = operations.format_show(operations.show(kernel, store, "lb1"))
    assert "xdp program kdsr_xdp on eth0 (driver)" in text and "too_big 0" in text

    prepared = operations.prepare_destroy("lb1", kernel, store)
    operations.apply(prepared, kernel, store)
    assert kernel.xdp.io.attached == {}
    assert kernel.sysctl.values["net/ipv4/conf/eth0/accept_local"] == "0"


def test_kdsr_maglev_reports_an_xdp_l3_services_table():
    from kdsr.commands import maglev as maglev_command

    data = maglev_command.report(l3_intent(), "media", without="10.3.0.13")
    assert data == maglev_command.report(l3_intent(on_nft), "media", without="10.3.0.13")


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
    active, size, _seed, _fields, base0, base1, _encap, _mtu, _name = SELECTOR.unpack(raw)
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
    run(intent(), kernel, store)
    info = kernel.xdp.io.attached["eth0"]
    config = kernel.xdp.io.maps[info.maps["config"]]
    key = U32.pack(0)
    mac, ifindex, _digest, source4, source6 = CONFIG.unpack(config[key])
    config[key] = CONFIG.pack(mac, ifindex, b"oldobjct", source4, source6)  # as an older kdsr's object left it
    # what the old program counted: 3 and 4 packets on two CPUs
    stats = kernel.xdp.io.maps[info.maps["server_stats"]]
    index = next(iter(kernel.xdp.io.maps[info.maps["servers"]]))
    stats[index] = COUNTER.pack(3, 300) + COUNTER.pack(4, 400)
    kernel.xdp.io.maps[info.maps["service_stats"]][service_key("10.10.0.100", "tcp", 80)] = COUNTER.pack(5, 50) * 2
    before = kernel.xdp.counters("eth0")
    plan = run(intent(), kernel, store)
    replaced = [c for c in plan.changes if c.kind == "xdp program"]
    assert [(c.action, c.reason) for c in replaced] == [("replace", "program object (build/kdsr_xdp.o)")]
    assert kernel.xdp.io.attached["eth0"].prog_id != info.prog_id
    # the new program's maps are new: the old counts are carried into them (monotonic counters)
    after = kernel.xdp.counters("eth0")
    assert after["servers"] == before["servers"] and after["services"] == before["services"]
    assert (7, 700) in after["servers"].values() and after["services"]["tcp 10.10.0.100:80"] == (10, 100)
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


def test_a_read_after_a_hand_edit_sees_it_although_the_last_read_is_kept(kernel, store):
    """The backend keeps what it decoded with the bytes it decoded it from:
    every read still reads the maps, so an edit between two reads of the
    same process (a services element deleted, a slot and a server changed)
    shows in the second."""
    run(intent(), kernel, store)
    backend, io = kernel.xdp, kernel.xdp.io
    first, _ = backend.read("eth0")
    assert backend.read("eth0")[0] == first  # unchanged maps: the same state
    info = io.attached["eth0"]
    services = io.maps[info.maps["services"]]
    gone = next(iter(services))
    del services[gone]
    selectors = io.maps[info.maps["selectors"]]
    raw = next(v for v in selectors.values() if SELECTOR.unpack(v)[1])
    active, _size, _seed, _fields, base0, base1, *_rest, name = SELECTOR.unpack(raw)
    io.maps[info.maps["slots"]][U32.pack((base0, base1)[active])] = U32.pack(0xFFFFFFFF)
    second, _ = backend.read("eth0")
    assert len(second.services) == len(first.services) - 1
    table = {s.name: s.table for s in second.selectors}[name.rstrip(b"\0").decode()]
    assert table[0] == "" and table[1:] == {s.name: s.table for s in first.selectors}[name.rstrip(b"\0").decode()][1:]
    prepared = operations.prepare(intent(), "lb1", kernel, store)
    assert sorted((c.action, c.kind) for c in prepared.plan.changes) == [
        ("create", "xdp service"),
        ("update", "xdp selector"),
    ]
    operations.apply(prepared, kernel, store)
    assert backend.read("eth0")[0] == first
    assert run(intent(), kernel, store).empty


class _RefusingBatchLib:
    """libbpf as a kernel without batch operations answers (EINVAL), over a dict."""

    def __init__(self, elements: dict[bytes, bytes]) -> None:
        self.elements = elements

    def bpf_map_lookup_batch(self, *args):
        import ctypes

        ctypes.set_errno(22)
        return -1

    def bpf_map_get_next_key(self, fd, prev, nxt):
        keys = sorted(self.elements)
        after = [k for k in keys if prev is None or k > prev.raw]
        if not after:
            return -1
        nxt.raw = after[0]
        return 0

    def bpf_map_lookup_elem(self, fd, key, buf):
        value = self.elements.get(bytes(key))
        if value is None:
            return -1
        buf.raw = value
        return 0


def test_libbpf_reads_fall_back_to_the_element_loop_where_batches_are_refused():
    from kdsr.kernel.xdp import LibbpfIO, _MapMeta

    elements = {service_key("10.0.0.1", "tcp", 80): U32.pack(3), service_key("10.0.0.2", "udp", 53): U32.pack(4)}
    io = LibbpfIO()
    io._lib = _RefusingBatchLib(elements)
    io._fds[7] = -1
    io._meta[7] = _MapMeta("services", len(next(iter(elements))), 4, 64, False, False)
    keys, values = io.dump(7)
    assert keys == b"".join(sorted(elements)) and values == b"".join(elements[k] for k in sorted(elements))
    assert 7 in io._no_batch  # asked once, not on every read
    array = {U32.pack(i): U32.pack(i * 10) for i in range(5)}
    io._lib = _RefusingBatchLib(array)
    io._meta[8] = _MapMeta("slots", 4, 4, 5, False, False)
    io._fds[8] = -1
    assert io.array(8, 5) == b"".join(U32.pack(i * 10) for i in range(5))
    assert io.lookup_range(8, 2, 2) == [U32.pack(20), U32.pack(30)]


def test_a_kept_read_is_compiles_own_objects_and_a_hand_edit_still_shows(kernel, store):
    """After a plan or read-back found the maps equal to compile's state,
    the backend hands back compile's objects for the same bytes
    (XdpBackend.adopt), so the daemon's next diff, converge and receipt stop
    at identity; a hand edit after that is still read, planned and repaired."""
    from kdsr.compile import CompileCache

    cache = CompileCache()
    it = intent()
    prepared = operations.prepare(it, "lb1", kernel, store, cache=cache)
    operations.apply(prepared, kernel, store)
    again = operations.prepare(it, "lb1", kernel, store, cache=cache)
    assert again.plan.empty
    want = again.desired.xdp
    assert want is not None and want.services is prepared.desired.xdp.services  # compile's cache
    have, _ = kernel.xdp.read("eth0")
    assert have.services is want.services
    assert all(h is w for h, w in zip(have.selectors, want.selectors, strict=True))
    io = kernel.xdp.io
    info = io.attached["eth0"]
    del io.maps[info.maps["services"]][next(iter(io.maps[info.maps["services"]]))]
    selectors = io.maps[info.maps["selectors"]]
    raw = next(v for v in selectors.values() if SELECTOR.unpack(v)[1])
    active, _size, _seed, _fields, base0, base1, *_rest, _name = SELECTOR.unpack(raw)
    io.maps[info.maps["slots"]][U32.pack((base0, base1)[active])] = U32.pack(0xFFFFFFFF)
    edited, _ = kernel.xdp.read("eth0")
    assert edited.services is not want.services and len(edited.services) == len(want.services) - 1
    repaired = operations.prepare(it, "lb1", kernel, store, cache=cache)
    assert sorted((c.action, c.kind) for c in repaired.plan.changes) == [
        ("create", "xdp service"),
        ("update", "xdp selector"),
    ]
    operations.apply(repaired, kernel, store)
    assert kernel.xdp.read("eth0")[0] == want
    assert operations.prepare(it, "lb1", kernel, store, cache=cache).plan.empty


def test_a_converge_that_fails_part_way_is_undone_to_the_maps_it_found(kernel, store, monkeypatch):
    """The xdp step's undo converges back to what converge read before its
    first write (no read of its own): a services write refused after the
    changed table went in (its active half flipped) leaves the maps holding
    what they held, and the apply says the previous state was restored."""
    from kdsr.errors import ApplyError
    from kdsr.kernel import KernelError

    run(intent(), kernel, store)
    io = kernel.xdp.io
    info = io.attached["eth0"]
    selectors_before = dict(io.maps[info.maps["selectors"]])
    services_before = dict(io.maps[info.maps["services"]])
    first, _ = kernel.xdp.read("eth0")
    doc = json.loads(json.dumps(BASE))
    doc["pools"]["web"]["servers"][0]["weight"] = 0
    doc["services"]["web"]["ports"] = [80, 443, 8080]
    real, written = io.update, []

    def refusing(map_id, key, value):
        if map_id == info.maps["services"] and not written:
            written.append(key)
            raise KernelError("BPF map: update: No space left on device")
        real(map_id, key, value)

    monkeypatch.setattr(io, "update", refusing)
    with pytest.raises(ApplyError, match="previous state was restored"):
        run(IntentDocs(doc, "test.json").intent(), kernel, store)
    assert written, "the services write was never tried"
    # The old table written again into the half made inactive, and that half active again.
    assert io.maps[info.maps["selectors"]] == selectors_before
    assert io.maps[info.maps["services"]] == services_before
    assert kernel.xdp.read("eth0")[0] == first
    assert run(intent(), kernel, store).empty
