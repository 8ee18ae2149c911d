"""The intent's values, parsed: addresses, interfaces, ports, protocols, and
the per-service settings read the same way by the rules (verify.py and the
*_rules.py modules) and by the model build (load.py): one definition of what
"the member's address" means.

Each parser raises ValueError with a message a person can act on; the
caller adds the file and JSON pointer.
"""

from __future__ import annotations

import difflib
import functools
import ipaddress

from kdsr.errors import quote
from kdsr.intent.model import DEFAULT_PATH_MTU, DSR_L2, ENGINE_NFT, L3_TUNNELS, IPAddress, IPInterface

PROTOCOLS = ("tcp", "udp")
IP_HEADER = {4: 20, 6: 40}
TCP_HEADER = 20


# Remembered: an address is parsed by the schema's format check, by verify
# and by the model build (at 10,000 VIPs and 16,000 members, 26,000
# addresses, a third of verify's time), and a reloading daemon parses the
# same ones again.  The addresses are immutable; a ValueError is not
# remembered, so a bad address is reported every time.
@functools.lru_cache(maxsize=1 << 17)
def parse_address(text: str) -> IPAddress:
    """An IPv4/IPv6 address without prefix; ValueError with a readable message."""
    if "/" in text:
        raise ValueError(f"{quote(text)} has a prefix length; give the address alone")
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        raise ValueError(f"{quote(text)} is not an IPv4 or IPv6 address") from None
    if getattr(address, "scope_id", None):
        # A zone (fe80::1%eth0) names an interface of one host; meaningless
        # in a file shared by many hosts.
        raise ValueError(f"{quote(text)} has a zone (%{address.scope_id}); remove it")
    return address


@functools.lru_cache(maxsize=1 << 12)
def parse_interface(text: str) -> IPInterface:
    """An address with prefix length ("10.10.0.2/24"); ValueError otherwise."""
    if "/" not in text:
        # The prefix tells which servers are on the node's segment (L2 DSR).
        raise ValueError(f'{quote(text)} has no prefix length; write it like "10.10.0.2/24"')
    try:
        interface = ipaddress.ip_interface(text)
    except ValueError:
        raise ValueError(f"{quote(text)} is not an IPv4 or IPv6 address with prefix length") from None
    if getattr(interface.ip, "scope_id", None):
        raise ValueError(f"{quote(text)} has a zone (%{interface.ip.scope_id}); remove it")
    return interface


def port_entries(ports: object, pointer: str) -> list[tuple[str, int | str]]:
    """The service's port items with their pointers (a scalar is its own item)."""
    if isinstance(ports, list):
        return [(f"{pointer}/{i}", item) for i, item in enumerate(ports)]
    return [(pointer, ports)]  # type: ignore[list-item]


def parse_port(item: int | str) -> tuple[int, int]:
    """(first, last) of a port or "A-B" range; ValueError when out of order/range."""
    if not isinstance(item, str):
        return int(item), int(item)  # the schema bounded it to 1-65535
    first, last = (int(part) for part in item.split("-"))
    for port in (first, last):
        if not 1 <= port <= 65535:
            raise ValueError(f"{port} in {quote(item)} is not a port")
    if first > last:
        raise ValueError(f'{quote(item)} runs backwards; write it "{last}-{first}"')
    return first, last


def protocol_set(value: str | list[str]) -> tuple[str, ...]:
    """Sorted protocol names from "tcp" / "udp" / "both" / a list."""
    if value == "both":
        return PROTOCOLS
    names = [value] if isinstance(value, str) else value
    return tuple(sorted(set(names)))


def service_protocols(service: dict) -> tuple[str, ...]:
    return protocol_set(service.get("protocols", "tcp"))


def service_mode(service: dict) -> str:
    return service.get("dsr", {}).get("mode", DSR_L2)


def service_engine(service: dict) -> str:
    return service.get("dsr", {}).get("engine", ENGINE_NFT)


def auto_mss(mode: str, path_mtu: int) -> int:
    """The MSS that makes a full TCP segment fit ``path_mtu`` once encapsulated."""
    _kind, family, overhead = L3_TUNNELS[mode]
    return path_mtu - overhead - IP_HEADER[family] - TCP_HEADER


def mss_clamp(service: dict) -> int | None:
    """The service's MSS clamp in bytes, or None (L2, or "off")."""
    dsr = service.get("dsr", {})
    mode = dsr.get("mode", DSR_L2)
    value = dsr.get("mss_clamp", "auto")
    if mode not in L3_TUNNELS or value == "off":
        return None
    if value == "auto":
        return auto_mss(mode, int(dsr.get("path_mtu", DEFAULT_PATH_MTU)))
    return int(value)


def member_address(member: dict, servers: dict) -> tuple[str, str] | None:
    """(address text, pointer suffix of the field it came from), or None.

    An explicit ``address`` wins; otherwise the node's FIRST address, without
    its prefix.  None when neither resolves (unknown node); verify reports that.
    """
    if "address" in member:
        return member["address"], "/address"
    node = servers.get(member.get("node"))
    if node is None:
        return None
    return node["addresses"][0].split("/")[0], "/node"


def did_you_mean(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1)
    return f'Did you mean "{close[0]}"? ' if close else ""


def names_list(names: list[str]) -> str:
    return ", ".join(names) if names else "(none)"
