"""The xdp engine's kernel state, as keyed, comparable objects (see model.py).

The BPF program (bpf/kdsr_xdp.c) reads maps whose layout is the kernel
backend's business (kdsr/kernel/xdp.py: slot regions, server indexes, which
half of a selector is active).  What compile wants and what a reader finds
is this logical state: services -> selector, selector -> Maglev table
(and, for L3, the tunnel and path MTU), server -> MAC.  The plan shows
changes of these elements.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

# The program's name in the kernel (bpf/kdsr_xdp.c's SEC("xdp") function,
# truncated by the kernel to 15 bytes): how kdsr knows its own program.
PROGRAM_NAME = "kdsr_xdp"

# bpf/kdsr_xdp.c HASH_*: which fields the Maglev slot is hashed from.
HASH_FIELDS = {"source-ip": 0, "source-ip-port": 1, "five-tuple": 2}
# bpf/kdsr_xdp.c ENCAP_*: how a selector's packets reach their server (the DSR mode).
ENCAPS = {"l2": 0, "l3-ipip": 1, "l3-gre": 2, "l3-ip6tnl": 3}


@dataclass(frozen=True)
class XdpServer:
    """A server a table names: its address, and its MAC when the intent pins
    one ("" : the program resolves it through the kernel's neighbour table)."""

    address: str
    mac: str = ""
    pointer: str = field(default="", compare=False)
    # Without a MAC: kdsr keeps a managed neighbour entry for it on the
    # interface (NTF_EXT_MANAGED, Linux 5.16: the kernel resolves it and keeps
    # it resolved), so bpf_fib_lookup() finds the MAC from the first packet.
    neighbour: bool = False

    @property
    def ident(self) -> str:
        return self.address


@dataclass(frozen=True)
class XdpSelector:
    """One Maglev table (kdsr/compile/selectors.py's selector, same name)."""

    name: str
    family: int
    fields: str  # "source-ip" | "source-ip-port" | "five-tuple"
    seed: int
    size: int
    table: tuple[str, ...]  # slot -> server address; () when no server has weight
    pointer: str = field(default="", compare=False)
    mode: str = "l2"  # the DSR mode: l2 rewrites MACs, l3-* push the tunnel's outer header
    # L3: the longest packet the path to the servers carries once
    # encapsulated (the smallest path_mtu of the selector's services, as the
    # nft engine's "too big" rule has it); 0 for l2.
    path_mtu: int = 0

    @property
    def ident(self) -> str:
        return self.name


@dataclass(frozen=True)
class XdpService:
    """VIP . protocol . port (or port range) -> selector."""

    vip: str
    protocol: str  # "tcp" | "udp"
    first: int
    last: int
    selector: str
    pointer: str = field(default="", compare=False)

    @property
    def family(self) -> int:
        return 6 if ":" in self.vip else 4

    @functools.cached_property  # sorted and matched by, tens of thousands at a time
    def ident(self) -> str:
        host = f"[{self.vip}]" if self.family == 6 else self.vip
        ports = str(self.first) if self.first == self.last else f"{self.first}-{self.last}"
        return f"{self.protocol} {host}:{ports}"


@dataclass(frozen=True)
class XdpState:
    """kdsr's XDP program on one interface and what its maps hold."""

    interface: str
    services: tuple[XdpService, ...] = ()
    selectors: tuple[XdpSelector, ...] = ()
    servers: tuple[XdpServer, ...] = ()
    pointer: str = field(default="", compare=False)
    # L3: the outer source of the tunnels, per family (the nft engine's
    # tunnel links' local address); "" where no L3 selector needs one.
    # In the program's config element, with the interface's MAC.
    source4: str = field(default="", compare=False)
    source6: str = field(default="", compare=False)
    # Observed only: how the program is attached ("driver" | "generic"), and
    # the interface's MAC in the program's config ("" : not set).
    mode: str = field(default="", compare=False)
    config_mac: str = field(default="", compare=False)
    # Observed only: the attached program was loaded from another object
    # than the one kdsr would load now (kdsr was upgraded): replaced.
    stale: bool = field(default=False, compare=False)


XDP_TYPES = (XdpServer, XdpSelector, XdpService, XdpState)


def describe(obj: XdpServer | XdpSelector | XdpService | XdpState) -> str:
    """One line for the text plan."""
    if isinstance(obj, XdpServer):
        return f"MAC {obj.mac}" if obj.mac else "MAC from the neighbour table (managed entry)"
    if isinstance(obj, XdpSelector):
        shares: dict[str, int] = {}
        for address in obj.table:
            shares[address] = shares.get(address, 0) + 1
        held = ", ".join(f"{a} {n}" for a, n in sorted(shares.items())) or "no server: drops"
        tunnel = f", {obj.mode} path MTU {obj.path_mtu}" if obj.mode != "l2" else ""
        return f"{obj.size} slots, {obj.fields} seed {obj.seed:#x}{tunnel} ({held})"
    if isinstance(obj, XdpService):
        return f"-> {obj.selector}"
    sources = ", ".join(a for a in (obj.source4, obj.source6) if a)
    return (
        f"kdsr_xdp on {obj.interface}: {len(obj.services)} services, {len(obj.selectors)} tables, "
        f"{len(obj.servers)} servers" + (f", tunnel source {sources}" if sources else "")
    )


def as_json(obj: XdpServer | XdpSelector | XdpService | XdpState) -> dict:
    if isinstance(obj, XdpServer):
        return {"address": obj.address, "mac": obj.mac}
    if isinstance(obj, XdpSelector):
        return {
            "name": obj.name,
            "fields": obj.fields,
            "seed": obj.seed,
            "size": obj.size,
            "mode": obj.mode,
            "path_mtu": obj.path_mtu,
            "table": list(obj.table),
        }
    if isinstance(obj, XdpService):
        return {"vip": obj.vip, "protocol": obj.protocol, "ports": [obj.first, obj.last], "selector": obj.selector}
    return {
        "interface": obj.interface,
        "services": len(obj.services),
        "selectors": len(obj.selectors),
        "servers": len(obj.servers),
        "tunnel_sources": [a for a in (obj.source4, obj.source6) if a],
    }
