"""Links, routes and rules over kdsr's own rtnetlink socket (rtnl_socket.py):
the dumps every plan, ``show`` and no-op check reads, and the requests that
make and delete what kdsr owns.

Only what kdsr compares is decoded (model.Link, model.Route, model.Rule):
- a link's index, name, kind and, for its tunnel kinds, the two ends and the TTL;
- a route's table, destination, type, output interface and gateway;
- a rule's priority, firewall mark and table.
The requests carry what kdsr sent through pyroute2 before it wrote them
itself, so the kernel holds the same objects (the routing labs compare
both, attribute for attribute); the attribute numbers are the kernel's
uapi: linux/if_link.h, if_tunnel.h, ip6_tunnel.h, rtnetlink.h, fib_rules.h.
"""

from __future__ import annotations

import errno
import socket
import struct

from kdsr.kernel.netlink import attr, attrs
from kdsr.kernel.rtnl_socket import NLM_F_CREATE, NLM_F_EXCL, NetlinkError, RtnlSocket

RTM_NEWLINK = 16
RTM_DELLINK = 17
RTM_GETLINK = 18
RTM_NEWROUTE = 24
RTM_DELROUTE = 25
RTM_GETROUTE = 26
RTM_NEWRULE = 32
RTM_DELRULE = 33
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
IFLA_IPTUN_FLAGS = 8
IFLA_IPTUN_PROTO = 9
IFF_UP = 0x1
IPPROTO_IPV6 = 41
# IP6_TNL_F_IGN_ENCAP_LIMIT (linux/ip6_tunnel.h): no 8-byte encapsulation-limit
# option, so the overhead is the 40-byte outer header only (what the MSS
# clamp assumes).
IP6_TNL_F_IGN_ENCAP_LIMIT = 0x1

RTA_DST = 1
RTA_OIF = 4
RTA_GATEWAY = 5
RTA_TABLE = 15
RTN_UNICAST = 1
RTPROT_UNSPEC = 0
RTPROT_STATIC = 4
RT_SCOPE_UNIVERSE = 0
RT_SCOPE_NOWHERE = 255  # in a delete: a route of any scope
RT_TABLE_UNSPEC = 0
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
ROUTE_TYPE_NUMBERS = {name: number for number, name in ROUTE_TYPES.items()}

FRA_PRIORITY = 6
FRA_FWMARK = 10
FRA_TABLE = 15
FRA_FWMASK = 16
FR_ACT_TO_TBL = 1

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


# ---------------------------------------------------------------- writes


def _request(sock: RtnlSocket, kind: int, flags: int, body: bytes) -> None:
    """One request, answered; NetlinkError if the kernel refused it."""
    (error,) = sock.each_acknowledged(kind, flags, [body])
    if error is not None:
        raise error


def _raw(address: str) -> bytes:
    return socket.inet_pton(socket.AF_INET6 if ":" in address else socket.AF_INET, address)


def tunnel_data(kind: str, local: str, remote: str, ttl: int) -> bytes:
    """IFLA_INFO_DATA of a tunnel link of ``kind`` (ipip, gre, ip6tnl): the
    local end, the remote end (none for ``remote`` "": any) and the TTL; the
    kernel's defaults for the rest.  An ip6tnl link carries IPv6 in IPv6 (proto 41) without
    the encapsulation-limit option."""
    local_at, remote_at, ttl_at = TUNNEL_ATTRS[kind]
    data = attr(local_at, _raw(local)) + attr(ttl_at, struct.pack("=B", ttl))
    if remote:
        data += attr(remote_at, _raw(remote))
    if kind == "ip6tnl":
        data += attr(IFLA_IPTUN_PROTO, struct.pack("=B", IPPROTO_IPV6))
        data += attr(IFLA_IPTUN_FLAGS, struct.pack("=I", IP6_TNL_F_IGN_ENCAP_LIMIT))
    return data


def add_link(sock: RtnlSocket, name: str, kind: str, data: bytes = b"") -> None:
    """Make a link of ``kind`` with IFLA_INFO_DATA ``data`` and bring it up
    in the same request, as ``ip link add NAME up type KIND ...`` does."""
    info = attr(IFLA_INFO_KIND, kind.encode() + b"\0")
    if data:
        info += attr(IFLA_INFO_DATA, data)
    body = IFINFOMSG.pack(socket.AF_UNSPEC, 0, 0, IFF_UP, IFF_UP)
    body += attr(IFLA_IFNAME, name.encode() + b"\0") + attr(IFLA_LINKINFO, info)
    _request(sock, RTM_NEWLINK, NLM_F_CREATE | NLM_F_EXCL, body)


def delete_link(sock: RtnlSocket, index: int) -> None:
    _request(sock, RTM_DELLINK, 0, IFINFOMSG.pack(socket.AF_UNSPEC, 0, index, 0, 0))


def write_route(
    sock: RtnlSocket,
    add: bool,
    family: int,
    table: int,
    dst: str = "",
    dst_len: int = 0,
    oif: int = 0,
    gateway: str = "",
    route_type: int = RTN_UNICAST,
) -> None:
    """Add (or delete) a route of the family (4 or 6) in ``table``: to
    ``dst``/``dst_len`` (none: the default route), out of interface index
    ``oif`` (0: none), via ``gateway`` (""), of ``route_type``.  An add is
    ``proto static``, scope global; a delete matches any protocol and scope,
    but only the type asked for (the kernel's rule for deletes)."""
    header_table = table if table < 256 else RT_TABLE_UNSPEC
    if add:
        protocol, scope = RTPROT_STATIC, RT_SCOPE_UNIVERSE
    else:
        protocol, scope = RTPROT_UNSPEC, RT_SCOPE_NOWHERE
    body = RTMSG.pack(FAMILIES[family], dst_len, 0, 0, header_table, protocol, scope, route_type, 0)
    body += attr(RTA_TABLE, struct.pack("=I", table))
    if dst:
        body += attr(RTA_DST, _raw(dst))
    if oif:
        body += attr(RTA_OIF, struct.pack("=I", oif))
    if gateway:
        body += attr(RTA_GATEWAY, _raw(gateway))
    if add:
        _request(sock, RTM_NEWROUTE, NLM_F_CREATE | NLM_F_EXCL, body)
    else:
        _request(sock, RTM_DELROUTE, 0, body)


def write_rule(sock: RtnlSocket, add: bool, family: int, priority: int, fwmark: int, table: int) -> None:
    """Add (or delete) ``pref PRIORITY fwmark MARK/0xffffffff lookup TABLE``."""
    header_table = table if table < 256 else RT_TABLE_UNSPEC
    body = FIB_RULE_HDR.pack(FAMILIES[family], 0, 0, 0, header_table, 0, 0, FR_ACT_TO_TBL, 0)
    body += attr(FRA_PRIORITY, struct.pack("=I", priority))
    body += attr(FRA_FWMARK, struct.pack("=I", fwmark))
    body += attr(FRA_FWMASK, struct.pack("=I", 0xFFFFFFFF))
    body += attr(FRA_TABLE, struct.pack("=I", table))
    if add:
        _request(sock, RTM_NEWRULE, NLM_F_CREATE | NLM_F_EXCL, body)
    else:
        _request(sock, RTM_DELRULE, 0, body)
