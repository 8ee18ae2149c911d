"""Which probes a load balancer sends: one target per (monitor, server).

Pure: a function of the intent alone, like compile.  A ``dsr`` probe is
addressed to the VIP and carries an fwmark that routes it to one server
through the path the service's traffic takes:

- ``l2`` (nft engine): the mark selects a kdsr routing table whose default
  route goes *via* the server on the front interface, so the packet leaves
  with the server's MAC and the VIP unchanged, as the MAC rewrite sends it
  (``probe_paths`` gives compile those routes and rules);
- L3 (nft engine): the mark is the server's tunnel mark, whose table routes
  into the server's tunnel: the probe is encapsulated like the traffic.

A ``plain`` probe goes to the server's own address, unmarked.  The server
answers a dsr probe from the VIP straight to the load balancer's address, so
a reply proves the server accepts VIP traffic on that path (VIP on lo, ARP
and rp_filter settings, the decap tunnel).
"""

from __future__ import annotations

from dataclasses import dataclass

from kdsr import naming
from kdsr.intent.model import (
    DSR_L2,
    ENGINE_NFT,
    ENGINE_XDP,
    MONITOR_DSR,
    Intent,
    LoadBalancerNode,
    Monitor,
    Pool,
    PoolMember,
    Service,
)
from kdsr.model import Route, Rule


@dataclass(frozen=True)
class Target:
    pool: str
    server: str  # the member's address: what health takes out of the table
    node: str | None  # the member's server node name, for messages
    monitor: Monitor
    address: str  # where the probe is sent: the VIP (dsr) or the server
    port: int
    mark: int  # SO_MARK for the probe socket; 0: none
    family: int
    service: str | None  # the service whose VIP a dsr probe uses

    @property
    def key(self) -> str:
        """Stable across reloads while the monitor and server stay: state survives a SIGHUP."""
        return f"{self.monitor.pointer}|{self.server}"

    @property
    def label(self) -> str:
        via = f"{self.address}:{self.port} via {self.monitor.mode}" if self.monitor.mode == MONITOR_DSR else ""
        where = via or f"{self.address}:{self.port}"
        return f"{self.monitor.type} {where} ({self.monitor.pointer})"


def _first_port(service: Service) -> int:
    return service.ports[0].first


def _services_on(intent: Intent, pool: Pool) -> list[Service]:
    return list(intent.services_on(pool.name))


# The protocol each monitor type speaks.
MONITOR_PROTOCOL = {"tcp": "tcp", "http": "tcp", "https": "tcp", "udp": "udp"}


def probed_service(monitor: Monitor, services: list[Service]) -> Service | None:
    """The service a pool monitor probes through: with a port, the first (by
    name) that carries that port and the monitor's protocol; else the first.
    (Without a port, verify made sure the services use one port number.)"""
    if monitor.port:
        protocol = MONITOR_PROTOCOL.get(monitor.type)
        for service in services:
            carries = protocol is None or protocol in service.protocols
            if carries and any(r.first <= monitor.port <= r.last for r in service.ports):
                return service
    return services[0] if services else None


def monitored(intent: Intent) -> list[tuple[Monitor, Pool, Service | None]]:
    """Every monitor with the pool it covers and the service it probes through."""
    found = []
    for pool in intent.pools:
        services = _services_on(intent, pool)
        for monitor in pool.health:
            found.append((monitor, pool, probed_service(monitor, services)))
    for service in intent.services:
        for monitor in service.health:
            found.append((monitor, intent.pool(service.pool), service))
    return found


def probe_mark(service: Service, member: PoolMember) -> int:
    if service.mode == DSR_L2:
        return naming.probe_mark(str(member.address))
    return naming.tunnel_mark(service.mode, str(member.address))


def targets_for(intent: Intent) -> list[Target]:
    targets = []
    for monitor, pool, service in monitored(intent):
        port = monitor.port or (_first_port(service) if service else 0)
        for member in pool.members:
            if monitor.mode == MONITOR_DSR:
                assert service is not None  # verify: a dsr monitor needs a service
                if member.address.version != service.vip.version:
                    continue  # a VIP is probed through servers of its own family
                address, mark = str(service.vip), probe_mark(service, member)
            else:
                address, mark = str(member.address), 0
            targets.append(
                Target(
                    pool=pool.name,
                    server=str(member.address),
                    node=member.node,
                    monitor=monitor,
                    address=address,
                    port=port,
                    mark=mark,
                    family=member.address.version,
                    service=service.name if service else None,
                )
            )
    return targets


def probe_paths(intent: Intent, lb: LoadBalancerNode) -> tuple[list[Route], list[Rule]]:
    """The routes and rules that carry l2 dsr probes (L3 probes reuse the tunnels' own)."""
    routes: dict[str, Route] = {}
    rules: dict[str, Rule] = {}
    for monitor, pool, service in monitored(intent):
        if monitor.mode != MONITOR_DSR or service is None:
            continue
        if service.mode != DSR_L2 or service.engine not in (ENGINE_NFT, ENGINE_XDP):
            continue
        for member in pool.members:
            if member.address.version != service.vip.version:
                continue
            family, mark = member.address.version, naming.probe_mark(str(member.address))
            route = Route(family, mark, lb.interface, pointer=monitor.pointer, gateway=str(member.address))
            rule = Rule(family, mark, mark, naming.RULE_PRIORITY, pointer=monitor.pointer)
            routes.setdefault(route.ident, route)
            rules.setdefault(rule.ident, rule)
    return list(routes.values()), list(rules.values())
