"""Cross-object rules for BGP (``load_balancers.*.bgp``, ``services.*.announce``).

The schema checks shapes and ranges.  These rules check what BIRD would
otherwise reject at reload time, or accept and do the wrong thing with:
router IDs, address families, who announces which VIP, and HA groups that
cannot be formed.  Every problem is reported, with the intent path.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable

from kdsr.errors import quote
from kdsr.intent.model import ANNOUNCE_ACTIVE_ACTIVE, ANNOUNCE_ACTIVE_STANDBY, ANNOUNCE_N_PLUS_M, ANNOUNCE_VRRP
from kdsr.intent.values import did_you_mean, names_list, parse_address, parse_interface

Report = Callable[[str, str, str], None]

# Settings that only make sense where some load balancer announces as standby.
STANDBY_SETTINGS = ("prepend", "standby_med")
# Settings that only make sense for n+m.
N_PLUS_M_SETTINGS = ("active", "standby")
# Settings only VRRP reads (kdsr/intent/vrrp_rules.py).
VRRP_SETTINGS = ("virtual_router_id", "advert_interval", "preempt", "unicast")


def check_bgp(services: dict, load_balancers: dict, report: Report) -> None:
    speakers = {name: lb["bgp"] for name, lb in load_balancers.items() if isinstance(lb.get("bgp"), dict)}
    _check_router_ids(speakers, report)
    for name, bgp in speakers.items():
        _check_neighbors(name, bgp, load_balancers[name], report)
    by_vip: dict[str, tuple[str, dict]] = {}
    for name, service in sorted(services.items()):
        announce = service.get("announce", {})
        if not isinstance(announce, dict) or not (announce or speakers):
            continue  # no BGP anywhere: nothing to announce, nothing to check
        if announce.get("mode") == ANNOUNCE_VRRP:
            continue  # owned by VRRP, not announced by BGP: kdsr/intent/vrrp_rules.py
        _check_announce(name, announce, speakers, load_balancers, report)
        _check_same_vip(name, service, announce, by_vip, report)


def _check_router_ids(speakers: dict, report: Report) -> None:
    seen: dict[ipaddress.IPv4Address, str] = {}
    for name, bgp in sorted(speakers.items()):
        pointer = f"/load_balancers/{name}/bgp/router_id"
        try:
            router_id = parse_address(bgp.get("router_id", ""))
        except ValueError as error:
            report(pointer, f"{error}.", 'A router ID is an IPv4 address, e.g. "10.10.0.2".')
            continue
        if router_id.version != 4:
            report(
                pointer,
                f"router ID {router_id} is not an IPv4 address.",
                "BGP router IDs are 32-bit values written as IPv4 addresses, also on IPv6-only hosts; "
                "use e.g. the load balancer's IPv4 address.",
            )
        elif router_id in seen:
            report(
                pointer,
                f"router ID {router_id} is also the router ID of load balancer {seen[router_id]}.",
                "Every BGP speaker needs its own router ID: routers drop sessions and routes from a "
                "peer that shares theirs.",
            )
        else:
            seen[router_id] = name


def _check_neighbors(name: str, bgp: dict, lb: dict, report: Report) -> None:
    own = []
    for text in lb.get("addresses", []):
        try:
            own.append(parse_interface(text))
        except ValueError:
            pass  # reported by the node address rule
    seen: dict = {}
    for i, neighbor in enumerate(bgp.get("neighbors", [])):
        pointer = f"/load_balancers/{name}/bgp/neighbors/{i}"
        try:
            address = parse_address(neighbor.get("address", ""))
        except ValueError as error:
            report(f"{pointer}/address", f"{error}.", 'A neighbor is one router address, e.g. "10.10.0.1".')
            continue
        if address.is_unspecified or address.is_multicast or address.is_loopback:
            report(f"{pointer}/address", f"{address} cannot be a BGP peer.", "Give the router's unicast address.")
            continue
        if any(a.ip == address for a in own):
            report(
                f"{pointer}/address",
                f"{address} is this load balancer's own address.",
                "A neighbor is the router the load balancer peers with.",
            )
            continue
        family = [a for a in own if a.version == address.version]
        if not family:
            report(
                f"{pointer}/address",
                f"neighbor {address} is IPv{address.version}, but load balancer {name} has no IPv{address.version} "
                "address to speak BGP from.",
                f"Add an IPv{address.version} address to /load_balancers/{name}/addresses, or peer over "
                f"IPv{6 if address.version == 4 else 4}.",
            )
        if address in seen:
            report(
                f"{pointer}/address",
                f"neighbor {address} is listed twice (also {seen[address]}).",
                "One session per peer: remove one of them.",
            )
        seen.setdefault(address, pointer)


def _check_announce(name: str, announce: dict, speakers: dict, load_balancers: dict, report: Report) -> None:
    pointer = f"/services/{name}/announce"
    for key in VRRP_SETTINGS:
        if key in announce:
            report(
                f"{pointer}/{key}",
                f"'{key}' is a VRRP setting, but this VIP is announced by BGP "
                f"({announce.get('mode', ANNOUNCE_ACTIVE_ACTIVE)}).",
                f'Remove \'{key}\', or set "mode" to "vrrp".',
            )
    if not speakers:
        report(
            pointer,
            "no load balancer has 'bgp', so nothing would announce this VIP.",
            "Add a 'bgp' section to the load balancers that should announce it, or remove 'announce'.",
        )
        return
    listed = announce.get("load_balancers")
    group = list(listed) if isinstance(listed, list) else sorted(speakers)
    for i, lb in enumerate(listed or []):
        if lb not in load_balancers:
            report(
                f"{pointer}/load_balancers/{i}",
                f"{quote(lb)} is not a load balancer.",
                f"{did_you_mean(lb, list(load_balancers))}Load balancers: {names_list(sorted(load_balancers))}.",
            )
        elif lb not in speakers:
            report(
                f"{pointer}/load_balancers/{i}",
                f"load balancer {quote(lb)} has no 'bgp' section, so it cannot announce this VIP.",
                f"Add /load_balancers/{lb}/bgp, or leave {lb} out of this list.",
            )
    mode = announce.get("mode", ANNOUNCE_ACTIVE_ACTIVE)
    if mode == ANNOUNCE_ACTIVE_ACTIVE:
        for key in STANDBY_SETTINGS + N_PLUS_M_SETTINGS:
            if key in announce:
                report(
                    f"{pointer}/{key}",
                    f"'{key}' is a standby setting, but this VIP is announced active-active: no load balancer "
                    "announces it as standby.",
                    f'Remove \'{key}\', or set "mode" to "active-standby" or "n+m".',
                )
    elif mode == ANNOUNCE_ACTIVE_STANDBY:
        for key in N_PLUS_M_SETTINGS:
            if key in announce:
                report(
                    f"{pointer}/{key}",
                    f"'{key}' is an n+m setting; active-standby has one active and every other listed load "
                    "balancer as standby.",
                    f'Remove \'{key}\', or set "mode" to "n+m".',
                )
        if len(group) < 2:
            report(
                f"{pointer}/mode",
                f"active-standby needs at least 2 load balancers with 'bgp'; this VIP has {len(group)} "
                f"({names_list(group)}).",
                "Add 'bgp' to another load balancer, or use active-active.",
            )
    elif mode == ANNOUNCE_N_PLUS_M:
        active, standby = announce.get("active"), announce.get("standby", 0)
        if active is None:
            report(pointer, "n+m needs 'active' (N, the number of active load balancers).", 'Add e.g. "active": 2.')
        elif isinstance(active, int) and isinstance(standby, int) and active + standby > len(group):
            report(
                f"{pointer}/active",
                f"n+m asks for {active} active + {standby} standby load balancers, but the group has only "
                f"{len(group)} ({names_list(group)}).",
                "Lower 'active' or 'standby', or add load balancers with 'bgp' to the group.",
            )
        if standby == 0:
            for key in STANDBY_SETTINGS:
                if key in announce:
                    report(
                        f"{pointer}/{key}",
                        f"'{key}' is a standby setting, but 'standby' is 0.",
                        f"Remove '{key}', or set 'standby'.",
                    )
    for i, community in enumerate(announce.get("communities", [])):
        parts = community.split(":") if isinstance(community, str) else []
        if len(parts) == 2 and all(p.isdigit() for p in parts) and any(int(p) > 65535 for p in parts):
            report(
                f"{pointer}/communities/{i}",
                f"{quote(community)}: both parts of a standard community are 0-65535.",
                "For 32-bit ASNs use a value below 65536 in each part (large communities are not supported yet).",
            )


def _canonical(announce: dict) -> dict:
    return {k: v for k, v in announce.items() if v not in (None, [], {})}


def _check_same_vip(name: str, service: dict, announce: dict, by_vip: dict, report: Report) -> None:
    """Services on one VIP share its announcement: a route is per prefix."""
    try:
        vip = str(parse_address(service.get("vip", "")))
    except ValueError:
        return
    first = by_vip.setdefault(vip, (name, announce))
    if first[0] != name and _canonical(first[1]) != _canonical(announce):
        report(
            f"/services/{name}/announce",
            f"service {first[0]} announces the same VIP {vip} differently (/services/{first[0]}/announce).",
            "A VIP is one route: give every service on it the same 'announce' (or write it on one and "
            "copy it to the others).",
        )
