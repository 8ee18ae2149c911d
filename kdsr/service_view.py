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

import ipaddress
from collections import Counter
from dataclasses import dataclass

from kdsr.compile import lb_ipvs, lb_nft_l3
from kdsr.compile.lb_nft_l2 import RANGE_MAPS, SERVICE_MAPS, servers_map_parts
from kdsr.kernel.nft_json import decode_key
from kdsr.model import IpvsService, NftTable

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


class _Maps:
    """One table's maps by name, and its selectors by (pool, family): built
    once per summary, since NftTable.map is a scan and a plan at 10,000 VIPs
    asks about thousands of selectors."""

    def __init__(self, table: NftTable | None) -> None:
        self.by_name = {m.name: m for m in table.maps} if table is not None else {}
        self.selectors: dict[tuple[str, int], list[str]] = {}
        self.servers: dict[tuple[str, int], list[str]] = {}  # the pool's servers maps (L2, each L3 mode)
        for name in sorted(self.by_name):
            if name.startswith("pool-") and selector_pool(name):
                self.selectors.setdefault((selector_pool(name), selector_family(name)), []).append(name)
            elif (parts := servers_map_parts(name)) is not None:
                self.servers.setdefault(parts, []).append(name)

    def slot_servers(self, selector: str) -> list[str]:
        """The selector's Maglev table as servers, slot by slot (empty when unknown)."""
        nmap = self.by_name.get(selector)
        if nmap is None:
            return []
        if nmap.data_type != "mark":
            # A table kdsr made before slots held server ids (an upgrade's
            # plan reads it): the slot holds the address itself, or a goto to
            # the member's own chain (``server-<pool>-v4-<address>``).
            return [_legacy_slot_server(elem.value) for _slot, elem in nmap.elements]
        # A slot holds a server id; the pool's servers maps name the server
        # in each element's comment (every one of them the same way).
        names = server_names(
            self.by_name[n] for n in self.servers.get((selector_pool(selector), selector_family(selector)), ())
        )
        family = selector_family(selector)
        return [names.get(elem.value) or _server_of_id(elem.value, family) for _slot, elem in nmap.elements]

    def pool_shares(self, pool: str, family: int) -> Counter:
        """server -> slots it holds in the pool's tables of this family."""
        total: Counter = Counter()
        for selector in self.selectors.get((pool, family), ()):
            total.update(self.slot_servers(selector))
        return total

    def same_tables(self, other: _Maps, pool: str, family: int) -> bool:
        names = self.selectors.get((pool, family), [])
        if names != other.selectors.get((pool, family), []):
            return False
        servers = self.servers.get((pool, family), [])
        if servers != other.servers.get((pool, family), []):
            return False
        return all(_same(self.by_name.get(n), other.by_name.get(n)) for n in [*names, *servers])


def table_slots(table: NftTable | None) -> dict[str, list[str]]:
    """selector -> its Maglev table as servers (member addresses), slot by slot."""
    maps = _Maps(table)
    return {name: maps.slot_servers(name) for names in maps.selectors.values() for name in names}


def _same(a: object, b: object) -> bool:
    return a is b or a == b


def _legacy_slot_server(value) -> str:
    if isinstance(value, tuple) and len(value) == 2 and value[0] in ("goto", "jump"):
        for family in ("-v4-", "-v6-"):
            _head, sep, address = str(value[1]).rpartition(family)
            if sep and "v" not in address:
                return address.replace("-", ":") if family == "-v6-" else address
        return str(value[1])
    return str(value)


def _server_of_id(ident, family: int) -> str:
    """A server id no servers map names: an IPv4 server's id is its address."""
    if family == 4 and isinstance(ident, int) and 0 <= ident < 2**32:
        return str(ipaddress.IPv4Address(ident))
    return f"id {ident}"


def server_names(servers_maps) -> dict:
    """server id -> the member's address, from servers maps' element comments."""
    names: dict = {}
    for nmap in servers_maps:
        names.update((key, elem.comment) for key, elem in nmap.elements if elem.comment)
    return names


def _elem_parts(item) -> tuple:
    """A listed element -> (key value, data value, comment, (packets, bytes) or None)."""
    key_part, value = item if isinstance(item, list) else (item, None)
    if isinstance(key_part, dict) and "elem" in key_part:
        inner = key_part["elem"]
        counter = inner.get("counter")
        counted = (counter.get("packets", 0), counter.get("bytes", 0)) if counter else None
        return inner["val"], value, inner.get("comment", ""), counted
    return key_part, value, "", None


def _target(value) -> str | None:
    if isinstance(value, dict):
        for verdict in ("goto", "jump"):
            if verdict in value:
                return value[verdict]["target"]
    return None


def read_listing(listing: list[dict]) -> dict:
    """The kernel report's nft part (the shape `kdsr show --json` documents
    under "kernel", and kdsr/health/metrics.py reads):

    - ``services``: per VIP . protocol . port: vip, protocol, port, service,
      pool, selector, packets, bytes, source (the intent pointer);
    - ``servers``: per pool member the table knows: pool, family, server,
      selector (the pool's selectors, comma-separated), slots (over them),
      packets, bytes, counted_in (the servers maps whose elements count it:
      the pool's L2 one and one per L3 mode);
    - ``selectors``: selector -> {"pool", "family", "size", "slots": {server: slots}}.
    """
    maps = {item["map"]["name"]: item["map"] for item in listing if "map" in item}
    counted: dict[tuple[str, int, str], list] = {}  # (pool, family, server) -> [packets, bytes, counted_in]
    names: dict[tuple[str, int], dict] = {}  # (pool, family) -> server id -> address
    for name, obj in maps.items():
        parts = servers_map_parts(name)
        if parts is None:
            continue
        for item in obj.get("elem", []):
            val, _value, comment, count = _elem_parts(item)
            names.setdefault(parts, {})[val] = comment
            entry = counted.setdefault((*parts, comment), [0, 0, ""])
            entry[0] += count[0] if count else 0
            entry[1] += count[1] if count else 0
            entry[2] = ",".join(sorted({*entry[2].split(","), name} - {""}))
    ports = []
    for name in SERVICE_MAP_NAMES:
        for item in maps.get(name, {}).get("elem", []):
            val, value, comment, count = _elem_parts(item)
            vip, protocol, (first, last) = decode_key(val)
            selector = _target(value) or str(value)
            packets, nbytes = count or (0, 0)
            ports.append(
                {
                    "vip": vip,
                    "protocol": protocol,
                    "port": str(first) if first == last else f"{first}-{last}",
                    "service": service_name(comment),
                    "pool": selector_pool(selector),
                    "selector": selector,
                    "packets": packets,
                    "bytes": nbytes,
                    "source": comment,
                }
            )
    selectors: dict[str, dict] = {}
    for name, obj in maps.items():
        pool, family = selector_pool(name), selector_family(name)
        if not pool or not name.startswith("pool-"):
            continue
        by_id = names.get((pool, family), {})
        slots: Counter = Counter()
        for item in obj.get("elem", []):
            _val, value, _c, _n = _elem_parts(item)
            slots[by_id.get(value, f"id {value}")] += 1
        for server in by_id.values():
            slots.setdefault(server, 0)  # drained or down: in the pool, no slot
        selectors[name] = {"pool": pool, "family": family, "size": sum(slots.values()), "slots": dict(slots)}
    members: dict[tuple[str, int, str], dict] = {}
    by_pool: dict[tuple[str, int], list[str]] = {}  # (pool, family) -> its selectors, by name
    for name in sorted(selectors):
        by_pool.setdefault((selectors[name]["pool"], selectors[name]["family"]), []).append(name)
    for key in sorted(set(counted) | {(s["pool"], s["family"], a) for s in selectors.values() for a in s["slots"]}):
        pool, family, server = key
        own = by_pool.get((pool, family), [])
        packets, nbytes, where = counted.get(key, [0, 0, ""])
        members[key] = {
            "pool": pool,
            "family": family,
            "server": server,
            "selector": ",".join(own),
            "slots": sum(selectors[n]["slots"].get(server, 0) for n in own),
            "packets": packets,
            "bytes": nbytes,
            "counted_in": where,
        }
    return {"services": ports, "servers": list(members.values()), "selectors": selectors}


# --- the ipvs engine: IPVS's own counters, in the same rows ----------------------

IPVS = "ipvs"


def ipvs_selector(ident: str) -> str:
    """The name an IPVS service's table goes by in the report's "selectors"."""
    return f"{IPVS} {ident}"


def mark_labels(listing: list[dict]) -> dict[str, dict[str, str]]:
    """What each port range's fwmark IPVS service stands for, from the
    ``inet kdsr`` table's mark maps (kdsr/compile/lb_ipvs.py): VIP, protocol,
    range and the intent pointer of the element's comment (naming the
    service; the pool only the intent knows).  For `kdsr show` without an
    intent, so that a range shows as a VIP's ports, not as a bare mark."""
    found: dict[str, dict[str, str]] = {}
    maps = {item["map"]["name"]: item["map"] for item in listing if "map" in item}
    for family, name in lb_ipvs.MARK_MAPS.items():
        for item in maps.get(name, {}).get("elem", []):
            val, mark, comment, _count = _elem_parts(item)
            vip, protocol, (first, last) = decode_key(val)
            ident = IpvsService(family, "fwmark", "", 0, int(mark), "", ()).ident
            found[ident] = {
                "service": service_name(comment),
                "vip": vip,
                "protocol": protocol,
                "port": str(first) if first == last else f"{first}-{last}",
                "source": comment,
            }
    return found


def read_ipvs(stats: list, labels: dict[str, dict[str, str]]) -> dict:
    """IPVS services (``IpvsBackend.stats``, those kdsr owns) as the rows
    read_listing gives for the nft engine, each marked ``"engine": "ipvs"``
    and with ``connections`` (IPVS's connection table counts them):

    - ``services``: per IPVS service, its counters; VIP, protocol, port,
      service and pool from ``labels`` (lb_ipvs.service_labels of the intent,
      or mark_labels), else what the kernel says (a fwmark service: protocol
      "fwmark", port its mark; service and pool "");
    - ``selectors``: per IPVS service, its destinations' weights as "slots":
      mh gives each destination a part of its table in proportion to its
      weight, and weight 0 (drained, down) takes it out;
    - ``servers``: per pool member, the counters of its destinations in every
      IPVS service of the pool, added up, and its largest weight there.

    Counters are IPVS's own: inbound packets and bytes (a DSR reply never
    crosses the load balancer) and connections scheduled.  They survive
    weight changes, drains and health events, which edit destinations in
    place."""
    ports = []
    selectors: dict[str, dict] = {}
    members: dict[tuple[str, int, str], list[int]] = {}  # (pool, family, server) -> [packets, bytes, conns, weight]
    for entry in stats:
        svc = entry.service
        label = labels.get(svc.ident, {})
        pool = label.get("pool", "")
        if svc.protocol == "fwmark":
            vip, protocol, port = label.get("vip", ""), label.get("protocol", "fwmark"), label.get("port", "")
            port = port or str(svc.fwmark)
        else:
            vip, protocol, port = svc.address, svc.protocol, str(svc.port)
        selector = ipvs_selector(svc.ident)
        ports.append(
            {
                "vip": vip,
                "protocol": protocol,
                "port": port,
                "service": label.get("service", ""),
                "pool": pool,
                "selector": selector,
                "packets": entry.counters.packets,
                "bytes": entry.counters.bytes,
                "connections": entry.counters.connections,
                "source": label.get("source", "") or f"IPVS service {svc.ident}",
                "engine": IPVS,
            }
        )
        weights: dict[str, int] = {}
        for dest in svc.dests:
            weights[dest.address] = weights.get(dest.address, 0) + dest.weight
            counted = entry.dests.get(dest.ident)
            member = members.setdefault((pool, svc.family, dest.address), [0, 0, 0, 0])
            if counted is not None:
                member[0] += counted.packets
                member[1] += counted.bytes
                member[2] += counted.connections
            member[3] = max(member[3], dest.weight)
        selectors[selector] = {
            "pool": pool,
            "family": svc.family,
            "size": sum(weights.values()),
            "slots": weights,
            "engine": IPVS,
        }
    servers = [
        {
            "pool": pool,
            "family": family,
            "server": server,
            "selector": "",
            "slots": weight,
            "packets": packets,
            "bytes": nbytes,
            "connections": conns,
            "counted_in": "",
            "engine": IPVS,
        }
        for (pool, family, server), (packets, nbytes, conns, weight) in sorted(members.items())
    ]
    return {"services": ports, "servers": servers, "selectors": selectors}


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
    old_maps, new_maps = _Maps(before), _Maps(after)
    services = []
    if all(_same(old_maps.by_name.get(n), new_maps.by_name.get(n)) for n in SERVICE_MAP_NAMES):
        old = new = {}  # the same services (the usual daemon change: a pool's servers)
    else:
        old, new = _by_service(service_ports(before)), _by_service(service_ports(after))
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
    for pool, family in sorted(set(old_maps.selectors) | set(new_maps.selectors)):
        if old_maps.same_tables(new_maps, pool, family):
            continue  # the same slots: no share moved
        was, now = old_maps.pool_shares(pool, family), new_maps.pool_shares(pool, family)
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


# --- `kdsr show`: services in the operator's terms ------------------------------

# Without a filter, a table of at most this many services is shown server by
# server; a larger one a line per service (servers under --service, --vip or
# --server).
DETAIL_MAX_SERVICES = 10
SHOW_FORMAT = 1


@dataclass(frozen=True)
class ShowFilter:
    services: tuple[str, ...] = ()  # names, shell patterns allowed ("web*")
    vips: tuple[str, ...] = ()
    servers: tuple[str, ...] = ()  # addresses or server node names

    @property
    def any(self) -> bool:
        return bool(self.services or self.vips or self.servers)


def _connections(rows) -> int | None:
    """Connections of rows of which some count them (IPVS); None where none
    does (the nft and xdp engines keep no connection table)."""
    counted = [r["connections"] for r in rows if r.get("connections") is not None]
    return sum(counted) if counted else None


def _rate(now: dict, before: dict | None, elapsed: float | None) -> dict | None:
    """Packets and bytes per second between two reads; None without two reads
    (or when the counter went backwards: the object was made again)."""
    if before is None or not elapsed:
        return None
    packets, nbytes = now["packets"] - before["packets"], now["bytes"] - before["bytes"]
    if packets < 0 or nbytes < 0:
        return None
    return {"packets": round(packets / elapsed, 1), "bytes": round(nbytes / elapsed, 1)}


def _state(
    health: dict | None, drained: set[str], server: str, node: str | None, weight: int | None, slots: int
) -> tuple[str, str]:
    """(up | down | drained | out, why) for one member of one pool: ``health``
    its entry in kdsr run's view, ``drained`` what `kdsr drain` recorded."""
    if health is not None and health.get("state") == "down":
        why = health.get("last_error") or "a health check fails"
        if slots:
            why += "; kept in the table (every server of the pool is down, all_down keeps them)"
        if not health.get("daemon", True):
            why += " (kdsr run is not running: last known)"
        return "down", why
    if server in drained or (node is not None and node in drained):
        return "drained", f"kdsr drain {node if node in drained else server}"
    if weight == 0:
        return "drained", "weight 0 in the intent"
    if slots:
        return "up", "health checks pass" if health is not None else "no health check"
    if node is None and drained:
        # Drains name nodes; without the intent, which address is which node is unknown.
        return "out", f"holds no slot; drained here: {', '.join(sorted(drained))} (pass the intent to tell)"
    return "out", "holds no slot"


def services_view(report: dict, before: dict | None = None, elapsed: float | None = None) -> list[dict]:
    """Per service (by name): its VIP, ports, pool, counters, rate, and its
    pool's members with state, weight, share, counters and rate.

    ``before``: an earlier report, ``elapsed`` seconds older, for rates.  A
    server's counters are its pool's (one counter per pool member): services
    that share a pool share them (and a pool that serves services on two
    engines, say nft and ipvs, adds both engines' counters)."""
    old_ports = {(p["vip"], p["protocol"], p["port"]): p for p in (before or {}).get("services", ())}
    old_servers = _members((before or {}).get("servers", ()))
    members = _members(report.get("servers", ()))
    by_pool: dict[tuple[str, int], set[str]] = {}
    for pool, family, address in members:
        by_pool.setdefault((pool, family), set()).add(address)
    health = {(h.get("pool"), h.get("server")): h for h in report.get("health") or ()}
    drained = {d["server"] for d in report.get("drained") or ()}
    nodes = {h.get("server"): h.get("server_node") for h in report.get("health") or () if h.get("server_node")}
    intent_pools = report.get("pools") or {}
    grouped: dict[str, list[dict]] = {}
    for port in report.get("services", ()):
        grouped.setdefault(port["service"] or port["vip"], []).append(port)
    services = []
    for name in sorted(grouped):
        ports = grouped[name]
        selector = ports[0]["selector"]
        pool = ports[0]["pool"]
        table = report.get("selectors", {}).get(selector, {"size": 0, "slots": {}})
        family = table.get("family") or selector_family(selector)
        packets = sum(p["packets"] for p in ports)
        nbytes = sum(p["bytes"] for p in ports)
        was = [old_ports.get((p["vip"], p["protocol"], p["port"])) for p in ports]
        rate = None
        if before is not None and all(w is not None for w in was):
            rate = _rate(
                {"packets": packets, "bytes": nbytes},
                {"packets": sum(w["packets"] for w in was), "bytes": sum(w["bytes"] for w in was)},
                elapsed,
            )
        known = {m["server"]: m for m in intent_pools.get(pool, ()) if (":" in m["server"]) == (family == 6)}
        addresses = sorted(by_pool.get((pool, family), set()) | set(known) | set(table["slots"]), key=_address_order)
        servers = []
        for address in addresses:
            counted = members.get((pool, family, address), {"packets": 0, "bytes": 0, "connections": None})
            slots = table["slots"].get(address, 0)
            member = known.get(address) or {"node": nodes.get(address)}
            state, why = _state(
                health.get((pool, address)), drained, address, member.get("node"), member.get("weight"), slots
            )
            servers.append(
                {
                    "server": address,
                    "node": member.get("node"),
                    "state": state,
                    "reason": why,
                    "weight": member.get("weight"),
                    "slots": slots,
                    "share": round(slots / table["size"], 4) if table["size"] else 0.0,
                    "packets": counted["packets"],
                    "bytes": counted["bytes"],
                    "connections": counted["connections"],
                    "rate": _rate(counted, old_servers.get((pool, family, address)), elapsed),
                }
            )
        serving = sum(1 for s in servers if s["slots"])
        services.append(
            {
                "service": name,
                "vip": ports[0]["vip"],
                "ports": [
                    {
                        "protocol": p["protocol"],
                        "port": p["port"],
                        "packets": p["packets"],
                        "bytes": p["bytes"],
                        "connections": p.get("connections"),
                    }
                    for p in sorted(ports, key=lambda p: (p["protocol"], int(p["port"].split("-")[0])))
                ],
                "pool": pool,
                "engine": ports[0].get("engine", "nft"),
                "selector": selector,
                "packets": packets,
                "bytes": nbytes,
                "connections": _connections(ports),
                "rate": rate,
                "serving": serving,
                "no_server": serving == 0,
                "servers": servers,
            }
        )
    return services


def _members(rows) -> dict[tuple[str, int, str], dict]:
    """(pool, family, server) -> its counters, the rows of the same member
    added up (a pool on two engines), except rows of one counter
    (``counted_in``: the xdp engine's per-server counter, in a row per
    selector of the pool), which count once, as the metrics count them."""
    found: dict[tuple[str, int, str], dict] = {}
    seen: set[tuple] = set()
    for row in rows:
        key = (row["pool"], row["family"], row["server"])
        if row.get("counted_in"):
            if (row["counted_in"], *key) in seen:
                continue
            seen.add((row["counted_in"], *key))
        have = found.get(key)
        if have is None:
            found[key] = {"packets": row["packets"], "bytes": row["bytes"], "connections": row.get("connections")}
            continue
        have["packets"] += row["packets"]
        have["bytes"] += row["bytes"]
        have["connections"] = _connections([have, row])
    return found


def _address_order(address: str) -> tuple:
    import ipaddress  # noqa: PLC0415 (only for sorting)

    try:
        parsed = ipaddress.ip_address(address)
    except ValueError:
        return (2, 0, address)
    return (parsed.version, int(parsed), address)


def filtered(services: list[dict], which: ShowFilter) -> list[dict]:
    """The services ``which`` selects; under --server, only that server's rows."""
    import fnmatch  # noqa: PLC0415

    found = []
    for service in services:
        if which.services and not any(fnmatch.fnmatchcase(service["service"], p) for p in which.services):
            continue
        if which.vips and service["vip"] not in which.vips:
            continue
        if which.servers:
            rows = [s for s in service["servers"] if s["server"] in which.servers or s["node"] in which.servers]
            if not rows:
                continue
            service = {**service, "servers": rows}
        found.append(service)
    return found


def _count(value: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= size:
            return f"{value / size:.1f}{unit}"
    return f"{value:g}"


def _rate_text(rate: dict | None) -> str:
    return "-" if rate is None else f"{_count(rate['packets'])} pps {_count(rate['bytes'] * 8)}bit/s"


def _listens(service: dict) -> str:
    by_proto: dict[str, list[str]] = {}
    for p in service["ports"]:
        by_proto.setdefault(p["protocol"], []).append(p["port"])
    return " ".join(f"{proto}/{','.join(ports)}" for proto, ports in sorted(by_proto.items()))


def show_lines(services: list[dict], detail: bool, rates: bool) -> list[str]:
    """The services part of `kdsr show`: a line per service, and with
    ``detail`` its servers under it."""
    if not services:
        return []
    lines = []
    head = f"{'SERVICE':<16} {'VIP':<24} {'PORTS':<18} {'POOL':<12} {'SERVERS':<12} {'PACKETS':>9} {'BYTES':>9}"
    lines.append(head + ("  RATE" if rates else ""))
    for s in services:
        serving = "no server" if s["no_server"] else f"{s['serving']}/{len(s['servers'])} up"
        line = (
            f"{s['service']:<16} {s['vip']:<24} {_listens(s):<18} {s['pool']:<12} {serving:<12} "
            f"{_count(s['packets']):>9} {_count(s['bytes']):>9}"
        )
        lines.append(line + (f"  {_rate_text(s['rate'])}" if rates else ""))
        if detail:
            for r in s["servers"]:
                weight = "-" if r["weight"] is None else str(r["weight"])
                node = f" ({r['node']})" if r["node"] else ""
                text = (
                    f"    {r['server'] + node:<30} {r['state']:<8} weight {weight:<3} {100 * r['share']:5.1f}%"
                    f"  {_count(r['packets']):>7} pkts {_count(r['bytes']):>7} B"
                )
                if r.get("connections") is not None:
                    text += f" {_count(r['connections']):>7} conns"
                if rates:
                    text += f"  {_rate_text(r['rate'])}"
                lines.append(f"{text}  ({r['reason']})")
    if any(s.get("engine") == IPVS for s in services):
        lines.append(
            "(ipvs engine: IPVS's own counters, inbound only (DSR replies do not cross the load balancer); "
            "conns: connections IPVS scheduled; share: of the destinations' weights)"
        )
    return lines
