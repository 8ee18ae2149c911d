"""The validated intent: frozen objects that remember where they came from.

Every object carries ``pointer``, the JSON pointer (RFC 6901) of the object in
the intent file, so compile, plan and kernel errors can point back to the line
the user wrote (``/services/web/ports/0``).
"""

from __future__ import annotations

import dataclasses
import functools
import ipaddress
from dataclasses import dataclass, field

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface

# Hash field choices.  The names are the intent's vocabulary; compile maps them
# to nft jhash expressions.
HASH_SOURCE_IP = "source-ip"
HASH_SOURCE_IP_PORT = "source-ip-port"
HASH_FIVE_TUPLE = "five-tuple"
HASH_FIELDS = (HASH_SOURCE_IP, HASH_SOURCE_IP_PORT, HASH_FIVE_TUPLE)

DEFAULT_HASH_FIELDS = HASH_SOURCE_IP_PORT
# "kdsr" in ASCII.  Any fixed value works; what matters is that every load
# balancer uses the same one, which a constant default guarantees.
DEFAULT_HASH_SEED = 0x6B647372

DSR_L2 = "l2"
DSR_L3_IPIP = "l3-ipip"
DSR_L3_GRE = "l3-gre"
DSR_L3_IP6TNL = "l3-ip6tnl"
DSR_MODES = (DSR_L2, DSR_L3_IPIP, DSR_L3_GRE, DSR_L3_IP6TNL)
ENGINE_NFT = "nft"
ENGINE_IPVS = "ipvs"
ENGINE_XDP = "xdp"

# Per L3 mode: the tunnel link kind, the address family it carries (inner and
# outer are the same family here), and the bytes the outer headers add.
L3_TUNNELS = {
    DSR_L3_IPIP: ("ipip", 4, 20),  # outer IPv4 header
    DSR_L3_GRE: ("gre", 4, 24),  # outer IPv4 + 4-byte GRE header (no key, no csum)
    DSR_L3_IP6TNL: ("ip6tnl", 6, 40),  # outer IPv6 header, no encapsulation limit option
}
DEFAULT_PATH_MTU = 1500
# IPVS mh's table size is fixed when the kernel is built (Debian:
# CONFIG_IP_VS_MH_TAB_INDEX=12 -> 4093 slots).
IPVS_MH_TABLE_SIZE = 4093


@dataclass(frozen=True)
class PortRange:
    """Inclusive port range; a single port has first == last."""

    first: int
    last: int
    pointer: str = field(default="", compare=False)

    def __str__(self) -> str:
        return str(self.first) if self.first == self.last else f"{self.first}-{self.last}"


# Flow pinning defaults: IPVS's UDP timeout; max_flows bounds the kernel
# memory the pins of a pool take (docs/consistent-hashing.md, "Flow pinning").
DEFAULT_PIN_TIMEOUT = 300
DEFAULT_PIN_MAX_FLOWS = 65536


@dataclass(frozen=True)
class FlowPinning:
    """Keep established flows on their server across table changes (nft engine)."""

    timeout: int = DEFAULT_PIN_TIMEOUT  # seconds after a flow's last packet
    max_flows: int = DEFAULT_PIN_MAX_FLOWS  # per pool and address family


# Health monitor defaults: out within interval x fall + timeout = 3.5 s.
MONITOR_DSR = "dsr"
MONITOR_PLAIN = "plain"
DEFAULT_INTERVAL = 1.0
DEFAULT_TIMEOUT = 0.5
DEFAULT_RISE = 2
DEFAULT_FALL = 3
DEFAULT_JITTER = 0.1
DEFAULT_UDP_SEND = "kdsr health"
ALL_DOWN_KEEP = "keep"
ALL_DOWN_DROP = "drop"


@dataclass(frozen=True)
class Monitor:
    """One health check, as written on a pool or a service (``pointer`` says which)."""

    type: str  # "tcp", "udp", "http" or "https"
    mode: str = MONITOR_DSR
    port: int | None = None  # None: the service's first port
    interval: float = DEFAULT_INTERVAL
    timeout: float = DEFAULT_TIMEOUT
    rise: int = DEFAULT_RISE
    fall: int = DEFAULT_FALL
    jitter: float = DEFAULT_JITTER
    send: str = DEFAULT_UDP_SEND
    expect: str | None = None
    path: str = "/"
    host: str | None = None
    status: tuple[str, ...] = ("2xx", "3xx")  # codes ("200") or classes ("2xx")
    body: str | None = None
    verify_tls: bool = False
    pointer: str = field(default="", compare=False)


@dataclass(frozen=True)
class Hashing:
    fields: str = DEFAULT_HASH_FIELDS
    seed: int = DEFAULT_HASH_SEED
    table_size: int | None = None  # None: chosen from the pool size
    pointer: str = field(default="", compare=False)
    pinning: FlowPinning | None = None  # None: stateless (the default)


# VIP announcement by BGP (kdsr/compile/bird.py renders it for BIRD 2).
ANNOUNCE_ACTIVE_ACTIVE = "active-active"
ANNOUNCE_ACTIVE_STANDBY = "active-standby"
ANNOUNCE_N_PLUS_M = "n+m"
# VIP ownership on the segment by VRRP (kdsr/compile/keepalived.py renders it
# for keepalived); not BGP: BIRD never sees these VIPs.
ANNOUNCE_VRRP = "vrrp"
DEFAULT_ADVERT_INTERVAL = 1.0
DEFAULT_KEEPALIVED_CONFIG = "/etc/keepalived/keepalived.conf"
DEFAULT_KEEPALIVED_FRAGMENT = "/etc/keepalived/kdsr.conf"
DEFAULT_KEEPALIVED_PID_FILE = "/run/keepalived.pid"
DEFAULT_VRRP_TRACK_DIR = "/run/kdsr"  # debian/kdsr.tmpfiles makes it at boot
DEFAULT_PREPEND = 3
DEFAULT_HOLD_TIME = 90
DEFAULT_BIRD_CONFIG = "/etc/bird/bird.conf"
DEFAULT_BIRD_FRAGMENT = "/etc/bird/kdsr.conf"
DEFAULT_BIRD_SOCKET = "/run/bird/bird.ctl"


@dataclass(frozen=True)
class Announce:
    """How a VIP is announced; ``load_balancers`` None: every one with bgp."""

    mode: str = ANNOUNCE_ACTIVE_ACTIVE
    load_balancers: tuple[str, ...] | None = None
    active: int | None = None  # n+m: N
    standby: int | None = None  # n+m: M
    prepend: int = DEFAULT_PREPEND
    med: int | None = None
    standby_med: int | None = None
    communities: tuple[tuple[int, int], ...] = ()
    pointer: str = field(default="", compare=False)
    # vrrp only (verify requires the router ID there).
    virtual_router_id: int | None = None
    advert_interval: float = DEFAULT_ADVERT_INTERVAL
    preempt: bool = True
    unicast: bool = False


@dataclass(frozen=True)
class KeepalivedFiles:
    config: str = DEFAULT_KEEPALIVED_CONFIG  # keepalived's main config, which includes ``fragment``
    fragment: str = DEFAULT_KEEPALIVED_FRAGMENT  # the file kdsr owns
    pid_file: str = DEFAULT_KEEPALIVED_PID_FILE
    track_dir: str = DEFAULT_VRRP_TRACK_DIR  # kdsr's track files (keepalived track_file)


@dataclass(frozen=True)
class Vrrp:
    keepalived: KeepalivedFiles = KeepalivedFiles()
    pointer: str = field(default="", compare=False)


@dataclass(frozen=True)
class BgpNeighbor:
    address: IPAddress
    asn: int
    password: str | None = None
    bfd: bool = False
    multihop: int | None = None
    pointer: str = field(default="", compare=False)


@dataclass(frozen=True)
class BirdFiles:
    config: str = DEFAULT_BIRD_CONFIG  # the user's main config, which includes ``fragment``
    fragment: str = DEFAULT_BIRD_FRAGMENT  # the file kdsr owns
    socket: str = DEFAULT_BIRD_SOCKET


@dataclass(frozen=True)
class Bgp:
    asn: int
    router_id: ipaddress.IPv4Address
    neighbors: tuple[BgpNeighbor, ...]
    hold_time: int = DEFAULT_HOLD_TIME
    bird: BirdFiles = BirdFiles()
    pointer: str = field(default="", compare=False)


@dataclass(frozen=True)
class Service:
    name: str
    vip: IPAddress
    ports: tuple[PortRange, ...]
    protocols: tuple[str, ...]  # sorted subset of ("tcp", "udp")
    pool: str
    mode: str  # one of DSR_MODES
    engine: str  # "nft" | "ipvs" | "xdp"
    hashing: Hashing
    pointer: str = field(default="", compare=False)
    path_mtu: int = DEFAULT_PATH_MTU
    # The MSS servers advertise on connections to this VIP, so that clients'
    # segments still fit the path once encapsulated; None: no clamp (L2, or
    # "off" in the intent).
    mss_clamp: int | None = None
    health: tuple[Monitor, ...] = ()
    announce: Announce = Announce()

    @property
    def is_l3(self) -> bool:
        return self.mode in L3_TUNNELS


@functools.lru_cache(maxsize=1 << 16)
def address_text(address: IPAddress) -> str:
    """``str(address)``, remembered: ipaddress formats the text anew on
    every call, and compile formats each VIP and member several times (at
    10,000 VIPs and 16,000 members that was 68,000 calls per compile)."""
    return str(address)


@dataclass(frozen=True)
class PoolMember:
    address: IPAddress
    weight: int
    node: str | None  # the server node this member is, if kdsr manages it
    mac: str | None  # lower-case aa:bb:cc:dd:ee:ff, or None: resolve by ARP/ND
    pointer: str = field(default="", compare=False)
    # Set only in the effective intent (kdsr/compile/effective.py): health took
    # this member down.  It then has weight 0 like a drained member, but
    # flow pinning must not keep sending its pinned flows to it.
    down: bool = False


@dataclass(frozen=True)
class Pool:
    name: str
    members: tuple[PoolMember, ...]  # in intent order; compile sorts canonically
    pointer: str = field(default="", compare=False)
    health: tuple[Monitor, ...] = ()
    all_down: str = ALL_DOWN_KEEP


@dataclass(frozen=True)
class LoadBalancerNode:
    name: str
    interface: str
    addresses: tuple[IPInterface, ...]
    pointer: str = field(default="", compare=False)
    bgp: Bgp | None = None
    vrrp: Vrrp | None = None


@dataclass(frozen=True)
class ServerNode:
    name: str
    interface: str
    addresses: tuple[IPInterface, ...]
    pointer: str = field(default="", compare=False)


@dataclass(frozen=True)
class Intent:
    source: str  # the file name, for messages
    services: tuple[Service, ...]
    pools: tuple[Pool, ...]
    load_balancers: tuple[LoadBalancerNode, ...]
    servers: tuple[ServerNode, ...]

    def pool(self, name: str) -> Pool:
        return self._pools_by_name[name]

    @functools.cached_property
    def _pools_by_name(self) -> dict[str, Pool]:
        # Compile looks a pool up per service: a dict keeps 10k services linear.
        return {p.name: p for p in self.pools}

    def services_on(self, pool: str) -> tuple[Service, ...]:
        """The services on ``pool``, sorted by name."""
        return self._services_by_pool.get(pool, ())

    @functools.cached_property
    def _services_by_pool(self) -> dict[str, tuple[Service, ...]]:
        """pool name -> its services, sorted by name (shared: do not modify)."""
        by_pool: dict[str, list[Service]] = {}
        for service in sorted(self.services, key=lambda s: s.name):
            by_pool.setdefault(service.pool, []).append(service)
        return {name: tuple(members) for name, members in by_pool.items()}

    def with_pools(self, pools: tuple[Pool, ...]) -> Intent:
        """This intent with other pools (of the same names: health's
        effective intent).  The services are the same objects, and so is
        their grouping by pool once made: the health daemon's recompile
        after each event need not sort 10,000 services again."""
        other = dataclasses.replace(self, pools=pools)
        other.share_grouping(self)
        return other

    def share_grouping(self, other: Intent) -> None:
        """Take ``other``'s grouping of services by pool (made once for
        both); the two hold the very same services tuple."""
        if self.services is not other.services:
            raise ValueError("only an intent with the same services tuple shares their grouping")
        self.__dict__["_services_by_pool"] = other._services_by_pool  # where functools.cached_property keeps it

    def node_names(self) -> list[str]:
        return [n.name for n in self.load_balancers] + [n.name for n in self.servers]

    def load_balancer(self, name: str) -> LoadBalancerNode | None:
        return next((n for n in self.load_balancers if n.name == name), None)

    def server(self, name: str) -> ServerNode | None:
        return next((n for n in self.servers if n.name == name), None)
