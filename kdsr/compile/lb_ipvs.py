"""Load-balancer role, ipvs engine: IPVS DR (l2) and TUN (l3-ipip, l3-gre, l3-ip6tnl).

IPVS schedules new connections and remembers them (its connection table), so
a server change never moves an established flow.  kdsr always uses the
``mh`` scheduler (Maglev in the kernel):

- ``mh-port`` when the intent hashes the source port too;
- ``mh-fallback`` so a destination that is unavailable (weight 0 counts as
  drained) hands its slots' new connections to the next one instead of
  dropping them.

Destinations are listed in canonical order.  ``mh`` fills its table walking
the destination list, and the kernel puts a new destination at the *head* of
the list, so directors that saw different add/remove histories build
different tables.  kdsr's desired list is sorted (addresses numerically);
apply re-adds destinations where the kernel's list differs (see apply.py).

One IPVS service per VIP, protocol and single port.  A port range becomes a
fwmark service: the ``inet kdsr`` table marks packets to VIP . protocol .
range with the range's mark (kdsr/naming.py), and the service matches it.

The VIP is a local address of the load balancer (IPVS intercepts on the way
to local delivery): on the front interface for l2 (clients on the segment
ARP for it), on ``lo`` for L3 (routers route it here).
"""

from __future__ import annotations

from kdsr import maglev, naming
from kdsr.compile.cache import CompileCache
from kdsr.compile.lb_nft_l2 import ADDR_PROTO, ADDR_TYPE
from kdsr.intent.model import (
    DSR_L2,
    DSR_L3_GRE,
    ENGINE_IPVS,
    HASH_SOURCE_IP_PORT,
    Intent,
    LoadBalancerNode,
    Service,
)
from kdsr.model import (
    Address,
    ChainHook,
    IpvsDest,
    IpvsService,
    NftChain,
    NftMap,
    NftRule,
    Sysctl,
    element,
    ipvs_dest,
)

TABLE_FAMILY = "inet"  # the port-range marks (below); nothing else of kdsr is in it
TABLE_NAME = "kdsr"

MARK_CHAIN = "ipvs-marks"
MARK_MAPS = {4: "ipvs-marks-v4", 6: "ipvs-marks-v6"}
FRONT_LABEL_SUFFIX = ":kdsr"

# The IPVS sysctls a DSR director needs (per network namespace; they exist
# once ip_vs is loaded):
IPVS_SYSCTLS = (
    # A removed server's connections are expired on their next packet, so the
    # client's retransmission is scheduled to a live server at once instead of
    # being sent to the dead one until the entry times out.
    ("net/ipv4/vs/expire_nodest_conn", "1"),
    # Accept mid-flow TCP packets without a connection entry and schedule
    # them: after a fail-over between load balancers (or ECMP re-hashing) the
    # new director picks the same server through mh and the flow survives.
    ("net/ipv4/vs/sloppy_tcp", "1"),
    # Schedule ICMP errors about a VIP flow that this director has no entry
    # for (same reason: they must reach the server that owns the flow).
    ("net/ipv4/vs/schedule_icmp", "1"),
)
# conntrack=0 (default) is kept: DSR replies never cross the director, so
# netfilter conntrack would only see half of each flow.


def wanted(service: Service) -> bool:
    return service.engine == ENGINE_IPVS


def _dests(service: Service, intent: Intent, port: int, cache: CompileCache) -> tuple[IpvsDest, ...]:
    """The destinations of the service's pool for its forwarding method, port and family.

    Kept in ``cache`` with the pool they came from, and handed back while the
    pool is the same object: the services on a pool share one tuple, and a
    recompile that kept the pool (a health event on another pool, a reload
    that did not touch it) hands back the same tuple, so building 10,000
    services does not sort and make 160,000 destinations again, and the diff
    meets equal tuples it compares by identity."""
    pool = intent.pool(service.pool)
    if service.mode == DSR_L2:
        method, tun_type = "route", ""
    else:
        # IPVS's "ipip" is ip6ip6 for an IPv6 service.
        method, tun_type = "tunnel", "gre" if service.mode == DSR_L3_GRE else "ipip"
    key = (service.pool, method, tun_type, port, service.vip.version)
    last = cache.ipvs_dests.get(key)
    if last is not None and last[0] is pool:
        return last[1]
    members = sorted(pool.members, key=lambda m: maglev.canonical_sort_key(str(m.address)))
    dests = tuple(
        ipvs_dest(str(m.address), port, m.weight, method, tun_type)
        for m in members
        if m.address.version == service.vip.version
    )
    cache.ipvs_dests.put(key, (pool, dests))
    return dests


def _flags(service: Service) -> tuple[str, ...]:
    flags = ["mh-fallback"]
    if service.hashing.fields == HASH_SOURCE_IP_PORT:
        flags.append("mh-port")
    return tuple(sorted(flags))


def services_for(intent: Intent, cache: CompileCache) -> tuple[list[IpvsService], dict[int, dict]]:
    """IPVS services, and the fwmark map elements for port ranges per family."""
    result: list[IpvsService] = []
    marks: dict[int, dict] = {4: {}, 6: {}}
    for service in intent.services:
        if not wanted(service):
            continue
        family = service.vip.version
        vip = str(service.vip)
        for proto in service.protocols:
            for ports in service.ports:
                if ports.first == ports.last:
                    result.append(
                        IpvsService(
                            family=family,
                            protocol=proto,
                            address=vip,
                            port=ports.first,
                            fwmark=0,
                            scheduler="mh",
                            flags=_flags(service),
                            dests=_dests(service, intent, ports.first, cache),
                            pointer=ports.pointer,
                        )
                    )
                    continue
                mark = naming.ipvs_fwmark(family, proto, vip, ports.first, ports.last)
                marks[family][(vip, proto, (ports.first, ports.last))] = element(mark, ports.pointer)
                result.append(
                    IpvsService(
                        family=family,
                        protocol="fwmark",
                        address="",
                        port=0,
                        fwmark=mark,
                        scheduler="mh",
                        flags=_flags(service),
                        dests=_dests(service, intent, 0, cache),
                        pointer=ports.pointer,
                    )
                )
    return sorted(result, key=lambda s: s.ident), marks


def mark_chain_and_maps(marks: dict[int, dict]) -> tuple[list[NftChain], list[NftMap]]:
    if not any(marks.values()):
        return [], []
    rules = []
    for family in (4, 6):
        key = {
            "concat": [
                {"payload": {"protocol": ADDR_PROTO[family], "field": "daddr"}},
                {"meta": {"key": "l4proto"}},
                {"payload": {"protocol": "th", "field": "dport"}},
            ]
        }
        value = {"map": {"key": key, "data": f"@{MARK_MAPS[family]}"}}
        rules.append(NftRule.build([{"mangle": {"key": {"meta": {"key": "mark"}}, "value": value}}], "/services"))
    hook = ChainHook(type="filter", hook="prerouting", device=None, priority=-150, policy="accept")
    chain = NftChain(name=MARK_CHAIN, hook=hook, rules=tuple(rules), pointer="/services")
    maps = [
        NftMap(
            name=MARK_MAPS[family],
            key_type=(ADDR_TYPE[family], "inet_proto", "inet_service"),
            data_type="mark",
            flags=("interval",),
            elements=tuple(sorted(marks[family].items())),
            pointer="/services",
        )
        for family in (4, 6)
    ]
    return [chain], maps


def vip_addresses(intent: Intent, lb: LoadBalancerNode) -> list[Address]:
    found: dict[str, Address] = {}
    for service in intent.services:
        if not wanted(service):
            continue
        prefix = 32 if service.vip.version == 4 else 128
        cidr = f"{service.vip}/{prefix}"
        if service.mode == DSR_L2:
            label = f"{lb.interface}{FRONT_LABEL_SUFFIX}"
            ifname = lb.interface
        else:
            label, ifname = "lo:kdsr", "lo"
        if service.vip.version == 6 or len(label) > 15:
            label = ""  # IPv6 has no labels; a long name leaves no room (state file records it)
        found.setdefault(cidr, Address(ifname=ifname, cidr=cidr, label=label, pointer=f"{service.pointer}/vip"))
    return list(found.values())


def compile_ipvs(intent: Intent, lb: LoadBalancerNode, cache: CompileCache) -> dict:
    services, marks = services_for(intent, cache)
    if not services:
        return {}
    chains, maps = mark_chain_and_maps(marks)
    sysctls = [Sysctl(key, value, pointer="/services") for key, value in IPVS_SYSCTLS]
    return {
        "ipvs": tuple(services),
        "chains": chains,
        "maps": maps,
        "addresses": vip_addresses(intent, lb),
        "sysctls": sysctls,
        "modules": ("ip_vs", "ip_vs_mh") + (("nf_tables",) if chains else ()),
    }


def service_labels(intent: Intent) -> dict[str, dict[str, str]]:
    """What each IPVS service of the intent stands for, by its ident: the
    intent's service, pool, VIP, protocol and port ("80", or "5000-5010" for
    a fwmark service) and pointer.  IPVS holds no comment, so `kdsr show`
    and the metrics name kdsr's IPVS services with this (the nft engine's
    elements carry their pointer, its selectors their pool)."""
    found: dict[str, dict[str, str]] = {}
    for service in intent.services:
        if not wanted(service):
            continue
        family, vip = service.vip.version, str(service.vip)
        for proto in service.protocols:
            for ports in service.ports:
                if ports.first == ports.last:
                    ident = IpvsService(family, proto, vip, ports.first, 0, "", ()).ident
                    port = str(ports.first)
                else:
                    mark = naming.ipvs_fwmark(family, proto, vip, ports.first, ports.last)
                    ident = IpvsService(family, "fwmark", "", 0, mark, "", ()).ident
                    port = f"{ports.first}-{ports.last}"
                found[ident] = {
                    "service": service.name,
                    "pool": service.pool,
                    "vip": vip,
                    "protocol": proto,
                    "port": port,
                    "source": ports.pointer,
                }
    return found
