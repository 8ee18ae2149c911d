"""The intent as the load balancer should apply it now: health and drains folded in.

A server that is down or drained keeps its place in the pool with weight 0.
The pool's member count, and so its table size, stays the same: only the
slots that server held move (to the others), and no other flow changes
server.  That is exactly what a drain in the intent does, so health takes
the same diff/apply path as any edit.

Down and drained differ in one place: a down member is also marked
``down``, and flow pinning then forgets its pinned flows (they move to the
table's choice at their next packet), where a drained member keeps serving
them.  A member that is drained and down counts as down there: its pinned
flows would otherwise go to a server that does not answer.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from kdsr.compile.cache import CompileCache
from kdsr.intent.model import ALL_DOWN_DROP, Intent, Pool, address_text

# What became of a pool (reported by `kdsr show` and the metrics).
POOL_OK = "ok"
POOL_DEGRADED = "degraded"
POOL_ALL_DOWN_KEPT = "all-down-kept"
POOL_ALL_DOWN_DROPPED = "all-down-dropped"


@dataclass(frozen=True)
class Effective:
    intent: Intent
    pools: dict[str, str]  # pool -> POOL_*
    out: dict[str, tuple[str, ...]]  # pool -> member addresses at weight 0 because of health or drain


def _is_drained(member, drained: frozenset[str]) -> bool:
    return address_text(member.address) in drained or (member.node is not None and member.node in drained)


def _pool(pool: Pool, down: frozenset[tuple[str, str]], drained: frozenset[str]) -> tuple[Pool, str, tuple]:
    serving = [m for m in pool.members if m.weight > 0]
    by_drain = {address_text(m.address) for m in serving if drained and _is_drained(m, drained)}
    by_health = {address_text(m.address) for m in serving if down and (pool.name, address_text(m.address)) in down}
    by_health -= by_drain
    condition = POOL_DEGRADED if by_health else POOL_OK
    if serving and by_health and len(by_drain | by_health) == len(serving):
        # Every server that should serve is down.  Keep: health is ignored
        # for this pool (a check that fails everywhere is more likely wrong
        # than every server); drop: the table empties and the pool's traffic
        # is dropped at the load balancer.
        if pool.all_down == ALL_DOWN_DROP:
            condition = POOL_ALL_DOWN_DROPPED
        else:
            condition, by_health = POOL_ALL_DOWN_KEPT, set()
    out = by_drain | by_health
    # Down for flow pinning: every member health took down, drained or at
    # weight 0 in the intent as well, unless health is ignored for the pool.
    dead = set()
    if down and condition != POOL_ALL_DOWN_KEPT:
        dead = {address_text(m.address) for m in pool.members if (pool.name, address_text(m.address)) in down}
    if not (out or dead):
        return pool, condition, ()
    members = tuple(
        dataclasses.replace(m, weight=0 if a in out else m.weight, down=a in dead)
        if (a := address_text(m.address)) in out or a in dead
        else m
        for m in pool.members
    )
    return dataclasses.replace(pool, members=members), condition, tuple(sorted(out))


def effective_intent(
    intent: Intent, down: frozenset[tuple[str, str]] = frozenset(), drained: frozenset[str] = frozenset()
) -> Effective:
    """``down``: (pool, member address) pairs health took out; ``drained``: addresses or node names.

    With nothing down or drained the intent itself is the effective one
    (the same object, so a CompileCache's answers for it hold)."""
    if not down and not drained:
        return Effective(intent, {p.name: POOL_OK for p in intent.pools}, {p.name: () for p in intent.pools})
    down_in: dict[str, set[tuple[str, str]]] = {}
    for pair in down:
        down_in.setdefault(pair[0], set()).add(pair)
    pools, conditions, out = [], {}, {}
    for pool in intent.pools:
        if drained or pool.name in down_in:
            new, conditions[pool.name], out[pool.name] = _pool(pool, frozenset(down_in.get(pool.name, ())), drained)
        else:  # nothing to take out: skip the walk over its members (1,000 pools, one event)
            new, conditions[pool.name], out[pool.name] = pool, POOL_OK, ()
        pools.append(new)
    return Effective(intent.with_pools(tuple(pools)), conditions, out)


def unserved_services(effective: Effective) -> dict[str, str]:
    """Services no server takes a new flow for (service -> what happens, in
    the operator's words): every server drained or down."""
    why: dict[str, str] = {}
    for pool in effective.intent.pools:
        condition = effective.pools.get(pool.name)
        if condition == POOL_ALL_DOWN_KEPT:
            reason = (
                f"has no healthy server: every server of pool {pool.name} is down, "
                "and all_down keep forwards to them anyway"
            )
        elif condition == POOL_ALL_DOWN_DROPPED:
            reason = f"has no serving server: every server of pool {pool.name} is down; all_down drop drops its traffic"
        elif not any(m.weight > 0 for m in pool.members):
            out = effective.out.get(pool.name, ())
            which = f" ({', '.join(out)})" if out else ""
            reason = (
                f"has no serving server: every server of pool {pool.name} is drained, down or at weight 0{which}; "
                "its traffic is dropped"
            )
        else:
            continue
        for service in effective.intent.services_on(pool.name):
            why[service.name] = reason
    return why


def unserved_vips(effective: Effective, cache: CompileCache | None = None) -> dict[str, str]:
    """VIPs no server can take a new flow for on this node (VIP -> why): BGP
    withdraws them so that routers send their traffic to a load balancer
    that still has servers.  A VIP shared by several services stays while
    any of them is served."""
    # Per pool, why it serves no new flow (None: it serves); once per pool,
    # not per service (10,000 services share 1,000 pools in the bench).
    pool_why: dict[str, str | None] = {}
    for pool in effective.intent.pools:
        if effective.pools.get(pool.name) in (POOL_ALL_DOWN_KEPT, POOL_ALL_DOWN_DROPPED):
            pool_why[pool.name] = f"no healthy server in pool {pool.name}"
        elif not any(m.weight > 0 for m in pool.members):
            pool_why[pool.name] = f"every server of pool {pool.name} drained"
        else:
            pool_why[pool.name] = None
    services = effective.intent.services
    # The last answer, with the services and per-pool reasons it came from:
    # the health daemon asks after every event with the same services (a
    # health event changes members' weights, not services), and at 10,000
    # services the walk is a tenth of a change's compile.
    last = cache.unserved.get("last") if cache is not None else None
    if last is not None and last[0] is services and last[1] == pool_why:
        return dict(last[2])
    why: dict[str, list[str]] = {}
    served: set[str] = set()
    for service in services:
        vip = address_text(service.vip)
        reason = pool_why[service.pool]
        if reason is None:
            served.add(vip)
        else:
            why.setdefault(vip, []).append(reason)
    unserved = {vip: "; ".join(reasons) for vip, reasons in why.items() if vip not in served}
    if cache is not None:
        cache.unserved.put("last", (services, pool_why, unserved))
    return dict(unserved)
