"""kdsr's own reads of links, routes and rules (kdsr/kernel/rtnl_routing.py,
through SystemKernel) against pyroute2's on the same kernel: the same links,
kdsr's routes and rules and nothing else, with IPv4 and IPv6, gateways,
tables beyond 255, and look-alikes kdsr must leave out (a blackhole in its
table range, a rule at another priority, a mark outside its range).

The host kernel has no tunnel modules, so kdsr's links here are veths with
kdsr's names (read as foreign kinds); tunnels are read through the same code
by every L3 lab in the guest tier, whose second apply must find nothing to
change."""

from __future__ import annotations

import json
import sys
from pathlib import Path

PYTHON = sys.executable or "python3"
ROOT = str(Path(__file__).resolve().parents[2])

# Runs inside the namespace: kdsr's reads, and the same through pyroute2
# the way kdsr read them before it had its own socket.
HELPER = """
import json, sys
sys.path.insert(0, sys.argv[1])
from pyroute2 import IPRoute
from kdsr import naming
from kdsr.kernel.system import SystemKernel

k = SystemKernel()
ours = {
    "links": sorted([l.name, l.kind, l.local, l.remote, l.ttl] for l in k.links.link_list("kdsr")),
    "routes": sorted([r.family, r.table, r.dev, r.gateway] for r in k.links.route_list()),
    "rules": sorted([r.family, r.fwmark, r.table, r.priority] for r in k.links.rule_list(naming.RULE_PRIORITY)),
}
ipr = IPRoute()
names = {m["index"]: m.get_attr("IFLA_IFNAME") for m in ipr.get_links()}
links = []
for m in ipr.get_links():
    name = m.get_attr("IFLA_IFNAME")
    if name.startswith("kdsr"):
        info = m.get_attr("IFLA_LINKINFO")
        kind = info.get_attr("IFLA_INFO_KIND") if info else None
        links.append([name, kind or "unknown", "", "", 64])
routes, rules = [], []
for family, af in ((4, 2), (6, 10)):
    for m in ipr.route("dump", family=af):
        table = m.get_attr("RTA_TABLE") or m["table"]
        if naming.is_kdsr_mark(table) and m["dst_len"] == 0 and m["type"] == 1:
            routes.append([family, table, names.get(m.get_attr("RTA_OIF"), "?"), m.get_attr("RTA_GATEWAY") or ""])
    for m in ipr.get_rules(family=af):
        mark = m.get_attr("FRA_FWMARK")
        if m.get_attr("FRA_PRIORITY") == naming.RULE_PRIORITY and mark is not None and naming.is_kdsr_mark(mark):
            rules.append([family, mark, m.get_attr("FRA_TABLE") or m["table"], naming.RULE_PRIORITY])
theirs = {"links": sorted(links), "routes": sorted(routes), "rules": sorted(rules)}
print(json.dumps({"ours": ours, "theirs": theirs}))
"""

T1, T2, T3 = 0x6B000101, 0x6B000202, 0x6B000303  # kdsr's mark and table range
# A link with kdsr's name (a veth: the host has no tunnel modules) and an uplink.
LINKS = (
    "ip link add kdsr4-a type veth peer name kdsr4-b",
    "ip link add eth0 type veth peer name eth1",
    "ip link set kdsr4-a up",
    "ip link set eth0 up",
    "ip addr add 10.3.0.2/24 dev eth0",
    "ip addr add fd00:3::2/64 dev eth0 nodad",
)


def test_links_routes_and_rules_read_as_pyroute2_reads_them(netns):
    netns.add("a")
    for cmd in (
        *LINKS,
        f"ip route add default dev kdsr4-a table {T1}",
        f"ip route add default via 10.3.0.1 dev eth0 table {T2}",
        f"ip -6 route add default via fd00:3::1 dev eth0 table {T3}",
        f"ip route add blackhole default table {T3}",  # in kdsr's range, not kdsr's kind of route
        "ip route add default via 10.3.0.1 dev eth0 table 100",  # outside kdsr's range
        f"ip rule add fwmark {T1} lookup {T1} pref 1000",
        f"ip -6 rule add fwmark {T3} lookup {T3} pref 1000",
        f"ip rule add fwmark {T2} lookup {T2} pref 1001",  # another priority
        "ip rule add fwmark 0x42 lookup 100 pref 1000",  # a mark outside kdsr's range
    ):
        netns.run("a", cmd)
    out = json.loads(netns.run("a", [PYTHON, "-c", HELPER, ROOT], timeout=120).stdout)
    assert out["ours"] == out["theirs"]
    assert out["ours"] == {
        "links": [["kdsr4-a", "veth", "", "", 64], ["kdsr4-b", "veth", "", "", 64]],
        "routes": [[4, T1, "kdsr4-a", ""], [4, T2, "eth0", "10.3.0.1"], [6, T3, "eth0", "fd00:3::1"]],
        "rules": [[4, T1, T1, 1000], [6, T3, T3, 1000]],
    }


ANNOUNCE_HELPER = """
import json, sys
sys.path.insert(0, sys.argv[1])
from kdsr.kernel.system import SystemKernel
from kdsr.model import AnnounceRoute

k = SystemKernel()
for prefix in ("10.0.0.100/32", "fd00:10::100/128"):
    k.links.announce_add(AnnounceRoute(prefix))
found = sorted([r.prefix, r.kind] for r in k.links.announce_list())
for prefix, kind in found:
    k.links.announce_del(AnnounceRoute(prefix, kind))
print(json.dumps({"found": found, "after": [r.prefix for r in k.links.announce_list()], "writes": k.writes}))
"""


def test_the_announce_table_is_read_and_written_whatever_the_route_type(netns):
    """kdsr's announce table (naming.ANNOUNCE_TABLE): kdsr's blackhole routes
    and any other route there, read with its type and deleted by it; routes
    of other tables are not read, and no rule or main-table route appears."""
    from kdsr import naming

    netns.add("a")
    table = str(naming.ANNOUNCE_TABLE)
    for cmd in (
        "ip link add eth0 type veth peer name eth1",
        "ip link set eth0 up",
        "ip addr add 10.3.0.2/24 dev eth0",
        f"ip route add unreachable 192.0.2.7/32 table {table} proto boot",  # someone else's, in kdsr's table
        "ip route add blackhole 10.0.0.101/32 table 100",  # another table
    ):
        netns.run("a", cmd)
    rules, main = netns.run("a", "ip rule").stdout, netns.run("a", "ip route show table main").stdout
    out = json.loads(netns.run("a", [PYTHON, "-c", ANNOUNCE_HELPER, ROOT], timeout=120).stdout)
    assert out == {
        "found": [["10.0.0.100/32", "blackhole"], ["192.0.2.7/32", "unreachable"], ["fd00:10::100/128", "blackhole"]],
        "after": [],
        "writes": 5,
    }
    assert netns.run("a", "ip rule").stdout == rules and netns.run("a", "ip route show table main").stdout == main
    assert "10.0.0.101" in netns.run("a", "ip route show table 100").stdout


# Runs inside the namespace: the same routes and rules written twice, once
# through kdsr's own socket (tables T1.., marks M1..) and once through
# pyroute2 with the arguments kdsr gave it before it wrote them itself
# (tables T1+0x10..); then kdsr's refusals.
WRITE_HELPER = """
import json, sys
sys.path.insert(0, sys.argv[1])
from pyroute2 import IPRoute
from kdsr.kernel import KernelError
from kdsr.kernel.system import SystemKernel
from kdsr.model import AnnounceRoute, Route, Rule
from kdsr import naming

T1, T2, T3 = (int(x) for x in sys.argv[2:5])
k, ipr = SystemKernel(), IPRoute()
eth0 = ipr.link_lookup(ifname="eth0")[0]
routes = [Route(4, T1, "kdsr4-a"), Route(4, T2, "eth0", gateway="10.3.0.1"), Route(6, T3, "eth0", gateway="fd00:3::1")]
rules = [Rule(4, T1, T1, 1000), Rule(6, T3, T3, 1000)]
for route in routes:
    k.links.route_add(route)
    args = {"dst": "0.0.0.0/0" if route.family == 4 else "::/0", "oif": ipr.link_lookup(ifname=route.dev)[0],
            "table": route.table + 0x10, "family": 2 if route.family == 4 else 10}
    if route.gateway:
        args["gateway"] = route.gateway
    ipr.route("add", **args)
for rule in rules:
    k.links.rule_add(rule)
    ipr.rule("add", family=2 if rule.family == 4 else 10, fwmark=rule.fwmark + 0x10, fwmask=0xFFFFFFFF,
             table=rule.table + 0x10, priority=rule.priority)
for prefix in ("10.0.0.100/32", "fd00:10::100/128"):
    k.links.announce_add(AnnounceRoute(prefix))
refused = []
for write in (lambda: k.links.route_add(routes[0]), lambda: k.links.rule_add(rules[0]),
              lambda: k.links.announce_add(AnnounceRoute("10.0.0.100/32")),
              lambda: k.links.route_add(Route(4, T1 + 0x20, "kdsr-none")),
              lambda: k.links.route_del(Route(4, T1 + 0x20, "eth0")), lambda: k.links.rule_del(Rule(4, T2, T2, 1000))):
    try:
        write()
    except KernelError as exc:
        refused.append(str(exc))
read = {"routes": sorted(map(repr, k.links.route_list())), "rules": sorted(map(repr, k.links.rule_list(1000))),
        "announce": sorted(map(repr, k.links.announce_list()))}
print(json.dumps({"refused": refused, "read": read, "writes": k.writes}))
"""

DELETE_HELPER = """
import json, sys
sys.path.insert(0, sys.argv[1])
from kdsr.kernel.system import SystemKernel
k = SystemKernel()
for route in k.links.route_list():
    k.links.route_del(route)
for rule in k.links.rule_list(1000):
    k.links.rule_del(rule)
for route in k.links.announce_list():
    k.links.announce_del(route)
print(json.dumps({"writes": k.writes}))
"""


def _routes_of(netns, table: int, family: str) -> list[dict]:
    found = json.loads(netns.run("a", ["ip", "-j", "-d", family, "route", "show", "table", str(table)]).stdout)
    for route in found:
        route.pop("table", None)
    return found


def _rules_of(netns, mark: int, family: str) -> list[dict]:
    found = json.loads(netns.run("a", ["ip", "-j", "-d", family, "rule", "show"]).stdout)
    found = [r for r in found if r.get("fwmark") == hex(mark)]
    for rule in found:
        rule.pop("fwmark")
        rule.pop("table")
    return found


def test_routes_and_rules_written_as_pyroute2_wrote_them(netns):
    """kdsr's own writes (rtnl_routing.write_route, write_rule) make what its
    earlier pyroute2 writes made, attribute for attribute as `ip -d` shows
    them; a second add, a route out of a missing device, a delete of what is
    not there are refused with the kernel's word; the deletes take exactly
    what was added, and nothing else."""
    from kdsr import naming

    netns.add("a")
    for cmd in LINKS:
        netns.run("a", cmd)
    before = {f: netns.run("a", ["ip", f, "route", "show", "table", "all"]).stdout for f in ("-4", "-6")}
    rules_before = {f: netns.run("a", ["ip", f, "rule"]).stdout for f in ("-4", "-6")}
    out = json.loads(netns.run("a", [PYTHON, "-c", WRITE_HELPER, ROOT, str(T1), str(T2), str(T3)], timeout=120).stdout)
    for table, family in ((T1, "-4"), (T2, "-4"), (T3, "-6")):
        ours, theirs = _routes_of(netns, table, family), _routes_of(netns, table + 0x10, family)
        assert ours == theirs and len(ours) == 1, (table, ours, theirs)
        assert ours[0]["protocol"] == "static" and ours[0]["scope"] == "global", ours
    for mark, family in ((T1, "-4"), (T3, "-6")):
        ours, theirs = _rules_of(netns, mark, family), _rules_of(netns, mark + 0x10, family)
        assert ours == theirs and len(ours) == 1, (mark, ours, theirs)
    announce = netns.run("a", ["ip", "-d", "route", "show", "table", str(naming.ANNOUNCE_TABLE)]).stdout
    assert "blackhole 10.0.0.100 proto static scope global" in announce, announce
    assert len(out["refused"]) == 6, out["refused"]
    assert "EEXIST" in out["refused"][0] and "EEXIST" in out["refused"][1] and "EEXIST" in out["refused"][2]
    assert "interface kdsr-none does not exist" in out["refused"][3]
    assert "ESRCH" in out["refused"][4] and "ENOENT" in out["refused"][5], out["refused"]
    assert out["writes"] == 3 + 2 + 2  # the refused writes count none
    assert len(out["read"]["routes"]) == 6 and len(out["read"]["rules"]) == 4 and len(out["read"]["announce"]) == 2
    # kdsr deletes what it reads as its own: both writers' routes and rules, its announce routes.
    gone = json.loads(netns.run("a", [PYTHON, "-c", DELETE_HELPER, ROOT], timeout=120).stdout)
    assert gone["writes"] == 6 + 4 + 2
    assert {f: netns.run("a", ["ip", f, "route", "show", "table", "all"]).stdout for f in ("-4", "-6")} == before
    assert {f: netns.run("a", ["ip", f, "rule"]).stdout for f in ("-4", "-6")} == rules_before
