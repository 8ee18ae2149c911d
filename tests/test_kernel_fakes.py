"""The fake backends (kdsr/kernel/fake/) refuse what the kernel refuses,
with the words kdsr's real backends give (the routing labs check those on
the kernel: netns-lab/tests/test_rtnl_routing_lab.py, and the guest tier's
test_full_kernel_tier.py for tunnels), count no write they refused, and
share one write log, so a fault injected at the k-th write hits whichever
backend makes it."""

from __future__ import annotations

import pytest

from kdsr.kernel import KernelError
from kdsr.kernel.bird import BirdError
from kdsr.kernel.fake import FakeKernel
from kdsr.kernel.ipvsadm import IpvsCommand
from kdsr.kernel.keepalived import KeepalivedError
from kdsr.model import Address, AnnounceRoute, IpvsService, Link, Route, Rule, ipvs_dest

TUNNEL = Link("kdsr-t1", "ipip", "10.0.0.2", "10.0.0.11")


def refused(write, words: str, kernel: FakeKernel) -> None:
    writes = kernel.writes
    with pytest.raises(KernelError, match=words):
        write()
    assert kernel.writes == writes, "a refused write was counted"


def test_links_refuse_what_the_kernel_refuses():
    kernel = FakeKernel()
    links = kernel.links
    links.link_add(TUNNEL)
    refused(lambda: links.link_add(TUNNEL), "add ipip link kdsr-t1: EEXIST", kernel)
    refused(lambda: links.link_del("kdsr-none"), "interface kdsr-none does not exist", kernel)
    route = Route(4, 0x6B000001, "kdsr-t1")
    links.route_add(route)
    refused(lambda: links.route_add(route), "EEXIST", kernel)
    refused(lambda: links.route_add(Route(4, 0x6B000002, "kdsr-none")), "interface kdsr-none does not exist", kernel)
    refused(lambda: links.route_del(Route(4, 0x6B000003, "eth0")), "ESRCH", kernel)
    rule = Rule(4, 0x6B000001, 0x6B000001, 1000)
    links.rule_add(rule)
    refused(lambda: links.rule_add(rule), "EEXIST", kernel)
    refused(lambda: links.rule_del(Rule(4, 0x6B000002, 0x6B000002, 1000)), "ENOENT", kernel)
    links.announce_add(AnnounceRoute("10.0.0.100/32"))
    refused(lambda: links.announce_add(AnnounceRoute("10.0.0.100/32")), "EEXIST", kernel)
    assert kernel.writes == 4


def test_a_deleted_link_takes_its_addresses_routes_and_sysctls_along():
    kernel = FakeKernel()
    kernel.sysctl.values["net/ipv4/conf/default/rp_filter"] = "2"
    kernel.links.link_add(TUNNEL)
    assert kernel.sysctl.read("net/ipv4/conf/kdsr-t1/rp_filter") == "2"  # a new link's key, from default
    kernel.links.addr_write(True, [Address("kdsr-t1", "10.9.0.100/32")], [])
    kernel.links.route_add(Route(4, 0x6B000001, "kdsr-t1"))
    kernel.links.link_del("kdsr-t1")
    assert kernel.links.addr_list("kdsr-t1") == [] and kernel.links.route_list() == []
    assert kernel.sysctl.read("net/ipv4/conf/kdsr-t1/rp_filter") is None
    assert not kernel.links.link_exists("kdsr-t1")


def test_an_address_batch_goes_on_past_a_refusal_and_names_the_first():
    kernel = FakeKernel()
    there = Address("lo", "10.9.0.1/32")
    kernel.links.addr_write(True, [there], [])
    done: list[Address] = []
    batch = [Address("lo", "10.9.0.2/32"), there, Address("nic9", "10.9.0.3/32"), Address("lo", "10.9.0.4/32")]
    with pytest.raises(KernelError, match="add address 10.9.0.1/32 on lo: EEXIST"):
        kernel.links.addr_write(True, batch, done)
    assert [a.cidr for a in done] == ["10.9.0.2/32", "10.9.0.4/32"]
    refused(lambda: kernel.links.addr_write(False, [Address("lo", "10.9.9.9/32")], []), "EADDRNOTAVAIL", kernel)


def test_a_sysctl_that_does_not_exist_cannot_be_written():
    kernel = FakeKernel()
    refused(lambda: kernel.sysctl.write("net/ipv4/conf/nic9/arp_ignore", "1"), "No such file or directory", kernel)
    kernel.sysctl.values["net/ipv4/conf/all/arp_ignore"] = "0"
    kernel.sysctl.write("net/ipv4/conf/all/arp_ignore", "1")
    assert kernel.sysctl.read("net/ipv4/conf/all/arp_ignore") == "1" and kernel.ops == [
        "sysctl net/ipv4/conf/all/arp_ignore=1"
    ]


SERVICE = IpvsService(4, "tcp", "10.9.0.100", 80, 0, "mh", ("mh-port",))


def test_ipvs_refuses_as_ipvsadm_and_puts_a_new_destination_at_the_head():
    kernel = FakeKernel()
    ipvs = kernel.ipvs
    first, second = ipvs_dest("10.3.0.11", 80, 1, "tunnel", "ipip"), ipvs_dest("10.3.0.12", 80, 1, "tunnel", "ipip")
    refused(lambda: ipvs.dest("-a", SERVICE, first), "No such service", kernel)
    ipvs.service("-A", SERVICE)
    refused(lambda: ipvs.service("-A", SERVICE), "Service already exists", kernel)
    ipvs.dest("-a", SERVICE, first)
    ipvs.dest("-a", SERVICE, second)
    refused(lambda: ipvs.dest("-a", SERVICE, first), "Destination already exists", kernel)
    assert [d.address for d in ipvs.list_all()[0].dests] == ["10.3.0.12", "10.3.0.11"]


@pytest.mark.parametrize("runs_on", [False, True], ids=["stops at a refusal", "runs on (ipvsadm 1.31)"])
def test_an_ipvs_batch_stops_at_a_refused_line_or_runs_on(runs_on):
    kernel = FakeKernel()
    kernel.ipvs.batch_runs_on = runs_on
    other = IpvsService(4, "tcp", "10.9.0.101", 80, 0, "mh", ())
    batch = [IpvsCommand("-A", SERVICE), IpvsCommand("-A", SERVICE), IpvsCommand("-A", other)]
    with pytest.raises(KernelError, match="line 2 of 3"):
        kernel.ipvs.batch(batch)
    assert sorted(kernel.ipvs.services) == sorted([SERVICE.ident] + ([other.ident] if runs_on else []))


def table(*commands: dict) -> list[dict]:
    return [{"add": {"table": {"family": "netdev", "name": "kdsr"}}}, *commands]


MAP = {"family": "netdev", "table": "kdsr", "name": "m", "type": "ipv4_addr", "map": "verdict"}
CHAIN = {"family": "netdev", "table": "kdsr", "name": "c"}
RULE = {"family": "netdev", "table": "kdsr", "chain": "c", "expr": [{"vmap": {"key": "x", "data": "@m"}}]}


def test_an_nft_batch_is_all_or_nothing_and_a_map_in_use_stays():
    kernel = FakeKernel()
    kernel.nft.apply(table({"add": {"map": MAP}}, {"add": {"chain": CHAIN}}, {"add": {"rule": RULE}}))
    before = kernel.nft.read_table("netdev", "kdsr")
    refused(lambda: kernel.nft.apply([{"delete": {"map": MAP}}]), "map m is used by chain c", kernel)
    missing = {"family": "netdev", "table": "kdsr", "name": "gone"}
    refused(
        lambda: kernel.nft.apply([{"flush": {"chain": CHAIN}}, {"delete": {"chain": missing}}]), "chain gone", kernel
    )
    assert kernel.nft.read_table("netdev", "kdsr") == before, "the refused batch changed something"


def test_an_ingress_chain_needs_its_device_which_the_links_fake_knows():
    kernel = FakeKernel()
    hooked = {**CHAIN, "type": "filter", "hook": "ingress", "prio": 0, "dev": "kdsr-t1"}
    refused(lambda: kernel.nft.apply(table({"add": {"chain": hooked}})), "device kdsr-t1", kernel)
    kernel.links.link_add(TUNNEL)
    kernel.nft.apply(table({"add": {"chain": hooked}}))


def test_bird_and_keepalived_refuse_when_missing_stopped_or_rejecting():
    kernel = FakeKernel()
    kernel.bird.stopped = True
    with pytest.raises(BirdError, match="not running"):
        kernel.bird.install("bird.conf", "kdsr.conf", "bird.ctl", "protocol static {}\n")
    kernel.bird.stopped, kernel.bird.rejects = False, "bad"
    with pytest.raises(BirdError, match="line 2") as caught:
        kernel.bird.install("bird.conf", "kdsr.conf", "bird.ctl", "ok\nbad\n")
    assert caught.value.line == 2 and kernel.bird.read("kdsr.conf") is None
    kernel.keepalived.files = None
    with pytest.raises(KeepalivedError, match="not installed"):
        kernel.keepalived.check("k.conf", "kdsr.conf", "vrrp_instance x {}\n")
    assert kernel.writes == 0


def test_the_fakes_share_one_write_log_and_one_fault():
    kernel = FakeKernel()
    kernel.sysctl.values["net/ipv4/ip_forward"] = "0"
    kernel.fail_at = 3  # the third write, whichever backend makes it
    kernel.links.link_add(TUNNEL)
    kernel.sysctl.write("net/ipv4/ip_forward", "1")
    with pytest.raises(KernelError, match="EBUSY \\(injected\\)"):
        kernel.ipvs.service("-A", SERVICE)
    kernel.ipvs.service("-A", SERVICE)  # one fault: the retry (a rollback) goes through
    assert kernel.ops == [
        "link add kdsr-t1 ipip 10.0.0.2 -> 10.0.0.11",
        "sysctl net/ipv4/ip_forward=1",
        f"ipvs add {SERVICE.ident}",
    ]
    assert kernel.writes == 3 == kernel.links.writes + kernel.sysctl.writes + kernel.ipvs.writes
