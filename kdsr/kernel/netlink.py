"""What every raw netlink socket kdsr opens shares: the message header, the
attribute layout and their 4-byte alignment (nft_generation.py asks
nftables for its generation, rtnl_addr.py reads and writes addresses)."""

from __future__ import annotations

import struct

NLM_F_REQUEST = 0x1
NLMSG_ERROR = 2
NLMSG_DONE = 3

HEADER = struct.Struct("=IHHII")  # nlmsghdr: len, type, flags, seq, pid
ATTR = struct.Struct("=HH")  # nlattr / rtattr: len, type
NLA_TYPE_MASK = 0x3FFF  # without the nested and byte-order bits


def align(n: int) -> int:
    return (n + 3) & ~3


def attr(kind: int, payload: bytes) -> bytes:
    size = ATTR.size + len(payload)
    return ATTR.pack(size, kind) + payload + b"\0" * (align(size) - size)


def attrs(data, offset: int, end: int | None = None) -> dict[int, memoryview]:
    """The attributes from ``offset`` to ``end`` (the buffer's end), by type;
    a malformed length ends the walk."""
    view = memoryview(data)
    end = len(view) if end is None else min(end, len(view))
    found = {}
    while offset + ATTR.size <= end:
        size, kind = ATTR.unpack_from(view, offset)
        if size < ATTR.size:
            break
        found[kind & NLA_TYPE_MASK] = view[offset + ATTR.size : offset + size]
        offset += align(size)
    return found
