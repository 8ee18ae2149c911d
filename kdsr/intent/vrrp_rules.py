"""Cross-object rules for VRRP (``load_balancers.*.vrrp``, ``announce.mode: "vrrp"``).

The schema checks shapes and ranges.  These rules check what keepalived
would reject at reload, or accept and do the wrong thing with: two VIPs on
one virtual router ID (keepalived refuses the second instance, or both
fight over one ID on the wire), a group that names a load balancer without
keepalived, a load balancer with no address to speak VRRP from, services on
one VIP that would own it differently, and fast paths kdsr has not proven
under VRRP.  Every problem is reported, with the intent path.
"""

from __future__ import annotations

from collections.abc import Callable

from kdsr.errors import quote
from kdsr.intent.model import ANNOUNCE_VRRP, DSR_L2, ENGINE_NFT
from kdsr.intent.values import did_you_mean, names_list, parse_address, parse_interface

Report = Callable[[str, str, str], None]

# BGP-only settings of an announce section.
BGP_SETTINGS = ("active", "standby", "prepend", "standby_med", "med", "communities")
# keepalived priorities: the first listed load balancer gets the highest;
# 255 is reserved for the address owner (RFC 5798) and 0 means "leaving".
TOP_PRIORITY = 200
PRIORITY_STEP = 10
MAX_GROUP = TOP_PRIORITY // PRIORITY_STEP


def check_vrrp(services: dict, load_balancers: dict, report: Report) -> None:
    keepers = {name for name, lb in load_balancers.items() if isinstance(lb.get("vrrp"), dict)}
    by_vip: dict[str, tuple[str, dict | None]] = {}
    by_router_id: dict[tuple[int, int], tuple[str, str]] = {}
    for name, service in sorted(services.items()):
        announce = service.get("announce")
        vrrp = isinstance(announce, dict) and announce.get("mode") == ANNOUNCE_VRRP
        try:
            vip = parse_address(service.get("vip", ""))
        except ValueError:
            vip = None  # reported by the VIP rule
        if vip is not None:
            _check_same_vip(name, str(vip), announce if vrrp else None, by_vip, report)
        if not vrrp:
            continue
        pointer = f"/services/{name}/announce"
        _check_settings(pointer, announce, report)
        _check_fast_path(name, service, report)
        group = _check_group(pointer, announce, keepers, load_balancers, report)
        if vip is None:
            continue
        for lb in group:
            _check_source(lb, vip, load_balancers[lb], bool(announce.get("unicast")), pointer, report)
        router_id = announce.get("virtual_router_id")
        if isinstance(router_id, int) and by_vip.get(str(vip), ("",))[0] == name:
            first = by_router_id.setdefault((vip.version, router_id), (name, str(vip)))
            if first[1] != str(vip):
                report(
                    f"{pointer}/virtual_router_id",
                    f"virtual router ID {router_id} is also VIP {first[1]}'s (service {first[0]}); on one segment "
                    f"an IPv{vip.version} virtual router ID names one VRRP router.",
                    "Give every VIP its own virtual_router_id (1-255; IPv4 and IPv6 count apart).",
                )


def _check_settings(pointer: str, announce: dict, report: Report) -> None:
    if "virtual_router_id" not in announce:
        report(
            pointer,
            "VRRP needs 'virtual_router_id', the ID the load balancers elect this VIP's owner under.",
            'Add e.g. "virtual_router_id": 51 (1-255, unique per address family on the segment).',
        )
    for key in BGP_SETTINGS:
        if key in announce:
            report(
                f"{pointer}/{key}",
                f"'{key}' is a BGP setting, but this VIP is owned by VRRP: no BGP route is announced for it.",
                f"Remove '{key}', or announce the VIP by BGP (another mode).",
            )


def _check_fast_path(name: str, service: dict, report: Report) -> None:
    """VRRP is proven for L2 on the nft engine.  IPVS would own the VIP as a
    local address too, so kdsr and keepalived would both add and remove it."""
    dsr = service.get("dsr", {}) if isinstance(service.get("dsr"), dict) else {}
    mode, engine = dsr.get("mode", DSR_L2), dsr.get("engine", ENGINE_NFT)
    if mode != DSR_L2 or engine != ENGINE_NFT:
        report(
            f"/services/{name}/announce/mode",
            f"VRRP owns VIPs of l2 services on the nft engine; service {name} is {mode} on the {engine} engine.",
            'Use "dsr": {"mode": "l2", "engine": "nft"}, or announce this VIP by BGP.',
        )


def _check_group(pointer: str, announce: dict, keepers: set[str], load_balancers: dict, report: Report) -> list[str]:
    """The load balancers that take part, each checked; [] when none can."""
    listed = announce.get("load_balancers")
    if not keepers:
        report(
            f"{pointer}/mode",
            "no load balancer has 'vrrp', so no keepalived would own this VIP.",
            'Add "vrrp": {} to the load balancers that should own it (keepalived runs there).',
        )
        return []
    if not isinstance(listed, list):
        group = sorted(keepers)
    else:
        group = []
        for i, lb in enumerate(listed):
            if lb not in load_balancers:
                report(
                    f"{pointer}/load_balancers/{i}",
                    f"{quote(lb)} is not a load balancer.",
                    f"{did_you_mean(lb, list(load_balancers))}Load balancers: {names_list(sorted(load_balancers))}.",
                )
            elif lb not in keepers:
                report(
                    f"{pointer}/load_balancers/{i}",
                    f"load balancer {quote(lb)} has no 'vrrp' section, so no keepalived of kdsr's runs there.",
                    f'Add "vrrp": {{}} to /load_balancers/{lb}, or leave {lb} out of this list.',
                )
            else:
                group.append(lb)
    if len(group) > MAX_GROUP:
        report(
            f"{pointer}/load_balancers",
            f"a VRRP group of {len(group)} load balancers; kdsr gives priorities {TOP_PRIORITY}, "
            f"{TOP_PRIORITY - PRIORITY_STEP}, ... to at most {MAX_GROUP}.",
            f"List at most {MAX_GROUP} load balancers for this VIP.",
        )
    return group


def _check_source(lb: str, vip, node: dict, unicast: bool, pointer: str, report: Report) -> None:
    """keepalived sends IPv4 VRRP from an IPv4 address of the interface, and
    unicast IPv6 from an IPv6 one (multicast IPv6 uses the link-local)."""
    if vip.version == 6 and not unicast:
        return
    family = []
    for text in node.get("addresses", []):
        try:
            family += [a for a in [parse_interface(text)] if a.version == vip.version]
        except ValueError:
            pass  # reported by the node address rule
    if not family:
        how = "unicast " if unicast else ""
        report(
            f"/load_balancers/{lb}/addresses",
            f"load balancer {lb} has no IPv{vip.version} address to send {how}VRRP advertisements for VIP {vip} "
            f"from ({pointer}).",
            f"Add an IPv{vip.version} address of its front interface to /load_balancers/{lb}/addresses.",
        )


def _canonical(announce: dict | None) -> dict | None:
    return None if announce is None else {k: v for k, v in announce.items() if v not in (None, [], {})}


def _check_same_vip(name: str, vip: str, announce: dict | None, by_vip: dict, report: Report) -> None:
    """Services on one VIP share its owner: VRRP moves an address, not a port."""
    first = by_vip.setdefault(vip, (name, announce))
    if first[0] == name or (first[1] is None and announce is None):
        return
    if _canonical(first[1]) != _canonical(announce):
        report(
            f"/services/{name}/announce",
            f"service {first[0]} owns the same VIP {vip} differently (/services/{first[0]}/announce): "
            "one VIP has one VRRP owner.",
            "Give every service on this VIP the same 'announce' (mode vrrp and its settings).",
        )
