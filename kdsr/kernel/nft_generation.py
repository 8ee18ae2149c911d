"""The nftables ruleset generation of this network namespace.

The kernel bumps it on every committed nftables transaction, whoever sends
it (nft, kdsr, another tool); set elements the packet path adds (flow pins)
do not count, and kdsr does not compare those.  While it is unchanged, a
table read earlier still describes the kernel, so a long-running `kdsr run`
reads its table once per change instead of before and after every apply.

One NFT_MSG_GETGEN request on a NETLINK_NETFILTER socket; the answer
carries NFTA_GEN_ID (big-endian u32).
"""

from __future__ import annotations

import os
import socket
import struct

NETLINK_NETFILTER = 12
NFNL_SUBSYS_NFTABLES = 10
NFT_MSG_GETGEN = 16
NFTA_GEN_ID = 1
NLM_F_REQUEST = 0x1
NLMSG_ERROR = 2
_HEADER = struct.Struct("=IHHII")  # nlmsghdr: len, type, flags, seq, pid
_NFGEN = struct.Struct("=BBH")  # nfgenmsg: family, version, res_id
_ATTR = struct.Struct("=HH")


def request(seq: int) -> bytes:
    body = _NFGEN.pack(socket.AF_UNSPEC, 0, 0)
    kind = (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETGEN
    return _HEADER.pack(_HEADER.size + len(body), kind, NLM_F_REQUEST, seq, 0) + body


def parse_reply(data: bytes) -> int | None:
    """The generation from a GETGEN answer; None for an error or a short answer."""
    if len(data) < _HEADER.size + _NFGEN.size:
        return None
    length, kind, _flags, _seq, _pid = _HEADER.unpack_from(data)
    if kind == NLMSG_ERROR:
        return None
    offset, end = _HEADER.size + _NFGEN.size, min(length, len(data))
    while offset + _ATTR.size <= end:
        attr_len, attr_type = _ATTR.unpack_from(data, offset)
        if attr_len < _ATTR.size:
            return None
        if attr_type & 0x3FFF == NFTA_GEN_ID and attr_len >= _ATTR.size + 4:
            return struct.unpack_from(">I", data, offset + _ATTR.size)[0]
        offset += (attr_len + 3) & ~3
    return None


def read_generation() -> int | None:
    """The current generation, or None when it cannot be read (then nothing is reused)."""
    try:
        with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER) as sock:
            sock.settimeout(1.0)
            sock.bind((0, 0))
            seq = os.getpid() & 0xFFFF
            sock.send(request(seq))
            return parse_reply(sock.recv(4096))
    except OSError:
        return None
