"""L3 modes (tunnels, policy routing) and the IPVS engine against the fake
kernel: what gets created, idempotence, canonical IPVS order whatever the
history, in-place changes, rollback at every step, modules, ownership."""

import copy
import dataclasses
import json
from ipaddress import ip_address
from pathlib import Path

import pytest

from kdsr import naming, operations
from kdsr.compile.lb_nft_l2 import servers_map_name
from kdsr.errors import ApplyError, ForeignObjectError, KernelFeatureError
from kdsr.intent import parse_intent
from kdsr.kernel.fake import FakeKernel
from kdsr.kernel.state import StateStore
from kdsr.model import Link
from kdsr.plan_format import render_text

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
LB_SYSCTLS = ["net/ipv4/ip_forward", "net/ipv6/conf/all/forwarding"] + [
    f"net/ipv4/vs/{k}" for k in ("expire_nodest_conn", "sloppy_tcp", "schedule_icmp")
]
SERVER_SYSCTLS = [
    f"net/ipv4/conf/{s}/{n}" for s in ("all", "eth0") for n in ("arp_ignore", "arp_announce", "rp_filter")
]


def example(name, mutate=None):
    doc = json.loads((EXAMPLES / f"{name}.json").read_text())
    if mutate:
        mutate(doc)
    return parse_intent(json.dumps(doc), f"{name}.json")


@pytest.fixture
def kernel():
    k = FakeKernel()
    k.sysctl.values.update({key: "0" for key in LB_SYSCTLS + SERVER_SYSCTLS})
    k.sysctl.values["net/ipv4/conf/all/rp_filter"] = "1"  # strict, as many distributions ship
    return k


def run(it, node, kernel, store, adopt=False):
    prepared = operations.prepare(it, node, kernel, store, adopt=adopt)
    operations.apply(prepared, kernel, store)
    return prepared.plan


def plan_of(it, node, kernel, store):
    return operations.prepare(it, node, kernel, store).plan


def snapshot(k: FakeKernel):
    return copy.deepcopy(
        (
            k.nft.tables,
            k.links.tunnels,
            sorted(k.links.routes),
            sorted(k.links.rules),
            k.ipvs.services,
            k.sysctl.values,
            k.links.addresses,
        )
    )


# ---------------------------------------------------------------- nft engine, L3


def test_l3_ipip_load_balancer_gets_a_tunnel_route_and_rule_per_server(kernel, store):
    it = example("l3-ipip")
    plan = run(it, "lb1", kernel, store)
    servers = ["10.3.0.11", "10.3.0.12", "10.3.0.13"]
    for address in servers:
        name = naming.tunnel_name("l3-ipip", address)
        assert kernel.links.tunnels[name] == Link(name, "ipip", "10.2.0.2", address, 64)
        mark = naming.tunnel_mark("l3-ipip", address)
        assert any(r.table == mark and r.dev == name for r in kernel.links.routes)
        assert any(r.fwmark == mark and r.table == mark for r in kernel.links.rules)
    assert kernel.sysctl.values["net/ipv4/ip_forward"] == "1"
    # The L3 chains live in the netdev table (hashed and handed to the
    # tunnel at ingress); no inet table without IPVS port ranges.
    assert ("netdev", "kdsr") in kernel.nft.tables and ("inet", "kdsr") not in kernel.nft.tables
    # Every slot of the selector map holds one of the three servers' ids,
    # which the pool's servers map turns into the server's tunnel mark (and counts).
    table = kernel.nft.read_table("netdev", "kdsr")
    slot_maps = [m for m in table.maps if m.name.startswith("pool-")]
    assert len(slot_maps) == 1
    marks = {naming.tunnel_mark("l3-ipip", a): a for a in servers}
    ids = {int(ip_address(a)): a for a in servers}
    assert {e.value for _k, e in slot_maps[0].elements} == set(ids)
    counted = table.map(servers_map_name("web", 4, "l3-ipip"))
    assert counted.counter
    assert {k: (e.value, e.comment) for k, e in counted.elements} == {
        k: (naming.tunnel_mark("l3-ipip", a), a) for k, a in ids.items()
    }
    # ... and each mark names its server and the server's tunnel link.
    maps = {m.name: m for m in table.maps}
    assert {k: e.value for k, e in maps["l3-tunnels-v4"].elements} == marks
    assert {k: e.value for k, e in maps["l3-tunnel-links"].elements} == {
        mark: naming.tunnel_name("l3-ipip", a) for mark, a in marks.items()
    }
    assert table.chain("l3-ingress").hook.device == "eth0"
    text = render_text(plan)
    assert "+ link kdsri-" in text and "+ route ipv4 table" in text and "+ rule ipv4 pref 1000 fwmark" in text
    assert plan_of(it, "lb1", kernel, store).empty


def test_show_lists_l3_services_and_counts_per_server_not_per_mark(kernel, store):
    run(example("l3-ipip"), "lb1", kernel, store)
    report = operations.show(kernel, store, "lb1")
    assert report["tables"] == ["netdev kdsr"]
    assert {(s["vip"], s["port"]) for s in report["services"]} >= {("10.9.0.100", "53")}
    servers = {s["server"] for s in report["servers"]}
    assert servers == {"10.3.0.11", "10.3.0.12", "10.3.0.13"}
    assert sum(s["slots"] for s in report["servers"]) == 4093


def test_a_replaced_tunnel_link_gets_its_link_map_element_sent_again(kernel, store):
    # nft keeps the link map's elements as interface indexes, and a link made
    # again gets a new one: the plan re-sends those elements though they read
    # back unchanged, and only those.
    run(example("l3-ipip"), "lb1", kernel, store)

    def move(doc):
        doc["load_balancers"]["lb1"]["addresses"][0] = "10.2.0.3/24"

    plan = plan_of(example("l3-ipip", move), "lb1", kernel, store)
    replaced = sorted(c.ident for c in plan.of_kind("link") if c.action == "replace")
    assert len(replaced) == 3
    (td,) = [t for t in plan.tables if (t.family, t.name) == ("netdev", "kdsr")]
    marks = sorted(naming.tunnel_mark("l3-ipip", a) for a in ("10.3.0.11", "10.3.0.12", "10.3.0.13"))
    assert td.elements_delete == {"l3-tunnel-links": marks}
    assert sorted(e.value for _k, e in td.elements_add["l3-tunnel-links"]) == replaced
    assert set(td.elements_add) == {"l3-tunnel-links"} and not (td.chains_rebuild or td.maps_replace)
    resent = [c for c in plan.of_kind("nft element") if "l3-tunnel-links" in c.ident]
    assert len(resent) == 3 and all(c.reason.startswith("link kdsri-") for c in resent)
    operations.apply(operations.prepare(example("l3-ipip", move), "lb1", kernel, store), kernel, store)
    assert plan_of(example("l3-ipip", move), "lb1", kernel, store).empty


def test_l3_server_decapsulates_loosens_rp_filter_and_clamps_mss(kernel, store):
    it = example("l3-ipip")
    run(it, "s1", kernel, store)
    assert kernel.links.tunnels["kdsr-ipip"] == Link("kdsr-ipip", "ipip", "10.3.0.11", "", 64)
    # rp_filter drops packets on an IPv4 interface without an address: the VIPs go there too.
    assert {(a.cidr, a.label) for a in kernel.links.addresses["kdsr-ipip"]} == {
        ("10.9.0.100/32", "kdsr-ipip:kdsr"),
        ("10.9.0.101/32", "kdsr-ipip:kdsr"),
    }
    assert kernel.sysctl.values["net/ipv4/conf/all/rp_filter"] == "2"
    assert kernel.sysctl.values["net/ipv4/conf/kdsr-ipip/rp_filter"] in ("0", "2")
    assert kernel.sysctl.values["net/ipv4/conf/eth0/rp_filter"] == "0"  # 0 already lets decapsulated packets in
    table = kernel.nft.read_table("inet", "kdsr")
    assert table.chain("clamp-1440") is not None  # 1500 - 20 (ipip) - 20 (IP) - 20 (TCP)
    clamp_keys = [k for k, _e in table.map("mss-v4").elements]
    assert ("10.9.0.100", (80, 80)) in clamp_keys and ("10.9.0.100", (53, 53)) in clamp_keys
    assert ("10.9.0.101", (5000, 5010)) not in clamp_keys  # UDP only: nothing to clamp
    assert plan_of(it, "s1", kernel, store).empty


def test_mode_change_replaces_tunnels_and_names_the_field(kernel, store):
    run(example("l3-ipip"), "lb1", kernel, store)

    def to_other_lb_address(doc):
        doc["load_balancers"]["lb1"]["addresses"][0] = "10.2.0.7/24"

    plan = plan_of(example("l3-ipip", to_other_lb_address), "lb1", kernel, store)
    replaced = [c for c in plan.changes if c.kind == "link"]
    assert replaced and all(c.action == "replace" and c.reason == "local 10.2.0.2 -> 10.2.0.7" for c in replaced)
    # The routes hanging off a replaced link come back with it.
    assert sorted(c.ident for c in plan.changes if c.kind == "route" and c.action == "replace")
    run(example("l3-ipip", to_other_lb_address), "lb1", kernel, store)
    assert plan_of(example("l3-ipip", to_other_lb_address), "lb1", kernel, store).empty
    assert all(link.local == "10.2.0.7" for link in kernel.links.tunnels.values())


def test_l3_destroy_removes_everything_kdsr_made_and_nothing_else(kernel, store):
    kernel.links.tunnels["kdsr-manual"] = Link("kdsr-manual", "ipip", "10.2.0.2", "10.3.0.99")  # not ours
    kernel.links.interfaces.add("kdsr-manual")
    before = snapshot(kernel)
    run(example("l3-ipip"), "lb1", kernel, store)
    prepared = operations.prepare_destroy("lb1", kernel, store)
    operations.apply(prepared, kernel, store)
    assert snapshot(kernel) == before


# ---------------------------------------------------------------- ipvs engine


def dest_order(kernel, ident):
    return [d.address for d in kernel.ipvs.services[ident].dests]


def test_ipvs_services_use_mh_with_flags_and_canonical_destination_order(kernel, store):
    run(example("l3-gre-ipvs"), "lb1", kernel, store)
    web = kernel.ipvs.services["tcp 10.9.0.100:80"]
    assert web.scheduler == "mh" and web.flags == ("mh-fallback", "mh-port")
    assert [(d.address, d.method, d.tun_type) for d in web.dests] == [
        ("10.3.0.11", "tunnel", "gre"),
        ("10.3.0.12", "tunnel", "gre"),
        ("10.3.0.13", "tunnel", "gre"),
    ]
    # The port range is a fwmark service, marked by the inet kdsr table.
    mark = naming.ipvs_fwmark(4, "udp", "10.9.0.101", 5000, 5010)
    assert f"fwmark {mark:#x} ipv4" in kernel.ipvs.services
    table = kernel.nft.read_table("inet", "kdsr")
    assert dict(table.map("ipvs-marks-v4").elements)[("10.9.0.101", "udp", (5000, 5010))].value == mark
    # The VIPs are local (on lo for L3); the IPVS sysctls are set.
    assert {a.cidr for a in kernel.links.addresses["lo"]} == {"10.9.0.100/32", "10.9.0.101/32"}
    assert kernel.sysctl.values["net/ipv4/vs/sloppy_tcp"] == "1"
    assert plan_of(example("l3-gre-ipvs"), "lb1", kernel, store).empty


def with_servers(*hosts):
    def mutate(doc):
        doc["pools"]["web"]["servers"] = [{"address": f"10.3.0.{h}"} for h in hosts]

    return mutate


def test_two_directors_with_different_histories_hold_the_same_list(tmp_path):
    fresh, churned = FakeKernel(), FakeKernel()
    for k in (fresh, churned):
        k.sysctl.values.update({key: "0" for key in LB_SYSCTLS})
    run(example("l3-gre-ipvs", with_servers(11, 12, 13, 14)), "lb1", fresh, StateStore(tmp_path / "a"))
    history = [(13,), (13, 11), (14, 13, 11, 12, 15), (12, 14), (14, 12, 11, 13)]
    for hosts in history:
        run(example("l3-gre-ipvs", with_servers(*hosts)), "lb1", churned, StateStore(tmp_path / "b"))
    assert churned.ipvs.services == fresh.ipvs.services
    assert dest_order(churned, "tcp 10.9.0.100:80") == ["10.3.0.11", "10.3.0.12", "10.3.0.13", "10.3.0.14"]


def test_a_weight_change_edits_in_place_and_never_recreates(kernel, store):
    run(example("l3-gre-ipvs"), "lb1", kernel, store)

    def heavier(doc):
        doc["pools"]["web"]["servers"][1]["weight"] = 3

    kernel.ops.clear()
    run(example("l3-gre-ipvs", heavier), "lb1", kernel, store)
    assert kernel.ops and all(op.startswith("ipvs dest edit") for op in kernel.ops), kernel.ops
    assert {d.weight for d in kernel.ipvs.services["tcp 10.9.0.100:80"].dests} == {1, 3}


def test_adding_the_canonically_first_server_touches_only_it(kernel, store):
    run(example("l3-gre-ipvs", with_servers(12, 13)), "lb1", kernel, store)
    kernel.ops.clear()
    run(example("l3-gre-ipvs", with_servers(11, 12, 13)), "lb1", kernel, store)
    assert all("10.3.0.11" in op for op in kernel.ops if op.startswith("ipvs")), kernel.ops
    assert dest_order(kernel, "tcp 10.9.0.100:80") == ["10.3.0.11", "10.3.0.12", "10.3.0.13"]


def test_plan_names_the_reorder(kernel, store):
    run(example("l3-gre-ipvs", with_servers(11, 13)), "lb1", kernel, store)
    plan = plan_of(example("l3-gre-ipvs", with_servers(11, 12, 13)), "lb1", kernel, store)
    text = render_text(plan)
    assert "-/+ ipvs dest tcp 10.9.0.100:80 -> 10.3.0.11:80" in text and "[canonical order forces replacement]" in text
    assert "+ ipvs dest tcp 10.9.0.100:80 -> 10.3.0.12:80" in text


# ---------------------------------------------------------------- failure and safety


TRANSITIONS = [
    ("l3-ipip", None, "lb1"),
    ("l3-ipip", None, "s2"),
    ("l3-gre-ipvs", None, "lb1"),
    ("l3-gre-ipvs", with_servers(13, 11, 14), "lb1"),
    ("l3-ip6tnl", None, "lb1"),
]


@pytest.mark.parametrize("name, mutate, node", TRANSITIONS)
def test_a_fault_at_any_write_rolls_back_to_the_previous_state(tmp_path, name, mutate, node):
    def fresh():
        k = FakeKernel()
        k.sysctl.values.update({key: "0" for key in LB_SYSCTLS + SERVER_SYSCTLS})
        return k

    # Start from the example applied, then move to the mutated intent (or
    # from nothing to the example when there is no mutation).
    probe, probe_store = fresh(), StateStore(tmp_path / "probe")
    if mutate:
        run(example(name), node, probe, probe_store)
    start = probe.writes
    run(example(name, mutate), node, probe, probe_store)
    total = probe.writes - start
    assert total > 3
    for k_fail in range(1, total + 1):
        kernel, store = fresh(), StateStore(tmp_path / f"s{k_fail}")
        if mutate:
            run(example(name), node, kernel, store)
        before = snapshot(kernel)
        kernel.fail_at = kernel.writes + k_fail
        with pytest.raises(ApplyError) as failed:
            run(example(name, mutate), node, kernel, store)
        assert failed.value.rolled_back, failed.value
        assert snapshot(kernel) == before, f"fault at write {k_fail}"
        # And the next apply converges.
        run(example(name, mutate), node, kernel, store)
        assert plan_of(example(name, mutate), node, kernel, store).empty


def test_a_kernel_without_the_modules_fails_before_any_write(kernel, store):
    kernel.modules = {"nf_tables"}
    with pytest.raises(KernelFeatureError) as missing:
        run(example("l3-gre-ipvs"), "lb1", kernel, store)
    assert "ip_vs, ip_vs_mh" in str(missing.value) and missing.value.exit_code == 7
    assert kernel.writes == 0


def test_a_kdsr_named_link_kdsr_did_not_create_is_not_adopted_unless_asked(kernel, store):
    name = naming.tunnel_name("l3-ipip", "10.3.0.12")
    kernel.links.tunnels[name] = Link(name, "ipip", "10.2.0.2", "10.3.0.12", 64)
    kernel.links.interfaces.add(name)
    with pytest.raises(ForeignObjectError) as refused:
        run(example("l3-ipip"), "lb1", kernel, store)
    assert name in str(refused.value) and "--adopt" in str(refused.value) and kernel.writes == 0
    run(example("l3-ipip"), "lb1", kernel, store, adopt=True)
    assert plan_of(example("l3-ipip"), "lb1", kernel, store).empty
    assert name in store.load("lb1").links


def test_an_ipvs_service_kdsr_did_not_create_is_not_taken_over(kernel, store):
    from kdsr.model import IpvsService

    kernel.ipvs.services["tcp 10.9.0.100:80"] = IpvsService(4, "tcp", "10.9.0.100", 80, 0, "wlc", ())
    with pytest.raises(ForeignObjectError):
        run(example("l3-gre-ipvs"), "lb1", kernel, store)
    assert kernel.writes == 0


def test_ipv6_l3_uses_ip6tnl_and_ipvs_ipip_for_v6(kernel, store):
    run(example("l3-ip6tnl"), "lb1", kernel, store)
    assert {link.kind for link in kernel.links.tunnels.values()} == {"ip6tnl"}
    assert kernel.sysctl.values["net/ipv6/conf/all/forwarding"] == "1"

    def ipvs(doc):
        for svc in doc["services"].values():
            svc["dsr"]["engine"] = "ipvs"

    other = FakeKernel()
    other.sysctl.values.update({key: "0" for key in LB_SYSCTLS})
    run(example("l3-ip6tnl", ipvs), "lb1", other, StateStore(store.directory / "v6"))
    web = other.ipvs.services["tcp [fd00:9::100]:80"]
    assert {(d.method, d.tun_type) for d in web.dests} == {("tunnel", "ipip")}
    assert dataclasses.replace(web, dests=()).family == 6
