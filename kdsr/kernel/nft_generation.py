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
import threading

from kdsr.kernel.netlink import HEADER, NLM_F_REQUEST, NLMSG_ERROR, attrs

NETLINK_NETFILTER = 12
NFNL_SUBSYS_NFTABLES = 10
NFT_MSG_GETGEN = 16
NFTA_GEN_ID = 1
_NFGEN = struct.Struct("=BBH")  # nfgenmsg: family, version, res_id


def request(seq: int) -> bytes:
    body = _NFGEN.pack(socket.AF_UNSPEC, 0, 0)
    kind = (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETGEN
    return HEADER.pack(HEADER.size + len(body), kind, NLM_F_REQUEST, seq, 0) + body


def parse_reply(data: bytes) -> int | None:
    """The generation from a GETGEN answer; None for an error or a short answer."""
    if len(data) < HEADER.size + _NFGEN.size:
        return None
    length, kind, _flags, _seq, _pid = HEADER.unpack_from(data)
    if kind == NLMSG_ERROR:
        return None
    gen = attrs(data, HEADER.size + _NFGEN.size, end=length).get(NFTA_GEN_ID)
    return struct.unpack_from(">I", gen)[0] if gen is not None and len(gen) >= 4 else None


class _Channel:
    """One NETLINK_NETFILTER socket per process, kept open.

    Closing such a socket right after an nftables commit takes the kernel
    long enough to show in a small apply's time, and an apply reads the
    generation three times.  Reopened after an error
    or in a forked child; a lock keeps the daemon's threads apart."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._pid = 0
        self._seq = 0

    def _open(self) -> socket.socket:
        if self._sock is None or self._pid != os.getpid():
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
            sock.settimeout(1.0)
            sock.bind((0, 0))
            self._sock, self._pid = sock, os.getpid()
        return self._sock

    def _drop(self) -> None:
        if self._sock is not None and self._pid == os.getpid():
            self._sock.close()
        self._sock = None

    def ask(self) -> int | None:
        with self._lock:
            try:
                sock = self._open()
                self._seq = (self._seq + 1) & 0xFFFFFFFF
                sock.send(request(self._seq))
                # An answer to an earlier request that timed out may still
                # be queued: skip answers that are not to this one.
                for _ in range(8):
                    data = sock.recv(4096)
                    if len(data) >= HEADER.size and HEADER.unpack_from(data)[3] == self._seq:
                        return parse_reply(data)
                self._drop()
                return None
            except OSError:
                self._drop()
                return None


_CHANNEL = _Channel()


def read_generation() -> int | None:
    """The current generation, or None when it cannot be read (then nothing is reused)."""
    return _CHANNEL.ask()
