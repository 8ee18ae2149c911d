"""Interface addresses over kdsr's rtnetlink socket (rtnl_socket.py): one
interface's dump, and adds or deletes sent many to a message.

These are the two paths that grow with the number of VIPs: an ipvs director
holds every VIP on its front interface, a server every VIP on ``lo``.
Writes go many to a send and a dump is decoded with ``struct`` straight
from the receive buffer (bench/netlink.py runs this beside pyroute2).

Only what kdsr writes and compares is carried: family, prefix length, the
address (``IFA_LOCAL`` for IPv4, as ``ip`` shows it), the label.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Sequence

from kdsr.kernel.netlink import attr, attrs
from kdsr.kernel.rtnl_socket import NLM_F_CREATE, NLM_F_EXCL, NetlinkError, RtnlSocket

RTM_NEWADDR = 20
RTM_DELADDR = 21
RTM_GETADDR = 22

IFA_ADDRESS = 1
IFA_LOCAL = 2
IFA_LABEL = 3

IFADDRMSG = struct.Struct("=BBBBI")  # family, prefixlen, flags, scope, index


def _family(ip: str) -> int:
    return socket.AF_INET6 if ":" in ip else socket.AF_INET


def addresses(sock: RtnlSocket, index: int) -> list[tuple[int, int, str, str]]:
    """(family, prefixlen, address, label) of every address on the
    interface with this index (0: on every interface), in the kernel's
    order."""
    found = []
    for kind, body in sock.dump(RTM_GETADDR, IFADDRMSG.pack(socket.AF_UNSPEC, 0, 0, 0, index), "address"):
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
    return found


def write_addresses(
    sock: RtnlSocket, add: bool, index: int, entries: Sequence[tuple[str, int, str]]
) -> list[NetlinkError | None]:
    """Add (or delete) each (address, prefixlen, label) on the interface
    with this index: for each, in order, None when the kernel did it or the
    error it gave."""
    kind = RTM_NEWADDR if add else RTM_DELADDR
    flags = NLM_F_CREATE | NLM_F_EXCL if add else 0
    return sock.each_acknowledged(kind, flags, [_request(index, entry) for entry in entries])


def _request(index: int, entry: tuple[str, int, str]) -> bytes:
    """What ``ip addr add`` sends: the address, and for IPv4 the local one too."""
    ip, prefixlen, label = entry
    family = _family(ip)
    raw = socket.inet_pton(family, ip)
    body = IFADDRMSG.pack(family, prefixlen, 0, 0, index) + attr(IFA_ADDRESS, raw)
    if family == socket.AF_INET:
        body += attr(IFA_LOCAL, raw)
    if label:
        body += attr(IFA_LABEL, label.encode() + b"\0")
    return body
