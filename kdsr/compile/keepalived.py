"""The keepalived fragment a VRRP load balancer runs: one ``vrrp_instance``
per VIP it may own (announce mode "vrrp"), and the gates that say whether it
may own each one now.

keepalived does the VRRP: it elects the owner of each VIP among the load
balancers listed for it (the first listed has the highest priority), puts
the VIP on the owner's front interface (``virtual_ipaddress``: the kernel
then answers ARP / neighbour solicitations for it there), and announces it
by gratuitous ARP / unsolicited NA when it takes it over.  The fast path
needs nothing else: frames to the VIP now arrive addressed to the owner's
own MAC, which is what the netdev ingress chain forwards (``meta pkttype
host``), before the IP stack sees them.

The gate is keepalived's ``track_file``: kdsr writes 0 (own the VIP) or 1
(give it up: the instance goes to FAULT and advertises priority 0, so a
standby takes over at once) into one file per instance.  keepalived 2.2
treats a missing track file as 0, and drops a track file whose directory is
missing, so the files live in a directory that exists at boot (default
/run) and is emptied then, and ``init_file 1`` makes keepalived create a
missing one as 1: a rebooted load balancer owns nothing until kdsr has read
back this boot's fast path and opened the gate.  Health closes the gate of
a VIP no server can take new flows for; the fragment stays as it is.

The text of the fragment, and reading it back, is kdsr/keepalived_text.py's.
"""

from __future__ import annotations

import ipaddress
import posixpath

from kdsr.intent.model import ANNOUNCE_VRRP, Intent, LoadBalancerNode, Service
from kdsr.intent.vrrp_rules import PRIORITY_STEP, TOP_PRIORITY
from kdsr.keepalived_text import render
from kdsr.model import KeepalivedConfig, VrrpGate, VrrpInstance

GATE_PREFIX = "kdsr-vrrp-"  # track file names in the track directory


def instance_name(family: int, router_id: int) -> str:
    return f"kdsr_v{family}_{router_id}"


def vrrp_services(intent: Intent) -> list[Service]:
    """One service per VRRP VIP (the first by name; the rules make the others agree)."""
    seen: dict[str, Service] = {}
    for service in intent.services:
        if service.announce.mode == ANNOUNCE_VRRP:
            seen.setdefault(str(service.vip), service)
    return list(seen.values())


def group_of(intent: Intent, service: Service) -> list[str]:
    """The load balancers that own the VIP by VRRP, highest priority first."""
    keepers = [lb.name for lb in intent.load_balancers if lb.vrrp is not None]
    if service.announce.load_balancers is None:
        return keepers
    return [lb for lb in service.announce.load_balancers if lb in keepers]


def _address_of(lb: LoadBalancerNode, version: int) -> ipaddress.IPv4Interface | ipaddress.IPv6Interface | None:
    return next((a for a in lb.addresses if a.version == version), None)


def keepalived_config(
    intent: Intent, lb: LoadBalancerNode, withdraw: dict[str, str] | None = None
) -> KeepalivedConfig | None:
    """``withdraw``: VIP -> why this node must not own it now (no serving server).

    The fragment names every VIP assigned to this node, withdrawn or not:
    health gives a VIP up by its gate alone (``gates``), so a health event
    never rewrites the file or reloads keepalived."""
    if lb.vrrp is None:
        return None
    files = lb.vrrp.keepalived
    withdraw = withdraw or {}
    instances, withdrawn = [], []
    for service in vrrp_services(intent):
        group = group_of(intent, service)
        if lb.name not in group:
            continue
        vip = service.vip
        announce = service.announce
        name = instance_name(vip.version, announce.virtual_router_id or 0)
        source = peers = None
        if announce.unicast:
            own = _address_of(lb, vip.version)
            source = str(own.ip) if own else None
            peers = []
            for other in group:
                node = intent.load_balancer(other)
                address = _address_of(node, vip.version) if node is not None and other != lb.name else None
                if address is not None:
                    peers.append(str(address.ip))
        if str(vip) in withdraw:
            withdrawn.append((str(vip), withdraw[str(vip)]))
        instances.append(
            VrrpInstance(
                name=name,
                vip=f"{vip}/{vip.max_prefixlen}",
                interface=lb.interface,
                virtual_router_id=announce.virtual_router_id or 0,
                priority=TOP_PRIORITY - PRIORITY_STEP * group.index(lb.name),
                advert_interval=announce.advert_interval,
                preempt=announce.preempt,
                unicast_source=source,
                unicast_peers=tuple(peers or ()),
                track_file=posixpath.join(files.track_dir, GATE_PREFIX + name.removeprefix("kdsr_")),
                pointer=announce.pointer,
            )
        )
    instances.sort(key=lambda i: (ipaddress.ip_interface(i.vip).version, i.virtual_router_id))
    if not instances:
        return None
    text, lines = render(lb.name, intent.source, tuple(instances))
    return KeepalivedConfig(
        config=files.config,
        fragment=files.fragment,
        pid_file=files.pid_file,
        instances=tuple(instances),
        text=text,
        lines=tuple(lines),
        withdrawn=tuple(withdrawn),
    )


def gates(config: KeepalivedConfig | None) -> tuple[VrrpGate, ...]:
    """One gate per instance: open unless health withdrew the VIP."""
    if config is None:
        return ()
    withdrawn = {vip for vip, _why in config.withdrawn}
    return tuple(
        VrrpGate(i.track_file, open=i.vip.split("/")[0] not in withdrawn, vip=i.vip, pointer=i.pointer)
        for i in config.instances
    )


__all__ = ["gates", "keepalived_config"]
