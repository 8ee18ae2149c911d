"""kdsr's rtnetlink socket (kdsr/kernel/rtnl_socket.py) and its address
messages (rtnl_addr.py), on messages built here byte by byte (the lab test
netns-lab/tests/test_rtnl_addresses.py runs them on the kernel)."""

import errno
import socket
import struct

import pytest
from netlink_wire import message, seqs_of, socket_with

from kdsr.kernel import rtnl_addr as rt
from kdsr.kernel import rtnl_socket as rs
from kdsr.kernel.netlink import HEADER, align, attr, attrs


def address(seq: int, index: int, ip: str, prefixlen: int, label: str = "", peer: str = "", flags: int = 0) -> bytes:
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    body = rt.IFADDRMSG.pack(family, prefixlen, 0, 0, index)
    body += attr(rt.IFA_ADDRESS, socket.inet_pton(family, peer or ip))
    if family == socket.AF_INET:
        body += attr(rt.IFA_LOCAL, socket.inet_pton(family, ip))
    if label:
        body += attr(rt.IFA_LABEL, label.encode() + b"\0")
    return message(rt.RTM_NEWADDR, seq, body, flags)


def ack(seq: int, code: int = 0, text: str = "") -> bytes:
    request = HEADER.pack(HEADER.size, rt.RTM_NEWADDR, 0, seq, 0)
    body = struct.pack("=i", -code) + request
    flags = rs.NLM_F_CAPPED
    if text:
        body += attr(rs.NLMSGERR_ATTR_MSG, text.encode() + b"\0")
        flags |= rs.NLM_F_ACK_TLVS
    return message(rs.NLMSG_ERROR, seq, body, flags)


def test_a_dump_reads_ipv4_local_labels_ipv6_and_skips_other_interfaces():
    def answer(_wire, data):
        (seq,) = seqs_of(data)
        return [
            address(seq, 7, "192.0.2.1", 24, label="eth0")
            + address(seq, 9, "198.51.100.1", 32)  # another interface (a kernel without strict dumps)
            + address(seq, 7, "192.0.2.9", 32, label="eth0:kdsr", peer="192.0.2.200"),
            address(seq, 7, "2001:db8::1", 128) + message(rs.NLMSG_DONE, seq, struct.pack("=i", 0)),
        ]

    sock, _ = socket_with(answer)
    assert rt.addresses(sock, 7) == [
        (socket.AF_INET, 24, "192.0.2.1", "eth0"),
        (socket.AF_INET, 32, "192.0.2.9", "eth0:kdsr"),  # IFA_LOCAL, not the peer
        (socket.AF_INET6, 128, "2001:db8::1", ""),
    ]
    assert len(rt.addresses(sock, 0)) == 4  # 0: every interface


def test_an_interrupted_dump_is_read_again_then_given_up():
    tries = []

    def answer(_wire, data):
        (seq,) = seqs_of(data)
        tries.append(seq)
        intr = rs.NLM_F_DUMP_INTR if len(tries) < 3 else 0
        return [address(seq, 7, f"192.0.2.{len(tries)}", 32, flags=intr) + message(rs.NLMSG_DONE, seq, b"\0" * 4)]

    sock, _ = socket_with(answer)
    assert rt.addresses(sock, 7) == [(socket.AF_INET, 32, "192.0.2.3", "")]
    assert len(tries) == 3

    def always(_wire, data):
        (seq,) = seqs_of(data)
        return [message(rs.NLMSG_DONE, seq, b"\0" * 4, rs.NLM_F_DUMP_INTR)]

    sock, _ = socket_with(always)
    with pytest.raises(rs.NetlinkError, match="interrupted 5 times"):
        rt.addresses(sock, 7)


def test_a_batch_is_answered_message_by_message_and_stale_answers_are_skipped():
    def answer(wire, data):
        seqs = seqs_of(data)
        stale = ack(seqs[0] - 1) if seqs[0] > 1 else b""  # an earlier batch's late answer
        answers = [ack(s, errno.EEXIST, "Address already assigned") if s == seqs[1] else ack(s) for s in seqs]
        return [stale + b"".join(answers[:2]), b"".join(answers[2:])]

    sock, wire = socket_with(answer)
    entries = [(f"10.0.{i // 250}.{i % 250}", 32, "") for i in range(rs.BATCH + 3)]
    results = rt.write_addresses(sock, True, 7, entries)
    assert len(wire.sent) == 2 and len(seqs_of(wire.sent[0])) == rs.BATCH
    assert len(results) == len(entries)
    refused = [(i, str(r)) for i, r in enumerate(results) if r is not None]
    assert refused == [(1, "EEXIST Address already assigned"), (rs.BATCH + 1, "EEXIST Address already assigned")]
    assert refused and results[1].code == errno.EEXIST


def test_requests_carry_what_ip_addr_add_sends():
    sock, wire = socket_with(lambda _w, data: [b"".join(ack(s) for s in seqs_of(data))])
    rt.write_addresses(sock, True, 3, [("192.0.2.5", 32, "lo:kdsr"), ("2001:db8::5", 128, "")])
    rt.write_addresses(sock, False, 3, [("192.0.2.5", 32, "")])
    data = wire.sent[0]
    length, kind, flags, _seq, _pid = HEADER.unpack_from(data, 0)
    assert kind == rt.RTM_NEWADDR and flags == rs.NLM_F_REQUEST | rs.NLM_F_ACK | rs.NLM_F_CREATE | rs.NLM_F_EXCL
    family, prefixlen, _f, scope, index = rt.IFADDRMSG.unpack_from(data, HEADER.size)
    assert (family, prefixlen, scope, index) == (socket.AF_INET, 32, 0, 3)
    first = attrs(memoryview(data[HEADER.size : length]), rt.IFADDRMSG.size)
    v4 = socket.inet_pton(socket.AF_INET, "192.0.2.5")
    assert bytes(first[rt.IFA_LOCAL]) == bytes(first[rt.IFA_ADDRESS]) == v4
    assert bytes(first[rt.IFA_LABEL]) == b"lo:kdsr\0"
    second = memoryview(data[align(length) :])
    assert rt.IFA_LOCAL not in attrs(second[HEADER.size :], rt.IFADDRMSG.size)  # IPv6: the address only
    _l, kind, flags, _s, _p = HEADER.unpack_from(wire.sent[1], 0)
    assert kind == rt.RTM_DELADDR and flags == rs.NLM_F_REQUEST | rs.NLM_F_ACK


def test_a_truncated_message_is_an_error_not_a_short_answer():
    sock, _ = socket_with(lambda _w, data: [address(seqs_of(data)[0], 7, "192.0.2.1", 32)[:-8]])
    with pytest.raises(rs.NetlinkError, match="truncated"):
        rt.addresses(sock, 7)
