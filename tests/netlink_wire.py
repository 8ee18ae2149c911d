"""A stand-in for kdsr's rtnetlink socket's wire, for unit tests that build
the kernel's answers byte by byte (test_rtnl_addr.py, test_rtnl_routing.py)."""

from __future__ import annotations

from kdsr.kernel.netlink import HEADER, align
from kdsr.kernel.rtnl_socket import NLMSG_DONE, RtnlSocket


def message(kind: int, seq: int, body: bytes, flags: int = 0) -> bytes:
    size = HEADER.size + len(body)
    return HEADER.pack(size, kind, flags, seq, 0) + body + b"\0" * (align(size) - size)


def done(seq: int, flags: int = 0) -> bytes:
    return message(NLMSG_DONE, seq, b"\0" * 4, flags)


class Wire:
    """Stands in for the netlink socket: records what is sent, hands out
    the receive buffers queued by ``answer`` (called with what was sent)."""

    def __init__(self, answer):
        self.answer = answer
        self.sent: list[bytes] = []
        self.queue: list[bytes] = []

    def send(self, data: bytes) -> int:
        self.sent.append(data)
        self.queue.extend(self.answer(self, data))
        return len(data)

    def recv(self, _size: int) -> bytes:
        return self.queue.pop(0)


def socket_with(answer) -> tuple[RtnlSocket, Wire]:
    sock = RtnlSocket.__new__(RtnlSocket)
    sock._seq = 0
    wire = Wire(answer)
    sock._sock = wire
    return sock, wire


def seqs_of(data: bytes) -> list[int]:
    found, offset = [], 0
    while offset < len(data):
        length, _k, _f, seq, _p = HEADER.unpack_from(data, offset)
        found.append(seq)
        offset += align(length)
    return found
