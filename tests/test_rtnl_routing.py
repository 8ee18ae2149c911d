"""kdsr/kernel/rtnl_routing.py's decoding of links, routes and rules, on
messages built here byte by byte the way the kernel lays them out
(netns-lab/tests/test_rtnl_routing_lab.py compares it with pyroute2 on the
host kernel; the guest tier's L3 labs read real tunnels through it)."""

import errno
import socket
import struct

import pytest
from netlink_wire import done, message, seqs_of, socket_with

from kdsr.kernel import rtnl_routing as rr
from kdsr.kernel.netlink import HEADER, attr
from kdsr.kernel.rtnl_socket import NetlinkError


def nested(kind: int, *children: bytes) -> bytes:
    return attr(kind | 0x8000, b"".join(children))  # NLA_F_NESTED, as the kernel sets it


def u8(kind: int, value: int) -> bytes:
    return attr(kind, bytes([value]))


def u32(kind: int, value: int) -> bytes:
    return attr(kind, struct.pack("=I", value))


def ip(kind: int, text: str) -> bytes:
    return attr(kind, socket.inet_pton(socket.AF_INET6 if ":" in text else socket.AF_INET, text))


def link(seq: int, index: int, name: str, kind: str = "", data: bytes | None = None) -> bytes:
    body = rr.IFINFOMSG.pack(0, 768, index, 0, 0) + attr(rr.IFLA_IFNAME, name.encode() + b"\0")
    body += u32(4, 1480)  # IFLA_MTU, which kdsr does not read
    if kind:
        info = attr(rr.IFLA_INFO_KIND, kind.encode() + b"\0")
        if data is not None:
            info += nested(rr.IFLA_INFO_DATA, data)
        body += nested(rr.IFLA_LINKINFO, info)
    return message(rr.RTM_NEWLINK, seq, body)


def answering(*build):
    """A wire that answers each dump with the messages ``build`` makes for its seq."""
    calls = iter(build)

    def answer(_wire, data):
        (seq,) = seqs_of(data)
        return [next(calls)(seq) + done(seq)]

    return answer


def test_links_read_tunnel_ends_and_ttl_by_kind_and_nothing_else():
    ipip = ip(2, "10.2.0.2") + ip(3, "10.3.0.11") + u8(4, 64) + u8(5, 0)
    gre = u32(2, 0) + ip(6, "10.2.0.2") + ip(7, "10.3.0.12") + u8(8, 32)  # IFLA_GRE_IFLAGS first
    ip6tnl = ip(2, "fd00:2::2") + ip(3, "0::") + u8(4, 64) + u32(8, 1)  # remote any: a decap link
    sock, wire = socket_with(
        answering(
            lambda seq: (
                link(seq, 1, "lo")
                + link(seq, 2, "eth0", "veth", data=u32(1, 5))
                + link(seq, 7, "kdsr4-a", "ipip", ipip)
                + link(seq, 8, "kdsrg-b", "gre", gre)
                + link(seq, 9, "kdsr6-c", "ip6tnl", ip6tnl)
                + link(seq, 10, "kdsr4-d", "ipip")
            )  # no data: not read as a tunnel
        )
    )
    assert rr.links(sock) == [
        (1, "lo", "", None),
        (2, "eth0", "veth", None),
        (7, "kdsr4-a", "ipip", ("10.2.0.2", "10.3.0.11", 64)),
        (8, "kdsrg-b", "gre", ("10.2.0.2", "10.3.0.12", 32)),
        (9, "kdsr6-c", "ip6tnl", ("fd00:2::2", "", 64)),
        (10, "kdsr4-d", "ipip", None),
    ]
    _length, kind, flags, _seq, _pid = HEADER.unpack_from(wire.sent[0])
    assert kind == rr.RTM_GETLINK and flags == 0x301  # NLM_F_REQUEST | NLM_F_DUMP


def route(seq: int, family: int, table: int, dst_len: int = 0, rtype: int = 1, extra: bytes = b"") -> bytes:
    body = rr.RTMSG.pack(family, dst_len, 0, 0, min(table, 252), 4, 0, rtype, 0) + u32(rr.RTA_TABLE, table) + extra
    return message(rr.RTM_NEWROUTE, seq, body)


def test_default_routes_take_the_table_attribute_and_skip_the_rest():
    table = 0x6B00_1234  # kdsr's range, above the header's 8 bits
    sock, wire = socket_with(
        answering(
            lambda seq: (
                route(seq, 2, table, extra=u32(rr.RTA_OIF, 7))
                + route(seq, 2, 254, dst_len=24, extra=u32(rr.RTA_OIF, 2))  # not a default
                + route(seq, 2, table + 1, rtype=6)  # a blackhole
                + route(seq, 2, 254, extra=u32(rr.RTA_OIF, 2) + ip(rr.RTA_GATEWAY, "10.0.0.1"))
            ),
            lambda seq: route(seq, 10, table, extra=u32(rr.RTA_OIF, 9) + ip(rr.RTA_GATEWAY, "fd00:3::1")),
        )
    )
    assert rr.default_routes(sock, 4) == [(table, 7, ""), (254, 2, "10.0.0.1")]
    assert rr.default_routes(sock, 6) == [(table, 9, "fd00:3::1")]
    families = [rr.RTMSG.unpack_from(sent, HEADER.size)[0] for sent in wire.sent]
    assert families == [socket.AF_INET, socket.AF_INET6]


def test_rules_keep_those_with_a_mark():
    def rule(seq: int, extra: bytes, header_table: int = 0, family: int = socket.AF_INET) -> bytes:
        body = rr.FIB_RULE_HDR.pack(family, 0, 0, 0, header_table, 0, 0, 1, 0) + extra
        return message(rr.RTM_NEWRULE, seq, body)

    mark = 0x6B00_1234
    sock, _ = socket_with(
        answering(
            lambda seq: (
                rule(seq, u32(rr.FRA_TABLE, 255), header_table=255)  # "from all lookup local": no priority
                + rule(seq, u32(rr.FRA_PRIORITY, 1000) + u32(rr.FRA_FWMARK, mark) + u32(rr.FRA_TABLE, mark))
                + rule(seq, u32(rr.FRA_PRIORITY, 1000) + u32(rr.FRA_FWMARK, 0x42), header_table=100)
            )
        )
    )
    assert rr.fwmark_rules(sock, 4) == [(1000, mark, mark), (1000, 0x42, 100)]


def refusing(code: int):
    def refuse(_wire, data):
        (seq,) = seqs_of(data)
        return [message(2, seq, struct.pack("=i", -code) + HEADER.pack(HEADER.size, rr.RTM_GETRULE, 0, seq, 0))]

    return refuse


def test_a_family_the_kernel_has_not_got_holds_nothing_and_other_refusals_are_errors():
    sock, _ = socket_with(refusing(errno.EAFNOSUPPORT))  # IPv6 disabled: the rule dump is refused
    assert rr.fwmark_rules(sock, 6) == [] and rr.default_routes(sock, 6) == []
    sock, _ = socket_with(refusing(errno.EPERM))
    with pytest.raises(NetlinkError, match="EPERM"):
        rr.fwmark_rules(sock, 4)
