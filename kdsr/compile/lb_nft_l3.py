"""Load-balancer role, nft engine, L3 DSR (ipip, gre, ip6tnl): hash, then
hand the unchanged packet to the server's tunnel.

A routed hop away, the server cannot be reached by rewriting a MAC; the
unchanged packet travels inside a tunnel instead.  The kernel's tunnels take
a fixed remote, so there is one tunnel link per server, and the packet is
handed to the right one at the front interface's ingress, before the IP
stack (chains and maps in ``netdev kdsr``, next to L2's):

  l3-ingress (base chain, ingress hook of the front interface)
    not addressed to this host's MAC?   accept (lb_nft_l2.not_for_this_host)
    daddr . l4proto . dport  --vmap-->  selector chain of the service's pool
    selector: mark = jhash(fields, seed) mod M  (the Maglev slot)
              mark = slot map[mark]             (the server's id)
              mark = servers map[mark]          (its tunnel mark; counted)
              longer than the tunnel carries?   accept (see below)
              fwd to l3-tunnels[mark] device l3-tunnel-links[mark]

``fwd`` transmits on the tunnel link, which encapsulates and sends: no
routing lookup, no forwarding path, no conntrack: bench/fast_path.py's
``nft-l3`` row measures it against IPVS TUN, and the first design (mark in
``inet`` prerouting, let policy routing pick the tunnel) was far slower.

That routed path stays for two things.  A packet too long for the tunnel
(more than ``path_mtu`` less the overhead) goes on to the IP stack with
its tunnel mark; ``ip rule fwmark <mark> lookup <mark>`` routes it into the
tunnel, and forwarding answers "fragmentation needed" for DF or fragments
it (the tunnel's own transmit, reached by ``fwd``, would drop it silently:
it can only answer a packet that has a route).  So IP forwarding is on.
Health probes use the same rules (kdsr/compile/targets.py).

The VIP is not an address of the load balancer in this design: routers send
VIP traffic to it.  The Maglev table is the same as the L2 engine's, seeded
from the intent, so every load balancer picks the same server for a flow.

ICMP errors about a flow (e.g. "fragmentation needed" from a router on the
server's return path) arrive addressed to the VIP and carry the flow's
original header reversed; a second rule per family hashes those embedded
fields so the error reaches the server that owns the flow.
"""

from __future__ import annotations

from kdsr import naming
from kdsr.compile.cache import CompileCache
from kdsr.compile.lb_nft_l2 import (
    ADDR_PROTO,
    ADDR_TYPE,
    INGRESS_PRIORITY,
    hash_inputs,
    not_for_this_host,
    servers_map,
    servers_map_name,
    service_lookups,
    service_maps,
    slot_elements,
)
from kdsr.compile.selectors import Selector, selectors_for
from kdsr.intent.model import (
    ENGINE_NFT,
    HASH_FIVE_TUPLE,
    HASH_SOURCE_IP,
    HASH_SOURCE_IP_PORT,
    L3_TUNNELS,
    Intent,
    LoadBalancerNode,
)
from kdsr.model import ChainHook, Link, NftChain, NftMap, NftRule, Route, Rule, Sysctl, element

# The chains and maps below join L2's in the ``netdev kdsr`` table, with a
# base chain of their own on the same interface.
INGRESS_CHAIN = "l3-ingress"
SERVICE_MAPS = {4: "l3-services-v4", 6: "l3-services-v6"}
RANGE_MAPS = {4: "l3-service-ranges-v4", 6: "l3-service-ranges-v6"}
ICMP_MAPS = {4: "l3-icmp-v4", 6: "l3-icmp-v6"}
TUNNEL_ADDRESSES = {4: "l3-tunnels-v4", 6: "l3-tunnels-v6"}
TUNNEL_LINKS = "l3-tunnel-links"
FORWARDING = {4: "net/ipv4/ip_forward", 6: "net/ipv6/conf/all/forwarding"}
# Modules the kernel needs for each tunnel kind.
TUNNEL_MODULES = {"ipip": "ipip", "gre": "ip_gre", "ip6tnl": "ip6_tunnel"}


def wanted(service) -> bool:
    return service.is_l3 and service.engine == ENGINE_NFT


def _payload(protocol: str, field: str) -> dict:
    return {"payload": {"protocol": protocol, "field": field}}


def _raw(offset_bits: int, length_bits: int) -> dict:
    return {"payload": {"base": "th", "offset": offset_bits, "len": length_bits}}


# Where the embedded (original) header sits inside an ICMP error, counted from
# the ICMP header: 8 bytes of ICMP, then the inner IP header (no options /
# extension headers assumed), then the inner transport header.
_INNER = {
    4: {
        "saddr": (8 + 12, 32),
        "daddr": (8 + 16, 32),
        "proto": (8 + 9, 8),
        "sport": (8 + 20, 16),
        "dport": (8 + 22, 16),
    },
    6: {
        "saddr": (8 + 8, 128),
        "daddr": (8 + 24, 128),
        "proto": (8 + 6, 8),
        "sport": (8 + 40, 16),
        "dport": (8 + 42, 16),
    },
}


def _inner(family: int, name: str) -> dict:
    offset, length = _INNER[family][name]
    return _raw(offset * 8, length)


def icmp_hash_inputs(fields: str, family: int) -> list[dict]:
    """The same fields as ``hash_inputs`` read from the header an ICMP error
    embeds.  That header is the server's reply (VIP -> client), so the
    client's address and port are its *destination* fields.  Each part loads
    into the same register width as its counterpart, so jhash sees the same
    bytes and picks the same slot."""
    if fields == HASH_SOURCE_IP:
        return [_inner(family, "daddr")]
    if fields == HASH_SOURCE_IP_PORT:
        return [_inner(family, "daddr"), _inner(family, "dport")]
    if fields == HASH_FIVE_TUPLE:
        return [
            _inner(family, "daddr"),
            _inner(family, "saddr"),
            _inner(family, "proto"),
            _inner(family, "dport"),
            _inner(family, "sport"),
        ]
    raise ValueError(f"unknown hash fields {fields!r}")


def _concat(parts: list[dict]) -> dict:
    return parts[0] if len(parts) == 1 else {"concat": parts}


def _ingress(lb: LoadBalancerNode) -> NftChain:
    # ICMP errors about a flow come from a router that routes the VIP to
    # this load balancer, so they are addressed to it like the flow's packets.
    rules = [not_for_this_host(f"{lb.pointer}/interface")] + [
        NftRule.build([lookup], "/services")
        for family in (4, 6)
        for lookup in service_lookups(family, SERVICE_MAPS, RANGE_MAPS)
    ]
    for family, icmp, code_field, err in (
        (4, "icmp", "type", "destination-unreachable"),
        (6, "icmpv6", "type", "packet-too-big"),
    ):
        ip = ADDR_PROTO[family]
        is_error = {"match": {"op": "==", "left": _payload(icmp, code_field), "right": err}}
        lookup = {"vmap": {"key": _payload(ip, "daddr"), "data": f"@{ICMP_MAPS[family]}"}}
        rules.append(NftRule.build([is_error, lookup], "/services (ICMP errors about a flow)"))
    hook = ChainHook(type="filter", hook="ingress", device=lb.interface, priority=INGRESS_PRIORITY, policy="accept")
    return NftChain(name=INGRESS_CHAIN, hook=hook, rules=tuple(rules), pointer=f"{lb.pointer}/interface")


def _service_maps(selectors: list[Selector], cache: CompileCache) -> list[NftMap]:
    icmp: dict[int, dict] = {4: {}, 6: {}}
    for sel in selectors:
        for service in sel.services:
            # ICMP errors are keyed by VIP alone; a VIP whose services use two
            # pools sends errors to the first (sorted) one's selector.
            to_icmp = element(("jump", f"{sel.name}-icmp"), service.pointer)
            icmp[sel.family].setdefault(str(service.vip), to_icmp)
    maps = service_maps(selectors, SERVICE_MAPS, RANGE_MAPS, cache)
    maps += [
        NftMap(
            name=ICMP_MAPS[family],
            key_type=(ADDR_TYPE[family],),
            data_type="verdict",
            counter=True,
            elements=tuple(sorted(icmp[family].items())),
            pointer="/services",
        )
        for family in (4, 6)
    ]
    return maps


def _too_big(sel: Selector) -> dict:
    """Packets longer than the tunnel carries whole (the smallest ``path_mtu``
    of the selector's services less the tunnel's overhead)."""
    _kind, _family, overhead = L3_TUNNELS[sel.mode]
    fits = min(s.path_mtu for s in sel.services) - overhead
    if sel.family == 4:
        return {"match": {"op": ">", "left": _payload("ip", "length"), "right": fits}}
    # ip6 length is the payload's: the fixed header's 40 bytes are not in it.
    return {"match": {"op": ">", "left": _payload("ip6", "length"), "right": fits - 40}}


def _selector_chains(sel: Selector) -> list[NftChain]:
    # Rules point at the pool, never at one of its services (see
    # lb_nft_l2._build_selector_chain): adding a service is map elements only.
    pointer = sel.pool.pointer
    mark = {"meta": {"key": "mark"}}
    # The slot's server id, then the pool's servers map: the server's tunnel
    # mark, and its counter (see lb_nft_l2 "the pool's servers map").
    servers = servers_map_name(sel.pool.name, sel.family, sel.mode)
    to_server = [
        {"mangle": {"key": mark, "value": {"map": {"key": mark, "data": f"@{sel.name}"}}}},
        {"mangle": {"key": mark, "value": {"map": {"key": mark, "data": f"@{servers}"}}}},
    ]
    forward = {
        "fwd": {
            "dev": {"map": {"key": mark, "data": f"@{TUNNEL_LINKS}"}},
            "family": ADDR_PROTO[sel.family],
            "addr": {"map": {"key": mark, "data": f"@{TUNNEL_ADDRESSES[sel.family]}"}},
        }
    }
    chains = []
    for suffix, inputs in (("", hash_inputs), ("-icmp", icmp_hash_inputs)):
        slot = {
            "mangle": {
                "key": mark,
                "value": {
                    "jhash": {
                        "mod": sel.table_size,
                        "seed": sel.hashing.seed,
                        "expr": _concat(inputs(sel.hashing.fields, sel.family)),
                    }
                },
            }
        }
        rules = (
            NftRule.build([slot, *to_server], pointer),
            # Too big for the tunnel: on to the IP stack with the tunnel's mark,
            # whose policy route forwards it into the same tunnel, and
            # forwarding answers "fragmentation needed" (DF) or fragments it;
            # the tunnel's own transmit would drop it without a word.
            NftRule.build([_too_big(sel), {"accept": None}], f"{pointer} (path_mtu)"),
            NftRule.build([forward], pointer),
            # Reached only when the slot has no server (every member drained).
            NftRule.build([{"drop": None}], f"{pointer} (no server)"),
        )
        chains.append(NftChain(name=f"{sel.name}{suffix}", hook=None, rules=rules, pointer=pointer))
    return chains


def _selector_map(sel: Selector, source: str, cache: CompileCache) -> NftMap:
    return NftMap(
        name=sel.name,
        key_type=("mark",),
        data_type="mark",  # slot -> server id
        elements=slot_elements(sel, source, cache),
        pointer=sel.pool.pointer,
    )


def _servers_map(sel: Selector, source: str, cache: CompileCache) -> NftMap:
    """server id -> the server's tunnel mark, counted; every member, drained
    and down ones too, so their counters last."""
    name = servers_map_name(sel.pool.name, sel.family, sel.mode)
    mark = lambda m: naming.tunnel_mark(sel.mode, str(m.address))  # noqa: E731
    return servers_map(sel, source, name, "mark", mark, sel.members, cache)


def _tunnel_maps(tunnels: dict[int, tuple[int, str, str, str]]) -> list[NftMap]:
    """tunnel mark -> the server's address (per family) and its tunnel link.

    The link map holds interface indexes: nft resolves the names when the
    elements are added, so a link made again (a new index) needs its element
    sent again (diff.py ``_follow_replaced_links``), and a listing shows an
    index whose link is gone as a number."""
    maps = [
        NftMap(
            name=TUNNEL_ADDRESSES[family],
            key_type=("mark",),
            data_type=ADDR_TYPE[family],
            elements=tuple(
                sorted(
                    (mark, element(address, pointer))
                    for mark, (f, address, _n, pointer) in tunnels.items()
                    if f == family
                )
            ),
            pointer="/pools",
        )
        for family in (4, 6)
    ]
    maps.append(
        NftMap(
            name=TUNNEL_LINKS,
            key_type=("mark",),
            data_type="iface_index",
            elements=tuple(sorted((mark, element(name, pointer)) for mark, (_f, _a, name, pointer) in tunnels.items())),
            pointer="/pools",
        )
    )
    return maps


def tunnel_source(lb: LoadBalancerNode, family: int) -> str:
    """The outer source of this load balancer's tunnels: its first address of the family."""
    return next(str(a.ip) for a in lb.addresses if a.version == family)


def compile_l3(intent: Intent, lb: LoadBalancerNode, cache: CompileCache) -> dict:
    """The parts of the load balancer's Desired state for L3 services on the
    nft engine: chains and maps for the ``netdev kdsr`` table, and links,
    routes, rules, sysctls and modules."""
    selectors = selectors_for(intent, wanted, cache=cache)
    if not selectors:
        return {}
    links: dict[str, Link] = {}
    tunnels: dict[int, tuple[int, str, str, str]] = {}
    routes, rules, sysctls, modules = [], [], {}, {"nf_tables"}
    for sel in selectors:
        kind, family, _overhead = L3_TUNNELS[sel.mode]
        modules.add(TUNNEL_MODULES[kind])
        sysctls[FORWARDING[family]] = Sysctl(FORWARDING[family], "1", pointer=sel.services[0].pointer + "/dsr/mode")
        for member in sel.pool.members:
            address = str(member.address)
            name = naming.tunnel_name(sel.mode, address)
            if name in links:
                continue
            mark = naming.tunnel_mark(sel.mode, address)
            links[name] = Link(name, kind, tunnel_source(lb, family), address, pointer=member.pointer)
            tunnels[mark] = (family, address, name, member.pointer)
            routes.append(Route(family=family, table=mark, dev=name, pointer=member.pointer))
            rules.append(
                Rule(family=family, fwmark=mark, table=mark, priority=naming.RULE_PRIORITY, pointer=member.pointer)
            )
    chains = [_ingress(lb)] + [c for s in selectors for c in _selector_chains(s)]
    servers = {}
    for sel in selectors:
        servers.setdefault(servers_map_name(sel.pool.name, sel.family, sel.mode), sel)
    maps = _service_maps(selectors, cache) + [_selector_map(s, intent.source, cache) for s in selectors]
    maps += [_servers_map(servers[n], intent.source, cache) for n in sorted(servers)] + _tunnel_maps(tunnels)
    return {
        "chains": chains,
        "maps": maps,
        "links": tuple(sorted(links.values(), key=lambda x: x.name)),
        "routes": tuple(sorted(routes, key=lambda r: r.ident)),
        "rules": tuple(sorted(rules, key=lambda r: r.ident)),
        "sysctls": tuple(sorted(sysctls.values(), key=lambda s: s.key)),
        "modules": tuple(sorted(modules)),
    }
