"""Names and numbers kdsr gives kernel objects, derived from the intent alone.

A tunnel to a server, its routing table and the fwmark that selects it are
all named after a digest of (mode, server address): the same on every load
balancer and across runs, unaffected by other servers coming and going (an
index into a sorted list would renumber everything on each change).  The
digest space is 23 bits; verify rejects the (very unlikely) collision.

Every number lives in a range kdsr claims, so ownership is recognisable from
the kernel object itself, with or without kdsr's state directory:

- links:   ``kdsr`` prefix (``kdsri-3f2a1c`` encapsulates to one server;
           ``kdsr-ipip`` decapsulates on a server);
- fwmarks and routing tables: 0x6b000000-0x6b7fffff ("k" in the top byte),
  IPVS fwmark services 0x6b800000-0x6bffffff;
- policy rules: priority ``RULE_PRIORITY`` with a fwmark in that range;
- the announce table ``ANNOUNCE_TABLE``: one blackhole route per VIP that
  BIRD may announce (kdsr/compile/bird.py).
"""

from __future__ import annotations

import hashlib
import re

MARK_BASE = 0x6B000000
MARK_MASK = 0xFF000000
TUNNEL_MARK_BITS = 0x7FFFFF
IPVS_MARK_BASE = 0x6B800000
# Before the main table's rule (32766), after the local table's (0).
RULE_PRIORITY = 1000
# The routing table whose routes tell BIRD which VIPs it may announce now
# (kdsr's fragment learns it with `protocol kernel`).  It is in the IPVS half
# of kdsr's range: values there are fwmarks of IPVS services, which no rule
# maps to a table, and kdsr's rules look up tunnel and probe tables only (the
# lower half), so no packet is ever routed by this table.
ANNOUNCE_TABLE = IPVS_MARK_BASE

# Per L3 mode (intent/model.py L3_TUNNELS), the letter of its link kind
# (ipip, gre, ip6tnl) in a tunnel's name.  Kept here, not looked up there:
# names are kdsr's, and the kernel layer reads them without the intent.
_MODE_LETTER = {"l3-ipip": "i", "l3-gre": "g", "l3-ip6tnl": "6"}
DECAP_LINK = {"ipip": "kdsr-ipip", "gre": "kdsr-gre", "ip6tnl": "kdsr-ip6tnl"}


def _digest23(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "big") & TUNNEL_MARK_BITS


def server_key(mode: str, address: str) -> str:
    """Six hex digits naming the tunnel from any load balancer to ``address``."""
    return f"{_digest23(f'{mode}|{address}'):06x}"


def tunnel_name(mode: str, address: str) -> str:
    return f"kdsr{_MODE_LETTER[mode]}-{server_key(mode, address)}"  # 12 bytes < IFNAMSIZ


def tunnel_mark(mode: str, address: str) -> int:
    """fwmark and routing table id of the tunnel to ``address``."""
    return MARK_BASE | int(server_key(mode, address), 16)


def probe_mark(address: str) -> int:
    """fwmark and routing table id that send an l2 health probe to ``address``'s MAC."""
    return MARK_BASE | _digest23(f"probe|l2|{address}")


def is_kdsr_mark(value: int) -> bool:
    return value & MARK_MASK == MARK_BASE


def ipvs_fwmark(family: int, protocol: str, vip: str, first: int, last: int) -> int:
    """The fwmark of the IPVS service that stands for a port range."""
    return IPVS_MARK_BASE | _digest23(f"ipvs|{family}|{protocol}|{vip}|{first}-{last}")


_TUNNEL_NAME = re.compile(r"^kdsr[ig6]-[0-9a-f]{6}$")


def is_kdsr_link_name(name: str) -> bool:
    """A name only kdsr gives: a tunnel to a server or a decapsulating link."""
    return bool(_TUNNEL_NAME.match(name)) or name in DECAP_LINK.values()
