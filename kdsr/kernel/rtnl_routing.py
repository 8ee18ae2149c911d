"""Links, routes and rules as kdsr reads them, over its own rtnetlink
socket (rtnl_socket.py): every plan, ``show`` and no-op check reads them,
and through pyroute2 the import and socket alone cost a CLI run more than
the rest of a no-op check (bench/cli_noop.py).

Only what kdsr compares is decoded (model.Link, model.Route, model.Rule):
- a link's index, name, kind and, for its tunnel kinds, the two ends and the TTL;
- a route's table, destination, type, output interface and gateway;
- a rule's priority, firewall mark and table.
Writes stay with pyroute2: they happen only when a plan changes something.
"""

from __future__ import annotations

import errno
import socket
import struct

from kdsr.kernel.netlink import attrs
from kdsr.kernel.rtnl_socket import NetlinkError, RtnlSocket

RTM_NEWLINK = 16
RTM_GETLINK = 18
RTM_NEWROUTE = 24
RTM_GETROUTE = 26
RTM_NEWRULE = 32
RTM_GETRULE = 34

IFINFOMSG = struct.Struct("=BxHiII")  # family, type, index, flags, change
RTMSG = struct.Struct("=BBBBBBBBI")  # family, dst_len, src_len, tos, table, protocol, scope, type, flags
FIB_RULE_HDR = struct.Struct("=BBBBBBBBI")  # family, dst_len, src_len, tos, table, res1, res2, action, flags

IFLA_IFNAME = 3
IFLA_LINKINFO = 18
IFLA_INFO_KIND = 1
IFLA_INFO_DATA = 2
# Where each tunnel kind keeps its local end, remote end and TTL (a u8)
# inside IFLA_INFO_DATA: IFLA_IPTUN_* for ipip and ip6tnl, IFLA_GRE_* for gre.
TUNNEL_ATTRS = {"ipip": (2, 3, 4), "ip6tnl": (2, 3, 4), "gre": (6, 7, 8)}

RTA_DST = 1
RTA_OIF = 4
RTA_GATEWAY = 5
RTA_TABLE = 15
RTN_UNICAST = 1
ROUTE_TYPES = {
    1: "unicast",
    2: "local",
    3: "broadcast",
    4: "anycast",
    5: "multicast",
    6: "blackhole",
    7: "unreachable",
    8: "prohibit",
    9: "throw",
    10: "nat",
}

FRA_PRIORITY = 6
FRA_FWMARK = 10
FRA_TABLE = 15

FAMILIES = {4: socket.AF_INET, 6: socket.AF_INET6}


def _text(raw) -> str:
    return bytes(raw).split(b"\0", 1)[0].decode(errors="replace")


def _address(raw) -> str:
    """An end or a gateway as text; absent or all zeros (any) is ""."""
    if raw is None or not any(raw):
        return ""
    data = bytes(raw)
    return socket.inet_ntop(socket.AF_INET if len(data) == 4 else socket.AF_INET6, data)


def _u32(raw) -> int | None:
    return None if raw is None else struct.unpack_from("=I", raw)[0]


def links(sock: RtnlSocket) -> list[tuple[int, str, str, tuple[str, str, int] | None]]:
    """(index, name, kind, ends) of every link.  ``kind`` is "" for a link
    without one (lo, a physical NIC); ``ends`` is (local, remote, ttl) for
    the tunnel kinds, None for the others."""
    found = []
    for kind, body in sock.dump(RTM_GETLINK, IFINFOMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0), "link"):
        if kind != RTM_NEWLINK:
            continue
        index = IFINFOMSG.unpack_from(body)[2]
        top = attrs(body, IFINFOMSG.size)
        info = attrs(top[IFLA_LINKINFO], 0) if IFLA_LINKINFO in top else {}
        link_kind = _text(info[IFLA_INFO_KIND]) if IFLA_INFO_KIND in info else ""
        ends = None
        if link_kind in TUNNEL_ATTRS and IFLA_INFO_DATA in info:
            data = attrs(info[IFLA_INFO_DATA], 0)
            local_at, remote_at, ttl_at = TUNNEL_ATTRS[link_kind]
            ttl = data[ttl_at][0] if ttl_at in data else 0
            ends = (_address(data.get(local_at)), _address(data.get(remote_at)), ttl)
        found.append((index, _text(top.get(IFLA_IFNAME, b"")), link_kind, ends))
    return found


def _dump_of_family(sock: RtnlSocket, kind: int, request: bytes, what: str) -> list[tuple[int, memoryview]]:
    """A dump of one address family; none when the kernel has not got the
    family (IPv6 disabled), which holds none of kdsr's routes or rules."""
    try:
        return sock.dump(kind, request, what)
    except NetlinkError as exc:
        if exc.code == errno.EAFNOSUPPORT:
            return []
        raise


def default_routes(sock: RtnlSocket, family: int) -> list[tuple[int, int, str]]:
    """(table, output interface index, gateway) of every unicast default
    route of the family (4 or 6), in any table."""
    found = []
    request = RTMSG.pack(FAMILIES[family], 0, 0, 0, 0, 0, 0, 0, 0)
    for kind, body in _dump_of_family(sock, RTM_GETROUTE, request, "route"):
        if kind != RTM_NEWROUTE:
            continue
        got_family, dst_len, _src, _tos, table, _proto, _scope, route_type, _flags = RTMSG.unpack_from(body)
        # A kernel without the family (IPv6 disabled) answers with every
        # family's routes: only the asked one's count.
        if got_family != FAMILIES[family] or dst_len != 0 or route_type != RTN_UNICAST:
            continue
        found_attrs = attrs(body, RTMSG.size)
        table = _u32(found_attrs.get(RTA_TABLE)) or table
        found.append((table, _u32(found_attrs.get(RTA_OIF)) or 0, _address(found_attrs.get(RTA_GATEWAY))))
    return found


def table_routes(sock: RtnlSocket, family: int, table: int) -> list[tuple[str, str]]:
    """(destination as "address/length", type) of every route of the family
    (4 or 6) in routing table ``table``."""
    found = []
    request = RTMSG.pack(FAMILIES[family], 0, 0, 0, 0, 0, 0, 0, 0)
    for kind, body in _dump_of_family(sock, RTM_GETROUTE, request, "route"):
        if kind != RTM_NEWROUTE:
            continue
        got_family, dst_len, _src, _tos, header_table, _proto, _scope, route_type, _flags = RTMSG.unpack_from(body)
        if got_family != FAMILIES[family]:
            continue
        found_attrs = attrs(body, RTMSG.size)
        if (_u32(found_attrs.get(RTA_TABLE)) or header_table) != table:
            continue
        dst = _address(found_attrs.get(RTA_DST)) or ("0.0.0.0" if family == 4 else "::")
        found.append((f"{dst}/{dst_len}", ROUTE_TYPES.get(route_type, str(route_type))))
    return found


def fwmark_rules(sock: RtnlSocket, family: int) -> list[tuple[int, int, int]]:
    """(priority, fwmark, table) of every rule of the family (4 or 6) that
    matches a firewall mark."""
    found = []
    request = FIB_RULE_HDR.pack(FAMILIES[family], 0, 0, 0, 0, 0, 0, 0, 0)
    for kind, body in _dump_of_family(sock, RTM_GETRULE, request, "rule"):
        if kind != RTM_NEWRULE:
            continue
        got_family, _dst, _src, _tos, header_table = FIB_RULE_HDR.unpack_from(body)[:5]
        found_attrs = attrs(body, FIB_RULE_HDR.size)
        mark = _u32(found_attrs.get(FRA_FWMARK))
        if got_family != FAMILIES[family] or mark is None:
            continue
        priority = _u32(found_attrs.get(FRA_PRIORITY)) or 0
        found.append((priority, mark, _u32(found_attrs.get(FRA_TABLE)) or header_table))
    return found
