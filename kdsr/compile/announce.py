"""Who announces which VIP, and how: active-active, active-standby, n+m.

Pure and deterministic: every load balancer computes the same assignment
from the same intent, with no coordination.  n+m ranks a VIP's group by a
hash of (VIP, load balancer) (rendezvous hashing), so adding or removing one
load balancer changes the roles of only the VIPs it ranked high for.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from kdsr.intent.model import ANNOUNCE_ACTIVE_STANDBY, ANNOUNCE_N_PLUS_M, ANNOUNCE_VRRP, Intent, Service

ACTIVE = "active"
STANDBY = "standby"


@dataclass(frozen=True)
class Assignment:
    vip: str
    mode: str
    roles: tuple[tuple[str, str], ...]  # (load balancer, ACTIVE | STANDBY), in rank order
    pointer: str  # the announce section it comes from

    def role_of(self, lb: str) -> str | None:
        return dict(self.roles).get(lb)

    def describe(self) -> str:
        actives = " ".join(lb for lb, role in self.roles if role == ACTIVE) or "-"
        standbys = " ".join(lb for lb, role in self.roles if role == STANDBY) or "-"
        return f"{self.mode}: active {actives}; standby {standbys}"


def _rank(vip: str, lb: str) -> str:
    return hashlib.sha256(f"{vip}|{lb}".encode()).hexdigest()


def group_of(intent: Intent, service: Service) -> list[str]:
    speakers = [lb.name for lb in intent.load_balancers if lb.bgp is not None]
    if service.announce.load_balancers is None:
        return speakers
    return [lb for lb in service.announce.load_balancers if lb in speakers]


def assign(intent: Intent, service: Service) -> Assignment:
    announce = service.announce
    group = group_of(intent, service)
    if announce.mode == ANNOUNCE_ACTIVE_STANDBY:
        roles = [(group[0], ACTIVE)] + [(lb, STANDBY) for lb in group[1:]] if group else []
    elif announce.mode == ANNOUNCE_N_PLUS_M:
        vip = str(service.vip)
        ranked = sorted(group, key=lambda lb: _rank(vip, lb))
        n, m = announce.active or 0, announce.standby or 0
        roles = [(lb, ACTIVE) for lb in ranked[:n]] + [(lb, STANDBY) for lb in ranked[n : n + m]]
    else:
        roles = [(lb, ACTIVE) for lb in group]
    return Assignment(str(service.vip), announce.mode, tuple(roles), announce.pointer)


def assignments(intent: Intent) -> list[tuple[Service, Assignment]]:
    """One per VIP (the first service on it, by name; the rules make the others agree)."""
    seen: dict[str, tuple[Service, Assignment]] = {}
    for service in intent.services:
        if service.announce.mode == ANNOUNCE_VRRP:
            continue  # owned on the segment by VRRP (kdsr/compile/keepalived.py), never announced by BGP
        if str(service.vip) not in seen:
            seen[str(service.vip)] = (service, assign(intent, service))
    return list(seen.values())
