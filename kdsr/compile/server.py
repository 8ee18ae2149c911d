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

from kdsr.intent.model import Intent, ServerNode
from kdsr.model import Address, Desired, Sysctl

LOOPBACK = "lo"
# Linux labels must start with the interface name; 15 bytes at most.
ADDRESS_LABEL = "lo:kdsr"
ARP_SYSCTLS = (("arp_ignore", "1"), ("arp_announce", "2"))


def compile_server(intent: Intent, server: ServerNode) -> Desired:
    addresses: dict[str, Address] = {}
    has_ipv4_vip = False
    for service in intent.services:
        pool = intent.pool(service.pool)
        if not any(m.node == server.name for m in pool.members):
            continue
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

    return Desired(
        node=server.name,
        role="server",
        addresses=tuple(sorted(addresses.values(), key=lambda a: a.ident)),
        sysctls=tuple(sorted(sysctls, key=lambda s: s.key)),
    )
