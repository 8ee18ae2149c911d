"""Load-balancer role, xdp engine (L2 and L3 DSR): what kdsr's XDP program's maps hold.

Pure: the desired content of the maps (kdsr/model_xdp.py), never their
layout.  The Maglev tables are the nft engine's own (the same selectors,
names, sizes, seeds and slot -> server tables: kdsr/compile/selectors.py;
the L2 and the L3 selectors are sized apart, within one slot budget each,
as the nft engine's L2 and L3 tables are), and the program hashes flows
into slots as nft's ``jhash`` does, so an xdp and an nft balancer with one
intent send each flow to the same server.

Servers whose MAC the intent does not pin (l2), and every L3 server, are
reached through bpf_fib_lookup(), which answers only on an interface that
forwards (net/core/filter.c: BPF_FIB_LKUP_RET_FWD_DISABLED otherwise, 6.1
and 6.18), so such a pool wants ``forwarding`` on the front interface for
its family.  L3 wants more of the stack, for the encapsulated packets the
program hands it to forward (bpf/kdsr_xdp.c: no neighbour entry for the
next hop yet, or an IPv4 packet to fragment): IPv6 forwarding in ``all``
(ip6_forward() reads that one, as the nft engine's L3 path sets it), and
for IPv4 ``accept_local`` on the front interface, without which IPv4 input
drops a packet whose source is this balancer's own address as a martian
(net/ipv4/fib_frontend.c fib_validate_source(); IPv4 forwards by the
receiving interface's own ``forwarding``).

L3 servers need no tunnel link on the balancer: the program pushes the
outer header itself.  A ``dsr`` health probe, though, is sent by the
balancer's own stack, and must take the traffic's path: for pools with such
a monitor, the tunnel link, routing table and rule the nft engine would make
for each member (the same names and marks: kdsr/compile/targets.py marks
the probes).
"""

from __future__ import annotations

from kdsr import naming
from kdsr.compile.cache import CompileCache
from kdsr.compile.lb_nft_l3 import FORWARDING, TUNNEL_MODULES, tunnel_source
from kdsr.compile.selectors import Selector, selectors_for
from kdsr.compile.targets import monitored
from kdsr.intent.model import (
    ENGINE_XDP,
    L3_TUNNELS,
    MONITOR_DSR,
    Intent,
    LoadBalancerNode,
    Service,
    address_text,
)
from kdsr.model import Link, Route, Rule, Sysctl
from kdsr.model_xdp import XdpSelector, XdpServer, XdpService, XdpState

# ip6_forward() forwards only with forwarding on in ``all`` (6.1, 6.18).
IPV6_FORWARDING = FORWARDING[6]


def wanted(service: Service) -> bool:
    """The xdp engine's l2 services (one selector set, one slot budget)."""
    return service.mode == "l2" and service.engine == ENGINE_XDP


def wanted_l3(service: Service) -> bool:
    """Its L3 services (another: the nft engine sizes its L3 tables apart from L2's)."""
    return service.is_l3 and service.engine == ENGINE_XDP


def selectors_of(service: Service):
    """Which selector set ``service`` is in (kdsr maglev)."""
    return wanted_l3 if service.is_l3 else wanted


def _table(sel: Selector, cache: CompileCache | None) -> XdpSelector:
    l3 = sel.mode in L3_TUNNELS
    return XdpSelector(
        name=sel.name,
        family=sel.family,
        fields=sel.hashing.fields,
        seed=sel.hashing.seed,
        size=sel.table_size,
        table=sel.addresses(cache),
        pointer=sel.pool.pointer,
        mode=sel.mode,
        # The nft engine's "too big" bound (lb_nft_l3._too_big): the
        # smallest path_mtu of the selector's services.
        path_mtu=min(s.path_mtu for s in sel.services) if l3 else 0,
    )


def _services(sel: Selector) -> tuple[XdpService, ...]:
    services = []
    for service in sel.services:
        vip = address_text(service.vip)
        for proto in service.protocols:
            for ports in service.ports:
                services.append(XdpService(vip, proto, ports.first, ports.last, sel.name, ports.pointer))
    return tuple(services)


def _selector_model(sel: Selector, cache: CompileCache) -> tuple[XdpSelector, tuple[XdpService, ...]]:
    """A selector's table and services, the objects of the last compile
    when nothing they are made of changed (a health event's effective intent
    shares every pool and service object but the one that changed), so the
    diff and the daemon's receipt meet them by identity."""
    last = cache.xdp_selectors.get(sel.name)
    if (
        last is not None
        and last[0] is sel.pool
        and last[1] == (sel.family, sel.hashing, sel.table_size, sel.mode)
        and len(last[2]) == len(sel.services)
        and all(a is b for a, b in zip(last[2], sel.services, strict=True))
    ):
        return last[3]
    made = (_table(sel, cache), _services(sel))
    if last is not None:
        # A pool's server went down: its table changed, its services did
        # not, and stay the objects they were (so do the sorted services).
        made = tuple(_same_or(old, new) for old, new in zip(last[3], made, strict=True))
    inputs = (sel.family, sel.hashing, sel.table_size, sel.mode)
    cache.xdp_selectors.put(sel.name, (sel.pool, inputs, sel.services, made))
    return made


def _same_or(old, new):
    """``old`` when it equals ``new`` down to its pointers (which equality leaves out)."""
    if old != new:
        return new
    if isinstance(new, tuple):
        return old if all(a.pointer == b.pointer for a, b in zip(old, new, strict=True)) else new
    return old if old.pointer == new.pointer else new


def _sorted(cache: CompileCache, which: str, parts: tuple, make):
    """``make()``, or the last one when ``parts`` are the very objects it came from."""
    last = cache.xdp_sorted.get(which)
    if last is not None and len(last[0]) == len(parts) and all(a is b for a, b in zip(last[0], parts, strict=True)):
        return last[1]
    return cache.xdp_sorted.put(which, (parts, make()))[1]


def compile_xdp(intent: Intent, lb: LoadBalancerNode, cache: CompileCache | None = None) -> dict:
    """The XDP program's state on the front interface ("state": None when no
    service is on xdp), and what else the node needs for it: "sysctls", and
    for L3 pools with dsr health monitors "links", "routes", "rules" and
    "modules" (the probes' path)."""
    if cache is None:
        cache = CompileCache()
    l2 = selectors_for(intent, wanted, cache=cache)
    l3 = selectors_for(intent, wanted_l3, cache=cache)
    if not l2 and not l3:
        return {"state": None}
    models = [_selector_model(sel, cache) for sel in l2 + l3]
    servers: dict[str, XdpServer] = {}
    resolve: set[int] = set()
    for sel in l2 + l3:
        for member in sel.members:
            address = address_text(member.address)
            if sel.mode in L3_TUNNELS:
                # Routed a hop away: reached through the next hop the route
                # names, never by a neighbour entry of its own.
                servers.setdefault(address, XdpServer(address=address, pointer=member.pointer))
                continue
            servers[address] = XdpServer(
                address=address, mac=member.mac or "", pointer=member.pointer, neighbour=not member.mac
            )
            if not member.mac:
                resolve.add(sel.family)
    tables = tuple(table for table, _ in models)
    by_selector = tuple(services for _, services in models)
    families = {sel.family for sel in l3}
    state = XdpState(
        interface=lb.interface,
        services=_sorted(
            cache,
            "services",
            by_selector,
            lambda: tuple(sorted((s for part in by_selector for s in part), key=lambda s: s.ident)),
        ),
        selectors=_sorted(cache, "selectors", tables, lambda: tuple(sorted(tables, key=lambda s: s.name))),
        servers=tuple(sorted(servers.values(), key=lambda s: s.ident)),
        pointer=f"{lb.pointer}/interface",
        source4=tunnel_source(lb, 4) if 4 in families else "",
        source6=tunnel_source(lb, 6) if 6 in families else "",
    )
    sysctls = {}
    for family in sorted(resolve | families):
        key = f"net/ipv{family}/conf/{lb.interface}/forwarding"
        sysctls[key] = Sysctl(key=key, value="1", pointer=state.pointer)
    for sel in l3:
        pointer = sel.services[0].pointer + "/dsr/mode"
        if sel.family == 4:
            # IPv4 input forwards by the receiving interface's own setting.
            key = f"net/ipv4/conf/{lb.interface}/accept_local"
        else:
            key = IPV6_FORWARDING
        sysctls.setdefault(key, Sysctl(key, "1", pointer=pointer))
    return {"state": state, "sysctls": list(sysctls.values()), **_probe_tunnels(intent, lb)}


def _probe_tunnels(intent: Intent, lb: LoadBalancerNode) -> dict:
    """Per member of an xdp L3 pool that a dsr monitor checks: the tunnel
    link, routing table and rule of the nft engine's L3 path, which carry
    the probes (marked naming.tunnel_mark) as the program carries traffic."""
    links: dict[str, Link] = {}
    routes: dict[str, Route] = {}
    rules: dict[str, Rule] = {}
    modules: set[str] = set()
    for monitor, pool, service in monitored(intent):
        if monitor.mode != MONITOR_DSR or service is None or not wanted_l3(service):
            continue
        kind, family, _overhead = L3_TUNNELS[service.mode]
        for member in pool.members:
            if member.address.version != family:
                continue
            address = address_text(member.address)
            name = naming.tunnel_name(service.mode, address)
            mark = naming.tunnel_mark(service.mode, address)
            links.setdefault(name, Link(name, kind, tunnel_source(lb, family), address, pointer=member.pointer))
            route = Route(family=family, table=mark, dev=name, pointer=member.pointer)
            rule = Rule(family=family, fwmark=mark, table=mark, priority=naming.RULE_PRIORITY, pointer=member.pointer)
            routes.setdefault(route.ident, route)
            rules.setdefault(rule.ident, rule)
            modules.add(TUNNEL_MODULES[kind])
    return {
        "links": sorted(links.values(), key=lambda x: x.name),
        "routes": list(routes.values()),
        "rules": list(rules.values()),
        "modules": sorted(modules),
    }
