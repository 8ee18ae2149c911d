"""kdsr's rtnetlink code beside pyroute2, for every operation kdsr does on
links, addresses, routes and rules, side by side in one run.

    sudo .venv/bin/python bench/netlink.py [--vips 10000] [--objects 100] [--rounds 3] [--json PATH]

In a throw-away network namespace (bench/benchlib.py's, deleted by name at
the end), per round, both stacks in turn (the order alternates):

- import and open a socket, in a fresh Python process (what every CLI run pays);
- ``--vips`` /32 addresses on ``lo`` (a server node holds one per VIP; an
  ipvs director as many on its front interface): added as apply sends them
  (256 to a kdsr call), listed, deleted;
- as many routes in kdsr's announce table (BIRD announces a VIP while its
  route is there), added one by one as apply does, listed, deleted;
- ``--objects`` tunnel links (ipip; a ``bridge`` where the kernel has no
  ipip, as the host tier has not: the same requests without the tunnel's
  attributes), default routes in as many tables, fwmark rules: added, listed,
  deleted (a load balancer has one of each per server).

kdsr's side is kdsr/kernel/links.py as apply and the readers call it;
pyroute2's is ``IPRoute`` with the arguments kdsr gave it when it used it
(one request and answer at a time; interface indexes by ``if_nametoindex``,
as kdsr looked them up), its listings decoded to the same values.  Prints
the medians and the ratio; ``--json`` writes them.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import benchlib  # noqa: E402

STEPS = ("add", "list", "delete")
TABLE0 = 0x6B000100  # kdsr's mark and table range (kdsr/naming.py)
PRIORITY = 1000


def _vips(n: int) -> list[str]:
    return [f"10.{64 + (i >> 16)}.{(i >> 8) & 255}.{i & 255}" for i in range(1, n + 1)]


def _measured(add, listing, delete, expect: int) -> dict[str, float]:
    """Seconds to add, list (``listing`` returns what it found: at least
    ``expect``) and delete."""
    found: list = []
    times = {}
    for step, run in (("add", add), ("list", lambda: found.extend(listing())), ("delete", delete)):
        start = time.perf_counter()
        run()
        times[step] = time.perf_counter() - start
    assert len(found) >= expect, (len(found), expect)
    return times


def _each(write, items):
    return lambda: [write(item) for item in items]


def _start(stack: str) -> float:
    """Seconds to import the stack and open its socket, in a fresh process
    that has already imported what kdsr imports anyway (its model)."""
    code = {
        "kdsr": "from kdsr.kernel.links import Links; Links().rtnl",
        "pyroute2": "from pyroute2 import IPRoute; IPRoute()",
    }[stack]
    script = f"import time, kdsr.model; t = time.perf_counter(); {code}; print(time.perf_counter() - t)"
    run = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    if run.returncode != 0:
        raise SystemExit(f"{stack}: {run.stderr[-2000:]}")
    return float(run.stdout)


class Kdsr:
    def __init__(self, link_kind: str) -> None:
        from kdsr.kernel.links import Links

        self.links = Links()
        self.link_kind = link_kind

    def addresses(self, vips: list[str]) -> dict[str, float]:
        from kdsr.model import Address

        addrs = [Address("lo", f"{ip}/32") for ip in vips]
        batches = [addrs[start : start + 256] for start in range(0, len(addrs), 256)]  # apply's ADDRESS_BATCH
        add = _each(lambda batch: self.links.addr_write(True, batch, []), batches)
        delete = lambda: self.links.addr_write(False, addrs, [])  # noqa: E731
        return _measured(add, lambda: self.links.addr_list("lo"), delete, len(vips))

    def announce(self, vips: list[str]) -> dict[str, float]:
        from kdsr.model import AnnounceRoute

        routes = [AnnounceRoute(f"{ip}/32") for ip in vips]
        add, delete = _each(self.links.announce_add, routes), _each(self.links.announce_del, routes)
        return _measured(add, self.links.announce_list, delete, len(vips))

    def links_(self, n: int) -> dict[str, float]:
        from kdsr.kernel import rtnl_routing
        from kdsr.model import Link

        links = [Link(f"kdsrb{i}", "ipip", "10.200.0.2", f"10.201.{i >> 8}.{i & 255}") for i in range(n)]
        if self.link_kind == "ipip":
            add = _each(self.links.link_add, links)
        else:  # the same request without a tunnel's attributes
            add = _each(lambda link: rtnl_routing.add_link(self.links.rtnl, link.name, "bridge"), links)
        delete = _each(lambda link: self.links.link_del(link.name), links)
        return _measured(add, lambda: self.links.link_list("kdsrb"), delete, n)

    def routes(self, n: int) -> dict[str, float]:
        from kdsr.model import Route

        routes = [Route(4, TABLE0 + i, "eth0", gateway=f"10.200.1.{i % 250 + 1}") for i in range(n)]
        add, delete = _each(self.links.route_add, routes), _each(self.links.route_del, routes)
        return _measured(add, self.links.route_list, delete, n)

    def rules(self, n: int) -> dict[str, float]:
        from kdsr.model import Rule

        rules = [Rule(4, TABLE0 + i, TABLE0 + i, PRIORITY) for i in range(n)]
        add, delete = _each(self.links.rule_add, rules), _each(self.links.rule_del, rules)
        return _measured(add, lambda: self.links.rule_list(PRIORITY), delete, n)


class Pyroute2:
    def __init__(self, link_kind: str) -> None:
        from pyroute2 import IPRoute

        self.ipr = IPRoute()
        self.link_kind = link_kind
        self.lo = socket.if_nametoindex("lo")
        self.eth0 = socket.if_nametoindex("eth0")

    def _routes(self, wanted) -> list:
        found = []
        for af in (2, 10):
            for m in self.ipr.route("dump", family=af):
                if wanted(m.get_attr("RTA_TABLE") or m["table"], m):
                    found.append((m.get_attr("RTA_DST"), m["dst_len"], m["type"], m.get_attr("RTA_OIF")))
        return found

    def addresses(self, vips: list[str]) -> dict[str, float]:
        def listing() -> list:
            return [
                (m["family"], m["prefixlen"], m.get_attr("IFA_LOCAL") or m.get_attr("IFA_ADDRESS"))
                for m in self.ipr.addr("dump", index=self.lo)
            ]

        add = _each(lambda ip: self.ipr.addr("add", index=self.lo, address=ip, prefixlen=32), vips)
        delete = _each(lambda ip: self.ipr.addr("del", index=self.lo, address=ip, prefixlen=32), vips)
        return _measured(add, listing, delete, len(vips))

    def announce(self, vips: list[str]) -> dict[str, float]:
        def write(op: str, ip: str) -> None:
            extra = {"proto": "static"} if op == "add" else {}
            self.ipr.route(op, dst=f"{ip}/32", table=0x6B800000, type="blackhole", family=2, **extra)

        add, delete = _each(partial(write, "add"), vips), _each(partial(write, "del"), vips)
        return _measured(add, lambda: self._routes(lambda table, m: table == 0x6B800000), delete, len(vips))

    def links_(self, n: int) -> dict[str, float]:
        names = [f"kdsrb{i}" for i in range(n)]

        def make(i: int) -> None:
            kwargs = {}
            if self.link_kind == "ipip":
                kwargs = {"ipip_local": "10.200.0.2", "ipip_remote": f"10.201.{i >> 8}.{i & 255}", "ipip_ttl": 64}
            self.ipr.link("add", ifname=names[i], kind=self.link_kind, **kwargs)
            self.ipr.link("set", index=socket.if_nametoindex(names[i]), state="up")

        def listing() -> list:
            found = []
            for m in self.ipr.get_links():
                if m.get_attr("IFLA_IFNAME").startswith("kdsrb"):
                    info = m.get_attr("IFLA_LINKINFO")
                    data = info.get_attr("IFLA_INFO_DATA") if info else None
                    ends = (data.get_attr("IFLA_IPTUN_LOCAL"), data.get_attr("IFLA_IPTUN_REMOTE")) if data else None
                    found.append((m.get_attr("IFLA_IFNAME"), info.get_attr("IFLA_INFO_KIND") if info else None, ends))
            return found

        delete = _each(lambda name: self.ipr.link("del", index=socket.if_nametoindex(name)), names)
        return _measured(_each(make, range(n)), listing, delete, n)

    def routes(self, n: int) -> dict[str, float]:
        def write(op: str, i: int) -> None:
            gateway = f"10.200.1.{i % 250 + 1}"
            self.ipr.route(op, dst="0.0.0.0/0", oif=self.eth0, table=TABLE0 + i, family=2, gateway=gateway)

        def ours(table: int, m) -> bool:
            return TABLE0 <= table < TABLE0 + n and m["dst_len"] == 0 and m["type"] == 1

        add, delete = _each(partial(write, "add"), range(n)), _each(partial(write, "del"), range(n))
        return _measured(add, lambda: self._routes(ours), delete, n)

    def rules(self, n: int) -> dict[str, float]:
        def write(op: str, i: int) -> None:
            mark = TABLE0 + i
            self.ipr.rule(op, family=2, fwmark=mark, fwmask=0xFFFFFFFF, table=mark, priority=PRIORITY)

        def listing() -> list:
            return [
                (m.get_attr("FRA_FWMARK"), m.get_attr("FRA_TABLE"))
                for af in (2, 10)
                for m in self.ipr.get_rules(family=af)
                if m.get_attr("FRA_PRIORITY") == PRIORITY and m.get_attr("FRA_FWMARK") is not None
            ]

        add, delete = _each(partial(write, "add"), range(n)), _each(partial(write, "del"), range(n))
        return _measured(add, listing, delete, n)


def _ipip_works() -> bool:
    made = subprocess.run(["ip", "link", "add", "kdsrbprobe", "type", "ipip"], capture_output=True, timeout=30)
    if made.returncode != 0:
        return False
    subprocess.run(["ip", "link", "del", "kdsrbprobe"], capture_output=True, timeout=30)
    return True


def inner(vips: int, objects: int, rounds: int) -> dict:
    sys.path.insert(0, str(ROOT))
    link_kind = "ipip" if _ipip_works() else "bridge"
    addresses = _vips(vips)
    runs: dict[str, dict[str, list[dict]]] = {"kdsr": {}, "pyroute2": {}}
    for r in range(rounds):
        for name in ("kdsr", "pyroute2") if r % 2 == 0 else ("pyroute2", "kdsr"):
            stack = Kdsr(link_kind) if name == "kdsr" else Pyroute2(link_kind)
            got = runs[name]
            got.setdefault("start", []).append({"open": _start(name)})
            got.setdefault("addresses", []).append(stack.addresses(addresses))
            got.setdefault("announce routes", []).append(stack.announce(addresses))
            got.setdefault("links", []).append(stack.links_(objects))
            got.setdefault("routes", []).append(stack.routes(objects))
            got.setdefault("rules", []).append(stack.rules(objects))
    medians = {
        name: {
            what: {step: statistics.median(run[step] for run in got) for step in got[0]} for what, got in ops.items()
        }
        for name, ops in runs.items()
    }
    return {"link_kind": link_kind, "medians": medians}


def table(result: dict, vips: int, objects: int, rounds: int) -> str:
    counts = {"start": 1, "addresses": vips, "announce routes": vips, "links": objects, "routes": objects}
    counts["rules"] = objects
    ours, theirs = result["medians"]["kdsr"], result["medians"]["pyroute2"]
    lines = [
        f"rtnetlink: kdsr's own code and pyroute2, median of {rounds} rounds (seconds; ratio = pyroute2 / kdsr)",
        f"links are {result['link_kind']} links"
        + (
            ""
            if result["link_kind"] == "ipip"
            else " (this kernel has no ipip; the same requests, no tunnel attributes)"
        ),
        "",
        f"{'objects':<16} {'count':>7}  {'step':<13} {'kdsr':>8} {'pyroute2':>9} {'ratio':>6}",
    ]
    for what, steps in ours.items():
        for step, seconds in steps.items():
            label = "import + socket" if what == "start" else step
            other = theirs[what][step]
            lines.append(
                f"{what:<16} {counts[what]:>7,}  {label:<13} {seconds:>8.3f} {other:>9.3f} {other / seconds:>6.1f}"
            )
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vips", type=int, default=10_000)
    p.add_argument("--objects", type=int, default=100)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", default=str(HERE / "results" / "netlink.json"))
    p.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--release", help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.inner:
        print(json.dumps(inner(args.vips, args.objects, args.rounds)))
        return 0
    rest = ["--vips", str(args.vips), "--objects", str(args.objects), "--rounds", str(args.rounds)]
    result = benchlib.run_inner(str(Path(__file__).resolve()), "netlink", 0, ROOT, rest, "netlink")
    print(table(result, args.vips, args.objects, args.rounds))
    if args.json:
        out = {"vips": args.vips, "objects": args.objects, "rounds": args.rounds, **result}
        benchlib.write_json(args.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
