"""The load balancer's table in the operator's terms: services and servers.

An operator thinks "service web on 10.10.0.100 tcp/80 and 443, pool web,
three servers with a third of the table each", not "elements of
services-v4 and pool-web-v4-60e94c".  This module reads those terms back out
of an nft table (the compiled one or the one the kernel lists), so that the
plan can say what a change does to services and servers before the object
lines, and `kdsr show` can report per service.

- A service port is an element of a service map: ``VIP . protocol . port ->
  jump <selector>``, its comment the intent pointer
  ``/services/<name>/ports/<i>``, which names the service.
- A selector (``pool-<pool>-v<family>-<digest>``) is one Maglev table: slot ->
  server.  What a slot holds depends on the path: a server address (L2), a
  MAC (MACs pinned in the intent), a server id looked up in the pool's
  servers map (flow pinning), or a tunnel mark looked up in the tunnel
  address maps (L3).  ``shares`` turns all of them into server -> slots.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from kdsr.compile import lb_nft_l3
from kdsr.compile.lb_nft_l2 import RANGE_MAPS, SERVICE_MAPS, servers_map_name
from kdsr.model import NftTable

SERVICE_MAP_NAMES = (
    *SERVICE_MAPS.values(),
    *RANGE_MAPS.values(),
    *lb_nft_l3.SERVICE_MAPS.values(),
    *lb_nft_l3.RANGE_MAPS.values(),
)


@dataclass(frozen=True)
class ServicePort:
    service: str  # the intent's service name ("" when the element carries no pointer)
    vip: str
    protocol: str
    port: str  # "80" or "5000-5010"
    selector: str
    map: str  # the service map the element is in
    key: tuple  # the element's key, to find its counters

    @property
    def pool(self) -> str:
        return selector_pool(self.selector)

    @property
    def family(self) -> int:
        return selector_family(self.selector)


def selector_pool(selector: str) -> str:
    """``pool-web-v4-60e94c`` -> ``web`` ("" for any other name)."""
    head, _, rest = selector.partition("-")
    parts = rest.rsplit("-", 2)
    if head != "pool" or len(parts) != 3 or parts[1] not in ("v4", "v6"):
        return ""
    return parts[0]


def selector_family(selector: str) -> int:
    parts = selector.rsplit("-", 2)
    return int(parts[1][1]) if len(parts) == 3 and parts[1] in ("v4", "v6") else 0


def service_name(pointer: str) -> str:
    parts = pointer.split("/")
    return parts[2] if len(parts) > 2 and parts[1] == "services" else ""


def service_ports(table: NftTable | None) -> list[ServicePort]:
    """Every VIP . protocol . port the table balances, with its service and selector."""
    found = []
    for name in SERVICE_MAP_NAMES:
        nmap = table.map(name) if table is not None else None
        for key, elem in nmap.elements if nmap is not None else ():
            vip, protocol, (first, last) = key
            port = str(first) if first == last else f"{first}-{last}"
            selector = elem.value[1] if isinstance(elem.value, tuple) else str(elem.value)
            found.append(ServicePort(service_name(elem.comment), vip, protocol, port, selector, name, key))
    return found


def _mark_names(table: NftTable) -> dict:
    """What a mark in a slot stands for: L3 tunnel marks -> server address."""
    names: dict = {}
    for name in lb_nft_l3.TUNNEL_ADDRESSES.values():
        nmap = table.map(name)
        names.update((key, elem.value) for key, elem in (nmap.elements if nmap is not None else ()))
    return names


def slot_servers(table: NftTable | None, selector: str) -> list[str]:
    """The selector's Maglev table as servers, slot by slot (empty when unknown)."""
    nmap = table.map(selector) if table is not None else None
    if nmap is None:
        return []
    if nmap.data_type != "mark":
        return [str(elem.value) for _slot, elem in nmap.elements]
    # Flow pinning: the slot names a server id of the pool's servers map;
    # L3: a tunnel mark whose address map names the server.
    names = _mark_names(table)
    servers = table.map(servers_map_name(selector_pool(selector), selector_family(selector)))
    if servers is not None:
        names.update((key, elem.value) for key, elem in servers.elements)
    return [str(names.get(elem.value, f"id {elem.value}")) for _slot, elem in nmap.elements]


def shares(table: NftTable | None, selector: str) -> Counter:
    """server -> slots it holds in the selector's table."""
    return Counter(slot_servers(table, selector))


def selectors(table: NftTable | None) -> list[str]:
    """Every selector (Maglev table) of the table, by name."""
    if table is None:
        return []
    return sorted(m.name for m in table.maps if selector_pool(m.name) and m.name.startswith("pool-"))


# --- a plan's summary ----------------------------------------------------------

# Added services beyond this many are counted, not listed (a first apply of
# 10,000 VIPs); removed ones are always listed: a deletion is never hidden.
ADDED_LISTED = 20


def _share(slots: int, total: int) -> str:
    return f"{100.0 * slots / total:.1f}%" if total else "-"


def _describe_ports(ports: list[ServicePort]) -> str:
    vips = sorted({p.vip for p in ports})
    by_proto: dict[str, list[str]] = {}
    for p in sorted(ports, key=lambda p: (p.protocol, int(p.port.split("-")[0]))):
        by_proto.setdefault(p.protocol, []).append(p.port)
    pools = sorted({p.pool for p in ports})
    listed = " ".join(f"{proto}/{','.join(dict.fromkeys(nums))}" for proto, nums in sorted(by_proto.items()))
    return f"{', '.join(vips)} {listed} -> pool {', '.join(pools)}"


def summarise(before: NftTable | None, after: NftTable | None, members: dict[tuple[str, int], dict[str, str]]) -> dict:
    """What a change from ``before`` to ``after`` does to services and servers.

    ``members``: (pool, family) -> server (address, or MAC where the intent
    pins MACs) -> its state in the intent after the change ("weight 2",
    "drained", "down"), to say why a share moves.  Returns {"services": [...],
    "pools": [...]} (the plan JSON's "summary")."""
    old, new = _by_service(service_ports(before)), _by_service(service_ports(after))
    services = []
    for name in sorted(set(old) | set(new)):
        was, now = old.get(name), new.get(name)
        if was is None:
            services.append({"action": "create", "service": name, "what": _describe_ports(now)})
        elif now is None:
            services.append({"action": "delete", "service": name, "what": _describe_ports(was)})
        elif {(p.vip, p.protocol, p.port, p.pool) for p in was} != {(p.vip, p.protocol, p.port, p.pool) for p in now}:
            services.append(
                {"action": "update", "service": name, "what": _describe_ports(now), "was": _describe_ports(was)}
            )
    pools = []
    for pool, family in sorted(_pool_families(before) | _pool_families(after)):
        was, now = _pool_shares(before, pool, family), _pool_shares(after, pool, family)
        was_total, now_total = sum(was.values()), sum(now.values())
        states = members.get((pool, family), {})
        rows = []
        for server in sorted(set(was) | set(now) | set(states)):
            before_share, after_share = _share(was[server], was_total), _share(now[server], now_total)
            if before_share == after_share:
                continue
            rows.append(
                {
                    "server": server,
                    "state": states.get(server, "removed"),
                    "slots_before": was[server],
                    "slots_after": now[server],
                    "share_before": before_share,
                    "share_after": after_share,
                }
            )
        if rows:
            pools.append({"pool": pool, "family": family, "servers": rows})
    return {"services": services, "pools": pools}


def _by_service(ports: list[ServicePort]) -> dict[str, list[ServicePort]]:
    found: dict[str, list[ServicePort]] = {}
    for port in ports:
        found.setdefault(port.service or f"{port.vip}", []).append(port)
    return found


def _pool_families(table: NftTable | None) -> set[tuple[str, int]]:
    return {(selector_pool(s), selector_family(s)) for s in selectors(table)}


def _pool_shares(table: NftTable | None, pool: str, family: int) -> Counter:
    total: Counter = Counter()
    for selector in selectors(table):
        if selector_pool(selector) == pool and selector_family(selector) == family:
            total.update(shares(table, selector))
    return total


def summary_lines(summary: dict) -> list[str]:
    """The summary as the plan's opening lines."""
    lines = []
    added = [s for s in summary["services"] if s["action"] == "create"]
    others = [s for s in summary["services"] if s["action"] != "create"]
    if summary["services"]:
        lines.append("Services:")
        for s in added[:ADDED_LISTED]:
            lines.append(f"  + service {s['service']}: {s['what']}")
        if len(added) > ADDED_LISTED:
            lines.append(f"  + ... and {len(added) - ADDED_LISTED} more services added (see --json)")
        for s in others:
            if s["action"] == "delete":
                lines.append(f"  - service {s['service']}: {s['what']} (no longer balanced here)")
            else:
                lines.append(f"  ~ service {s['service']}: {s['what']} (was {s['was']})")
    if summary["pools"]:
        lines.append("Servers (share of the pool's Maglev table, before -> after):")
        for pool in summary["pools"]:
            lines.append(f"  pool {pool['pool']} (IPv{pool['family']}):")
            for row in pool["servers"]:
                symbol = "+" if not row["slots_before"] else "-" if not row["slots_after"] else "~"
                lines.append(
                    f"    {symbol} {row['server']}  {row['state']}  {row['share_before']} -> {row['share_after']}"
                )
    return lines
