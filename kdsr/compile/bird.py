"""The BIRD 2 fragment a BGP load balancer runs: how each of its VIPs is
announced (the export filter) and to whom (kdsr's own sessions); and the
announce routes that say whether BIRD may announce a VIP now.

BIRD does not announce a VIP because the fragment names it: it announces
the VIPs it learns from kdsr's announce table in the kernel
(naming.ANNOUNCE_TABLE, one blackhole route per VIP; ``protocol kernel``
with ``learn``, ``export none``).  kdsr adds such a route only after the
apply that built this boot's fast path for the VIP was read back, and
deletes it first to withdraw (health, destroy).  The fragment is a file
and outlives a reboot; BIRD reads it at boot, before kdsr has run.  The
kernel table does not: after a reboot it is empty until kdsr fills it, so a
rebooted load balancer announces nothing it cannot yet forward.  BIRD 2
hears a route added to or deleted from the table at once (its netlink
listener), not only at its periodic scan.

The text of the fragment, and reading it back, is kdsr/bird_text.py's.
"""

from __future__ import annotations

import ipaddress

from kdsr.bird_text import render, session_name
from kdsr.compile.announce import STANDBY, assignments
from kdsr.intent.model import Intent, LoadBalancerNode
from kdsr.model import AnnounceRoute, BgpRoute, BgpSession, BirdConfig


def _local_address(lb: LoadBalancerNode, neighbor: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    """The node's address on the neighbour's subnet, else its first of that family."""
    family = [a for a in lb.addresses if a.version == neighbor.version]
    on_link = [a for a in family if neighbor in a.network]
    return str((on_link or family)[0].ip)


def bird_config(intent: Intent, lb: LoadBalancerNode, withdraw: dict[str, str] | None = None) -> BirdConfig | None:
    """``withdraw``: VIP -> why it is not announced now (no healthy server).

    The fragment names every VIP assigned to this node, withdrawn or not:
    health withdraws a VIP by its announce route alone (``announce_routes``),
    so a health event never rewrites the file or reloads BIRD."""
    bgp = lb.bgp
    if bgp is None:
        return None
    withdraw = withdraw or {}
    sessions = tuple(
        BgpSession(
            neighbor=str(n.address),
            asn=n.asn,
            local=_local_address(lb, n.address),
            local_asn=bgp.asn,
            hold_time=bgp.hold_time,
            bfd=n.bfd,
            multihop=n.multihop,
            password=n.password is not None,
            pointer=n.pointer,
        )
        for n in bgp.neighbors
    )
    routes, withdrawn = [], []
    for service, assignment in assignments(intent):
        role = assignment.role_of(lb.name)
        if role is None:
            continue
        vip = service.vip
        prefix = f"{vip}/{vip.max_prefixlen}"
        if str(vip) in withdraw:
            withdrawn.append((prefix, withdraw[str(vip)]))
        announce = service.announce
        routes.append(
            BgpRoute(
                prefix=prefix,
                role=role,
                prepend=announce.prepend if role == STANDBY else 0,
                med=announce.standby_med if role == STANDBY else announce.med,
                communities=announce.communities,
                pointer=announce.pointer,
            )
        )
    routes.sort(key=lambda r: (ipaddress.ip_network(r.prefix).version, ipaddress.ip_network(r.prefix)))
    passwords = {session_name(i): n.password for i, n in enumerate(bgp.neighbors) if n.password is not None}
    text, lines = render(lb.name, intent.source, str(bgp.router_id), sessions, tuple(routes), passwords)
    return BirdConfig(
        config=bgp.bird.config,
        fragment=bgp.bird.fragment,
        socket=bgp.bird.socket,
        router_id=str(bgp.router_id),
        sessions=sessions,
        routes=tuple(routes),
        text=text,
        lines=tuple(lines),
        withdrawn=tuple(withdrawn),
    )


def announce_routes(bird: BirdConfig | None) -> tuple[AnnounceRoute, ...]:
    """The announce routes of the VIPs BIRD may announce now: every VIP the
    fragment names, less those withdrawn."""
    if bird is None:
        return ()
    withdrawn = {prefix for prefix, _why in bird.withdrawn}
    return tuple(AnnounceRoute(r.prefix, pointer=r.pointer) for r in bird.routes if r.prefix not in withdrawn)


__all__ = ["announce_routes", "bird_config"]
