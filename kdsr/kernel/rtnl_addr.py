"""Interface addresses over a plain rtnetlink socket: one interface's dump,
and adds or deletes sent many to a message.

These are the two paths that grow with the number of VIPs: an ipvs director
holds every VIP on its front interface, a server every VIP on ``lo``.
pyroute2 (0.9, asyncio underneath) builds a full message object per address
and waits for each write's answer before it sends the next: on the host,
5,000 addresses took 3.2 s to add and 0.28-0.35 s to list, ten times that
under emulation.  Here a dump is decoded with ``struct`` straight from the
receive buffer, and writes go out up to ``BATCH`` to a ``send``; the kernel
answers each message in order, so every address is still acknowledged (or
refused) on its own.

Only what kdsr writes and compares is carried: family, prefix length, the
address (``IFA_LOCAL`` for IPv4, as ``ip`` shows it), the label.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from collections.abc import Iterator, Sequence

from kdsr.kernel.netlink import HEADER, NLM_F_REQUEST, NLMSG_DONE, NLMSG_ERROR, align, attr, attrs

NETLINK_ROUTE = 0
SOL_NETLINK = 270
NETLINK_EXT_ACK = 11
NETLINK_GET_STRICT_CHK = 12

RTM_NEWADDR = 20
RTM_DELADDR = 21
RTM_GETADDR = 22

NLM_F_DUMP_INTR = 0x10  # the dump's objects changed while it ran
NLM_F_ACK = 0x4
NLM_F_EXCL = 0x200
NLM_F_CREATE = 0x400
NLM_F_DUMP = 0x300
NLM_F_CAPPED = 0x100  # on an NLMSG_ERROR: the request is echoed as its header only
NLM_F_ACK_TLVS = 0x200  # on an NLMSG_ERROR: extended-ack attributes follow

IFA_ADDRESS = 1
IFA_LOCAL = 2
IFA_LABEL = 3

NLMSGERR_ATTR_MSG = 1  # extended ack: the kernel's words for a refusal

IFADDRMSG = struct.Struct("=BBBBI")  # family, prefixlen, flags, scope, index

# Messages per send: an add is ~60 bytes, so a batch stays far below the
# socket's buffers while 5,000 addresses take 20 round trips, not 5,000.
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


def _family(ip: str) -> int:
    return socket.AF_INET6 if ":" in ip else socket.AF_INET


class AddressSocket:
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

    def dump(self, index: int) -> list[tuple[int, int, str, str]]:
        """(family, prefixlen, address, label) of every address on the
        interface with this index (0: on every interface), in the kernel's
        order.  A dump the kernel marks interrupted (the addresses changed
        while it ran) is read again, up to ``DUMP_TRIES`` times."""
        for _ in range(DUMP_TRIES):
            found = self._dump_once(index)
            if found is not None:
                return found
        raise NetlinkError(errno.EAGAIN, f"the address dump was interrupted {DUMP_TRIES} times in a row")

    def _dump_once(self, index: int) -> list[tuple[int, int, str, str]] | None:
        seq = self._next_seq()
        request = IFADDRMSG.pack(socket.AF_UNSPEC, 0, 0, 0, index)
        self._sock.send(
            HEADER.pack(HEADER.size + len(request), RTM_GETADDR, NLM_F_REQUEST | NLM_F_DUMP, seq, 0) + request
        )
        found = []
        interrupted = False
        for kind, flags, got, body in self._messages():
            if got != seq:
                continue
            interrupted |= bool(flags & NLM_F_DUMP_INTR)
            if kind == NLMSG_DONE:
                return None if interrupted else found
            if kind == NLMSG_ERROR:
                raise _error(body, flags)
            if kind != RTM_NEWADDR:
                continue
            family, prefixlen, _f, _scope, ifindex = IFADDRMSG.unpack_from(body)
            if index and ifindex != index:  # a kernel without strict dumps sends every interface's
                continue
            found_attrs = attrs(body, IFADDRMSG.size)
            raw = found_attrs.get(IFA_LOCAL) if family == socket.AF_INET else None
            raw = raw or found_attrs.get(IFA_ADDRESS)
            if raw is None:
                continue
            label = bytes(found_attrs.get(IFA_LABEL, b"")).split(b"\0", 1)[0].decode()
            found.append((family, prefixlen, socket.inet_ntop(family, bytes(raw)), label))
        raise AssertionError("unreachable: _messages ends only by raising")

    def write(self, add: bool, index: int, entries: Sequence[tuple[str, int, str]]) -> list[NetlinkError | None]:
        """Add (or delete) each (address, prefixlen, label) on the interface
        with this index: for each, in order, None when the kernel did it or
        the error it gave.  The kernel goes on past a refused message, so
        every answer is read, and the caller knows exactly what landed."""
        kind = RTM_NEWADDR if add else RTM_DELADDR
        flags = NLM_F_REQUEST | NLM_F_ACK | (NLM_F_CREATE | NLM_F_EXCL if add else 0)
        results: list[NetlinkError | None] = []
        for start in range(0, len(entries), BATCH):
            chunk = entries[start : start + BATCH]
            first = self._seq + 1
            self._sock.send(b"".join(self._request(kind, flags, index, entry) for entry in chunk))
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

    def _request(self, kind: int, flags: int, index: int, entry: tuple[str, int, str]) -> bytes:
        ip, prefixlen, label = entry
        family = _family(ip)
        raw = socket.inet_pton(family, ip)
        body = IFADDRMSG.pack(family, prefixlen, 0, 0, index) + attr(IFA_ADDRESS, raw)
        if family == socket.AF_INET:
            body += attr(IFA_LOCAL, raw)
        if label:
            body += attr(IFA_LABEL, label.encode() + b"\0")
        return HEADER.pack(HEADER.size + len(body), kind, flags, self._next_seq(), 0) + body


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
