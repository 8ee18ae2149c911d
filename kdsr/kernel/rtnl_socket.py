"""One rtnetlink (NETLINK_ROUTE) socket, kdsr's own (why not pyroute2:
kdsr/kernel/links.py).

A dump is read to its end and read again when the kernel marks it
interrupted (the objects changed while it ran); requests go out up to
``BATCH`` to a ``send`` and each is still answered, or refused, on its own.
What the messages carry is built and decoded where it is used: rtnl_addr.py
(addresses) and rtnl_routing.py (links, routes, rules).
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from collections.abc import Iterator, Sequence

from kdsr.kernel.netlink import HEADER, NLM_F_REQUEST, NLMSG_DONE, NLMSG_ERROR, align, attrs

NETLINK_ROUTE = 0
SOL_NETLINK = 270
NETLINK_EXT_ACK = 11
NETLINK_GET_STRICT_CHK = 12

NLM_F_DUMP_INTR = 0x10  # the dump's objects changed while it ran
NLM_F_ACK = 0x4
NLM_F_EXCL = 0x200
NLM_F_CREATE = 0x400
NLM_F_DUMP = 0x300
NLM_F_CAPPED = 0x100  # on an NLMSG_ERROR: the request is echoed as its header only
NLM_F_ACK_TLVS = 0x200  # on an NLMSG_ERROR: extended-ack attributes follow

NLMSGERR_ATTR_MSG = 1  # extended ack: the kernel's words for a refusal

# Messages per send: an address add is ~60 bytes, so a batch stays far below
# the socket's buffers while 5,000 addresses take 20 round trips, not 5,000.
BATCH = 256
RECV_SIZE = 1 << 20
DUMP_TRIES = 5
# The kernel answers every request at once; a socket that stays silent this
# long is a fault to report, not to wait on.
TIMEOUT_S = 60.0


class NetlinkError(Exception):
    """The kernel refused a request: ``code`` is the errno."""

    def __init__(self, code: int, message: str = "") -> None:
        self.code = code
        name = errno.errorcode.get(code, str(code))
        super().__init__(f"{name} {message or os.strerror(code)}".strip())


class RtnlSocket:
    """One NETLINK_ROUTE socket in the network namespace it was opened in."""

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_ROUTE)
        self._sock.bind((0, 0))
        self._sock.settimeout(TIMEOUT_S)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECV_SIZE)
        for option in (NETLINK_EXT_ACK, NETLINK_GET_STRICT_CHK):
            try:
                self._sock.setsockopt(SOL_NETLINK, option, 1)
            except OSError:  # an older kernel: no words with errors / no filtering in the kernel
                pass
        self._seq = 0

    def close(self) -> None:
        self._sock.close()

    def _next_seq(self) -> int:
        self._seq += 1  # 32 bits: a run does not send four billion requests
        return self._seq

    def _messages(self) -> Iterator[tuple[int, int, int, memoryview]]:
        """(type, flags, seq, body) of each message as it arrives."""
        while True:
            data = memoryview(self._sock.recv(RECV_SIZE))
            offset = 0
            while offset + HEADER.size <= len(data):
                length, kind, flags, seq, _pid = HEADER.unpack_from(data, offset)
                if length < HEADER.size or offset + length > len(data):
                    raise NetlinkError(errno.EBADMSG, "a truncated netlink message")
                yield kind, flags, seq, data[offset + HEADER.size : offset + length]
                offset += align(length)

    def dump(self, kind: int, request: bytes, what: str) -> list[tuple[int, memoryview]]:
        """(type, body) of every message a dump request of this type
        answers, in the kernel's order.  A dump the kernel marks interrupted
        is read again, up to ``DUMP_TRIES`` times."""
        for _ in range(DUMP_TRIES):
            found = self._dump_once(kind, request)
            if found is not None:
                return found
        raise NetlinkError(errno.EAGAIN, f"the {what} dump was interrupted {DUMP_TRIES} times in a row")

    def _dump_once(self, kind: int, request: bytes) -> list[tuple[int, memoryview]] | None:
        seq = self._next_seq()
        self._sock.send(HEADER.pack(HEADER.size + len(request), kind, NLM_F_REQUEST | NLM_F_DUMP, seq, 0) + request)
        found = []
        interrupted = False
        for got_kind, flags, got, body in self._messages():
            if got != seq:
                continue  # a late answer to something earlier
            interrupted |= bool(flags & NLM_F_DUMP_INTR)
            if got_kind == NLMSG_DONE:
                return None if interrupted else found
            if got_kind == NLMSG_ERROR:
                raise _error(body, flags)
            found.append((got_kind, body))
        raise AssertionError("unreachable: _messages ends only by raising")

    def each_acknowledged(self, kind: int, flags: int, bodies: Sequence[bytes]) -> list[NetlinkError | None]:
        """Send one request of this type per body, asking for an answer to
        each: for each, in order, None when the kernel did it or the error it
        gave.  The kernel goes on past a refused message, so every answer is
        read, and the caller knows exactly what landed."""
        flags |= NLM_F_REQUEST | NLM_F_ACK
        results: list[NetlinkError | None] = []
        for start in range(0, len(bodies), BATCH):
            chunk = bodies[start : start + BATCH]
            first = self._seq + 1
            self._sock.send(
                b"".join(HEADER.pack(HEADER.size + len(b), kind, flags, self._next_seq(), 0) + b for b in chunk)
            )
            last = self._seq
            answered = 0
            for got_kind, got_flags, seq, body in self._messages():
                if got_kind != NLMSG_ERROR or not first <= seq <= last:
                    continue  # not an answer to this batch
                (code,) = struct.unpack_from("=i", body)
                results.append(_error(body, got_flags) if code else None)
                answered += 1
                if answered == len(chunk):
                    break
        return results


def _error(body: memoryview, flags: int) -> NetlinkError:
    """The refusal an NLMSG_ERROR carries, with the kernel's extended-ack
    words when it gave some."""
    (code,) = struct.unpack_from("=i", body)
    message = ""
    if flags & NLM_F_ACK_TLVS and len(body) >= 4 + HEADER.size:
        # After the error code comes the request: its header alone when the
        # answer says it is capped, else all of it; then the attributes.
        echoed = HEADER.size if flags & NLM_F_CAPPED else align(HEADER.unpack_from(body, 4)[0])
        text = attrs(body, 4 + echoed).get(NLMSGERR_ATTR_MSG)
        if text is not None:
            message = bytes(text).split(b"\0", 1)[0].decode(errors="replace")
    return NetlinkError(-code, message)
