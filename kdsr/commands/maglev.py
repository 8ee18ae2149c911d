"""`kdsr maglev`: how a service's Maglev table shares flows, and what a change moves.

Reads the intent only, builds the table exactly as compile does (same
selector, size and seed), and reports each server's share of the slots and,
with a server taken out (``without``) or put in (``with_``), the fraction of
flows that would go to another server.  A flow's slot is ``jhash mod M``
(nft's reciprocal_scale), so when the change also changes the table size M
(the default size follows the pool size) every flow is re-slotted, and the
report says so.
"""

from __future__ import annotations

import dataclasses
import ipaddress

from kdsr import maglev
from kdsr.compile import lb_nft_l3, lb_xdp
from kdsr.compile.selectors import (
    DEFAULT_SLOTS_PER_SERVER,
    MIN_DEFAULT_TABLE_SIZE,
    SIZED_BY_BUDGET,
    SIZED_BY_DEFAULT,
    SIZED_BY_INTENT,
    SIZED_BY_MAX,
    TABLE_SIZE_LADDER,
    Selector,
    selectors_for,
)
from kdsr.errors import UsageError
from kdsr.intent.model import ENGINE_NFT, ENGINE_XDP, Intent, PoolMember, Service

SIZE_REASONS = {
    SIZED_BY_INTENT: "table_size from the intent",
    SIZED_BY_DEFAULT: (
        f"default: the smallest of {', '.join(str(r) for r in TABLE_SIZE_LADDER if r >= MIN_DEFAULT_TABLE_SIZE)} "
        f"with >= {DEFAULT_SLOTS_PER_SERVER} slots per server"
    ),
    SIZED_BY_MAX: "the largest table kdsr builds",
    SIZED_BY_BUDGET: "capped by the load balancer's slot budget",
}


def _service(intent: Intent, name: str) -> Service:
    for service in intent.services:
        if service.name == name:
            return service
    known = ", ".join(s.name for s in intent.services)
    raise UsageError(f"{intent.source}: no service {name!r} in the intent. Services: {known}.")


def _selector(intent: Intent, service: Service) -> Selector:
    if service.engine not in (ENGINE_NFT, ENGINE_XDP):
        raise UsageError(
            f"{intent.source}: service {service.name} uses the {service.engine} engine, whose table the kernel "
            "builds; kdsr maglev shows the tables kdsr builds (nft and xdp engines)."
        )
    if service.engine == ENGINE_XDP:
        wanted = lb_xdp.selectors_of(service)
    else:
        wanted = lb_nft_l3.wanted if service.is_l3 else None
    return next(s for s in selectors_for(intent, wanted) if service in s.services)


def _member_matches(member: PoolMember, server: str) -> bool:
    return server in (str(member.address), member.node)


def _changed(intent: Intent, pool_name: str, without: str | None, with_: str | None, family: int) -> Intent:
    pools = []
    for pool in intent.pools:
        if pool.name == pool_name:
            members = list(pool.members)
            if without is not None:
                kept = [m for m in members if not _member_matches(m, without)]
                if len(kept) == len(members):
                    listed = ", ".join(f"{m.address} ({m.node})" if m.node else str(m.address) for m in members)
                    raise UsageError(f"{intent.source}: {without!r} is not a member of pool {pool_name} ({listed}).")
                if not kept:
                    raise UsageError(f"{intent.source}: {without!r} is the only member of pool {pool_name}.")
                members = kept
            if with_ is not None:
                try:
                    address = ipaddress.ip_address(with_)
                except ValueError:
                    raise UsageError(f"--with takes a server address, not {with_!r}.") from None
                if address.version != family:
                    raise UsageError(f"--with {with_}: pool {pool_name} holds IPv{family} servers.")
                if any(m.address == address for m in members):
                    raise UsageError(f"{intent.source}: {with_} is already a member of pool {pool_name}.")
                members.append(PoolMember(address=address, weight=1, node=None, mac=None))
            pool = dataclasses.replace(pool, members=tuple(members))
        pools.append(pool)
    return dataclasses.replace(intent, pools=tuple(pools))


def _shares(sel: Selector, table: tuple[str, ...]) -> tuple[list[dict], dict]:
    slots = maglev.shares(table)
    live = [m for m in sel.members if m.weight > 0]
    total_weight = sum(m.weight for m in live)
    rows = []
    ratios = []
    for member in sorted(sel.members, key=lambda m: (m.address.version, int(m.address))):
        count = slots.get(str(member.address), 0)
        fair = len(table) * member.weight / total_weight if total_weight else 0.0
        ratio = count / fair if fair else None
        if ratio is not None:
            ratios.append(ratio)
        rows.append(
            {
                "server": str(member.address),
                "node": member.node,
                "weight": member.weight,
                "slots": count,
                "share": count / len(table) if table else 0.0,
                "vs_fair_share": ratio,
            }
        )
    per_server = len(table) // max(len(live), 1)
    summary = {
        "max_over_mean": max(ratios) if ratios else None,
        "min_over_mean": min(ratios) if ratios else None,
        # Maglev's bound for equal weights (NSDI 2016): 1 + 1/floor(M/N).
        "bound": 1 + 1 / per_server if per_server else None,
    }
    return rows, summary


def report(intent: Intent, service_name: str, without: str | None = None, with_: str | None = None) -> dict:
    service = _service(intent, service_name)
    sel = _selector(intent, service)
    table = sel.addresses()
    rows, summary = _shares(sel, table)
    result = {
        "service": service.name,
        "pool": sel.pool.name,
        "family": sel.family,
        "selector": sel.name,
        "table_size": sel.table_size,
        "sized_by": sel.sized_by,
        "seed": sel.hashing.seed,
        "fields": sel.hashing.fields,
        "servers": rows,
        **summary,
        "change": None,
    }
    if without is None and with_ is None:
        return result
    changed_intent = _changed(intent, sel.pool.name, without, with_, sel.family)
    changed_sel = _selector(changed_intent, _service(changed_intent, service_name))
    after = changed_sel.addresses()
    before_share = maglev.shares(table)
    after_share = maglev.shares(after)
    # Flows that must move: the removed server's, and what the new one takes.
    unavoidable = 0.0
    if without is not None:
        gone = next(str(m.address) for m in sel.members if _member_matches(m, without))
        unavoidable += before_share.get(gone, 0) / len(table)
    if with_ is not None:
        unavoidable += after_share.get(str(ipaddress.ip_address(with_)), 0) / len(after)
    moved = maglev.moved_flow_fraction(table, after)
    result["change"] = {
        "without": without,
        "with": with_,
        "table_size": changed_sel.table_size,
        "table_size_changed": changed_sel.table_size != sel.table_size,
        "moved": moved,
        "unavoidable": unavoidable,
        "moved_beyond_unavoidable": max(moved - unavoidable, 0.0),
        "moved_slots": maglev.moved_fraction(table, after) if len(after) == len(table) else None,
    }
    return result


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def format_report(data: dict) -> str:
    lines = [
        f"service {data['service']}: pool {data['pool']}, IPv{data['family']}, hashing {data['fields']}, "
        f"seed {data['seed']:#x}",
        f"table {data['selector']}: {data['table_size']} slots ({SIZE_REASONS[data['sized_by']]})",
        "",
        f"  {'server':<28} {'node':<12} {'weight':>6} {'slots':>7} {'share':>8} {'vs fair':>8}",
    ]
    for row in data["servers"]:
        lines.append(
            f"  {row['server']:<28} {row['node'] or '-':<12} {row['weight']:>6} {row['slots']:>7} "
            f"{_pct(row['share']):>8} {_ratio(row['vs_fair_share']):>8}"
        )
    lines.append("")
    lines.append(
        f"max/mean {_ratio(data['max_over_mean'])}, min/mean {_ratio(data['min_over_mean'])} "
        f"(Maglev's bound for equal weights: {_ratio(data['bound'])})"
    )
    change = data["change"]
    if change:
        what = " and ".join(
            part
            for part in (
                f"without {change['without']}" if change["without"] else "",
                f"with {change['with']}" if change["with"] else "",
            )
            if part
        )
        lines.append("")
        lines.append(f"{what}: {change['table_size']} slots")
        lines.append(
            f"  flows that move: {_pct(change['moved'])} (unavoidable {_pct(change['unavoidable'])}, "
            f"beyond that {_pct(change['moved_beyond_unavoidable'])})"
        )
        if change["table_size_changed"]:
            lines.append(
                f"  the table size changes ({data['table_size']} -> {change['table_size']}), so every flow is "
                "re-slotted; set hashing.table_size on the pool's services to keep it fixed"
            )
    return "\n".join(lines) + "\n"
