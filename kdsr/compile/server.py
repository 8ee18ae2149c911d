"""Server role for L2 DSR: the VIP on loopback, and silence about it on the wire.

The load balancer delivers the client's packet unchanged, addressed to the
VIP, so the server must accept the VIP as local (an address on ``lo``) and
answer from it.  It must *not* answer ARP for it on its uplink, or clients and
routers would send VIP traffic straight to one server ("ARP flux"):

- ``arp_ignore=1``: answer ARP only for addresses on the receiving interface;
- ``arp_announce=2``: never use the VIP as the source of our own ARP requests.

The kernel uses max(conf/all, conf/<iface>) for both, so both are set.
IPv6 needs nothing: Linux answers neighbour solicitations only for addresses
on the receiving interface, so a VIP on ``lo`` is silent on the uplink.
"""

from __future__ import annotations

from kdsr import naming
from kdsr.intent.model import L3_TUNNELS, Intent, ServerNode
from kdsr.model import (
    Address,
    ChainHook,
    Desired,
    Link,
    NftChain,
    NftMap,
    NftRule,
    NftTable,
    Sysctl,
    element,
)

LOOPBACK = "lo"
# Linux labels must start with the interface name; 15 bytes at most.
ADDRESS_LABEL = "lo:kdsr"
ARP_SYSCTLS = (("arp_ignore", "1"), ("arp_announce", "2"))


# rp_filter: 1 (strict) drops a decapsulated packet, whose source (the
# client) is routed out of the uplink, not the tunnel.  0 and 2 (loose) let it
# in; the kernel uses max(all, iface), so both must be <= 2 and neither 1.
RP_FILTER_LOOSE = "2"
MSS_TABLE_FAMILY = "inet"
MSS_TABLE_NAME = "kdsr"
MSS_CHAIN = "mss-clamp"
MSS_MAPS = {4: "mss-v4", 6: "mss-v6"}
_ADDR = {4: ("ip", "ipv4_addr"), 6: ("ip6", "ipv6_addr")}


def _served(intent: Intent, server: ServerNode):
    for service in intent.services:
        pool = intent.pool(service.pool)
        members = [m for m in pool.members if m.node == server.name]
        if members:
            yield service, members


def _decap_links(intent: Intent, server: ServerNode) -> dict[str, Link]:
    """One decapsulating link per tunnel kind, bound to the member address the
    load balancers send to, accepting every load balancer (remote any)."""
    links: dict[str, Link] = {}
    for service, members in _served(intent, server):
        if not service.is_l3:
            continue
        kind = L3_TUNNELS[service.mode][0]
        name = naming.DECAP_LINK[kind]
        for member in members:
            links.setdefault(name, Link(name, kind, str(member.address), "", pointer=member.pointer))
    return links


def _clamp_chain(value: int) -> NftChain:
    syn_ack = {
        "match": {
            "op": "==",
            "left": {"&": [{"payload": {"protocol": "tcp", "field": "flags"}}, ["syn", "ack", "rst"]]},
            "right": ["syn", "ack"],
        }
    }
    mss = {"tcp option": {"name": "maxseg", "field": "size"}}
    larger = {"match": {"op": ">", "left": mss, "right": value}}
    clamp = {"mangle": {"key": mss, "value": value}}
    return NftChain(name=f"clamp-{value}", hook=None, rules=(NftRule.build([syn_ack, larger, clamp], "/services"),))


def _mss_table(intent: Intent, server: ServerNode) -> NftTable | None:
    """Servers advertise a smaller MSS on connections to an L3 VIP, so the
    segments clients send fit the path once the load balancer encapsulates
    them.  The SYN-ACK leaves the server directly, so this is the one place
    that can clamp it; matched by VIP and service port."""
    elements: dict[int, dict] = {4: {}, 6: {}}
    values: set[int] = set()
    for service, _members in _served(intent, server):
        if service.mss_clamp is None or "tcp" not in service.protocols:
            continue
        values.add(service.mss_clamp)
        for ports in service.ports:
            key = (str(service.vip), (ports.first, ports.last))
            elements[service.vip.version][key] = element(
                ("jump", f"clamp-{service.mss_clamp}"), f"{service.pointer}/dsr/mss_clamp"
            )
    if not values:
        return None
    rules = []
    for family in (4, 6):
        ip = _ADDR[family][0]
        key = {
            "concat": [
                {"payload": {"protocol": ip, "field": "saddr"}},
                {"payload": {"protocol": "tcp", "field": "sport"}},
            ]
        }
        rules.append(NftRule.build([{"vmap": {"key": key, "data": f"@{MSS_MAPS[family]}"}}], "/services"))
    hook = ChainHook(type="filter", hook="output", device=None, priority=-150, policy="accept")
    chains = [NftChain(name=MSS_CHAIN, hook=hook, rules=tuple(rules), pointer=server.pointer)]
    chains += [_clamp_chain(v) for v in sorted(values)]
    maps = [
        NftMap(
            name=MSS_MAPS[family],
            key_type=(_ADDR[family][1], "inet_service"),
            data_type="verdict",
            flags=("interval",),
            elements=tuple(sorted(elements[family].items())),
            pointer="/services",
        )
        for family in (4, 6)
    ]
    return NftTable(
        family=MSS_TABLE_FAMILY,
        name=MSS_TABLE_NAME,
        chains=tuple(sorted(chains, key=lambda c: c.name)),
        maps=tuple(maps),
        pointer=server.pointer,
    )


def compile_server(intent: Intent, server: ServerNode) -> Desired:
    addresses: dict[str, Address] = {}
    has_ipv4_vip = False
    for service, _members in _served(intent, server):
        has_ipv4_vip |= service.vip.version == 4
        prefix = 32 if service.vip.version == 4 else 128
        cidr = f"{service.vip}/{prefix}"
        if cidr not in addresses:
            label = ADDRESS_LABEL if service.vip.version == 4 else ""
            addresses[cidr] = Address(ifname=LOOPBACK, cidr=cidr, label=label, pointer=f"{service.pointer}/vip")

    sysctls = []
    if has_ipv4_vip:
        for scope in ("all", server.interface):
            for name, value in ARP_SYSCTLS:
                key = f"net/ipv4/conf/{scope}/{name}"
                sysctls.append(Sysctl(key=key, value=value, at_least=True, pointer=server.pointer))

    links = _decap_links(intent, server)
    # An IPv4 decap link needs an address of its own: rp_filter (even loose)
    # drops every packet arriving on an interface without one (the kernel's
    # "no_addr" case, seen in the lab as TcpExtIPReversePathFilter).  The
    # VIP serves, as in the classic LVS-TUN set-up.
    for name, link in links.items():
        if link.family != 4:
            continue
        for service, _members in _served(intent, server):
            if service.is_l3 and L3_TUNNELS[service.mode][0] == link.kind:
                cidr = f"{service.vip}/32"
                addresses.setdefault(
                    f"{name} {cidr}",
                    Address(ifname=name, cidr=cidr, label=f"{name}:kdsr", pointer=f"{service.pointer}/vip"),
                )
    if any(link.family == 4 for link in links.values()):
        for scope in ["all", server.interface] + sorted(n for n, link in links.items() if link.family == 4):
            key = f"net/ipv4/conf/{scope}/rp_filter"
            sysctls.append(Sysctl(key=key, value=RP_FILTER_LOOSE, also=("0",), pointer=server.pointer))
    modules = sorted({_DECAP_MODULES[link.kind] for link in links.values()})
    mss = _mss_table(intent, server)
    return Desired(
        node=server.name,
        role="server",
        addresses=tuple(sorted(addresses.values(), key=lambda a: a.ident)),
        sysctls=tuple(sorted(sysctls, key=lambda s: s.key)),
        links=tuple(sorted(links.values(), key=lambda x: x.name)),
        tables=(mss,) if mss else (),
        modules=tuple(modules + (["nf_tables"] if mss else [])),
    )


_DECAP_MODULES = {"ipip": "ipip", "gre": "ip_gre", "ip6tnl": "ip6_tunnel"}
