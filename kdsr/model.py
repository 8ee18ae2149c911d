"""Desired and observed kernel state, as keyed, comparable objects.

Both compile (what we want) and the kernel readers (what is there) produce
these types, so diff can compare them.  Equality compares configuration only:
handles, counters and statistics never enter these objects (readers drop
them), so a re-read of an applied state equals the desired state.

nftables rules are compared by their comment, which carries a digest of the
rule's canonical JSON (see ``NftRule``): the kernel lists rules back in its
own normal form (it drops implied dependencies such as ``meta protocol ip``),
so comparing expressions literally would report false drift.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from kdsr.model_xdp import XdpState

# A map element key or value: an int (slot), a string (address, MAC) or a
# tuple for concatenations, with a port range as a (first, last) tuple.
ElementKey = int | str | tuple
ElementValue = str | tuple

RULE_COMMENT_PREFIX = "kdsr:"


def canonical_json(data: Any) -> str:
    return json.dumps(data, sort_keys=True, separators=(",", ":"))


def rule_digest(expr: list) -> str:
    return hashlib.sha256(canonical_json(expr).encode()).hexdigest()[:12]


@dataclass(frozen=True)
class NftRule:
    """One rule: libnftables JSON statements plus an identifying comment.

    ``comment`` is ``kdsr:<digest> <intent pointer>``; the digest covers the
    expression kdsr generated, so a changed rule gets a new comment and a rule
    added by hand (no kdsr comment) never compares equal.  A rule replaced by
    hand *keeping* kdsr's comment is not detected: the kernel lists rules in
    its own normal form, so the expressions cannot be compared literally.
    ``expr_json`` is what kdsr generated, or for a rule read back, what the
    kernel listed (a rollback re-adds exactly that).
    """

    comment: str
    expr_json: str = field(default="", compare=False)

    @classmethod
    def build(cls, expr: list, pointer: str) -> NftRule:
        comment = f"{RULE_COMMENT_PREFIX}{rule_digest(expr)} {pointer}".strip()
        # The kernel caps comments (NFT_USERDATA_MAXLEN) at 256 bytes;
        # nft's own parser at 128.  Pointers are short; truncate to be sure.
        return cls(comment=comment[:128], expr_json=canonical_json(expr))

    @property
    def expr(self) -> list:
        return json.loads(self.expr_json) if self.expr_json else []

    @property
    def digest(self) -> str:
        if not self.comment.startswith(RULE_COMMENT_PREFIX):
            return ""
        return self.comment[len(RULE_COMMENT_PREFIX) :].split(" ", 1)[0]


@dataclass(frozen=True)
class ChainHook:
    """What makes a chain a base chain."""

    type: str
    hook: str
    device: str | None
    priority: int
    policy: str


@dataclass(frozen=True)
class NftChain:
    name: str
    hook: ChainHook | None
    rules: tuple[NftRule, ...]
    pointer: str = field(default="", compare=False)


@dataclass(frozen=True)
class NftElement:
    value: ElementValue
    comment: str = ""


@functools.lru_cache(maxsize=1 << 17)
def element(value: ElementValue, comment: str = "") -> NftElement:
    """The one NftElement of this value and comment.

    Compile and the table readers make their elements here, so a table read
    back from the kernel or its record and the compiled one share element
    objects, and comparing two maps' element tuples stops at identity
    instead of calling a dataclass __eq__ per element (one per map element
    in the daemon's first diff after a start).
    Beyond the cache's size equal elements still compare equal, only slower."""
    return NftElement(value, comment)


@dataclass(frozen=True)
class NftMap:
    """A named map: its declaration plus its elements (key -> value)."""

    name: str
    key_type: tuple[str, ...]
    data_type: str
    flags: tuple[str, ...] = ()
    counter: bool = False
    elements: tuple[tuple[ElementKey, NftElement], ...] = ()
    pointer: str = field(default="", compare=False)
    # Only for maps the packet path fills (flags "timeout"): the most
    # elements the kernel keeps, and their default lifetime in seconds.
    size: int | None = None
    timeout: int | None = None

    def declaration(self) -> tuple:
        return (self.key_type, self.data_type, self.flags, self.counter, self.size, self.timeout)

    def element_dict(self) -> dict[ElementKey, NftElement]:
        return dict(self.elements)


@dataclass(frozen=True)
class NftTable:
    family: str
    name: str
    chains: tuple[NftChain, ...]
    maps: tuple[NftMap, ...]
    pointer: str = field(default="", compare=False)

    def chain(self, name: str) -> NftChain | None:
        return next((c for c in self.chains if c.name == name), None)

    def map(self, name: str) -> NftMap | None:
        return next((m for m in self.maps if m.name == name), None)

    @property
    def ident(self) -> str:
        return f"{self.family} {self.name}"


@dataclass(frozen=True)
class Address:
    """An address on an interface that kdsr wants or owns."""

    ifname: str
    cidr: str  # "10.10.0.100/32"
    label: str = ""  # IPv4 only ("lo:kdsr"); IPv6 addresses have no label
    pointer: str = field(default="", compare=False)

    @property
    def ident(self) -> str:
        return f"{self.ifname} {self.cidr}"


@dataclass(frozen=True)
class Sysctl:
    key: str  # "net/ipv4/conf/all/arp_ignore"
    value: str
    # True: any value >= ``value`` will do.  The kernel takes max(all, iface)
    # for the ARP knobs, and an admin's stricter setting must not be lowered.
    at_least: bool = False
    pointer: str = field(default="", compare=False)
    # Values that also satisfy this one (rp_filter: 0 "off" is as good as 2
    # "loose" for decapsulated packets; only 1 "strict" drops them).
    also: tuple[str, ...] = ()

    def satisfied_by(self, current: str | None) -> bool:
        if current is None:
            return False
        if current in self.also:
            return True
        if self.at_least:
            try:
                return int(current) >= int(self.value)
            except ValueError:
                return False
        return current == self.value

    @property
    def dotted(self) -> str:
        return self.key.replace("/", ".")


# Every link kdsr creates has a name starting with this, so ownership is
# recognisable from the kernel object itself (and a lost state directory never
# makes kdsr touch someone else's tunnel).
LINK_PREFIX = "kdsr"


@dataclass(frozen=True)
class Link:
    """A tunnel interface kdsr owns: an encapsulating link per server on a load
    balancer, or the decapsulating link on a server.

    ``remote`` empty means "any" (a server's decap link accepts every load
    balancer).  Any field change needs a new link (the kernel can change some
    in place, but a replace is simpler to reason about and equally atomic
    from the traffic's view: the routes that point at it are replaced too).
    """

    name: str
    kind: str  # "ipip" | "gre" | "ip6tnl"
    local: str
    remote: str = ""
    ttl: int = 64
    pointer: str = field(default="", compare=False)

    @property
    def ident(self) -> str:
        return self.name

    @property
    def family(self) -> int:
        return 6 if self.kind == "ip6tnl" else 4


@dataclass(frozen=True)
class Route:
    """The default route of a kdsr routing table: everything marked for one
    server leaves through that server's tunnel, or (``gateway``, l2 health
    probes) goes on-link to that server's MAC with its destination unchanged."""

    family: int
    table: int
    dev: str
    pointer: str = field(default="", compare=False)
    gateway: str = ""

    @property
    def ident(self) -> str:
        via = f" via {self.gateway}" if self.gateway else ""
        return f"ipv{self.family} table {self.table:#x} default{via} dev {self.dev}"


@dataclass(frozen=True)
class Rule:
    """``fwmark <mark> lookup <table>``: a packet nftables marked for a server
    is routed by that server's table."""

    family: int
    fwmark: int
    table: int
    priority: int
    pointer: str = field(default="", compare=False)

    @property
    def ident(self) -> str:
        return f"ipv{self.family} pref {self.priority} fwmark {self.fwmark:#x} lookup {self.table:#x}"


@dataclass(frozen=True)
class AnnounceRoute:
    """BIRD may announce this VIP now: a route for it in kdsr's announce
    table (naming.ANNOUNCE_TABLE, which no rule looks up, so it routes no
    packet).  kdsr's BIRD fragment learns that table and exports only what
    it finds there (kdsr/compile/bird.py).  apply adds the route once this
    boot's fast path is read back, and deletes it first to withdraw; a
    rebooted host (a fresh network namespace) has none, so BIRD, started
    from the fragment on disk, announces nothing until kdsr has run.

    ``kind`` is the route type; kdsr makes ``blackhole`` routes, and reads
    back whatever type it finds (another is replaced)."""

    prefix: str  # the VIP, /32 or /128
    kind: str = "blackhole"
    pointer: str = field(default="", compare=False)

    @property
    def ident(self) -> str:
        return self.prefix

    @property
    def family(self) -> int:
        return 6 if ":" in self.prefix else 4


@dataclass(frozen=True)
class IpvsDest:
    address: str
    port: int  # 0 for fwmark services (the packet keeps its port)
    weight: int
    method: str  # "route" (DR) | "tunnel"
    tun_type: str = ""  # "ipip" | "gre" for tunnel; "" for route

    @property
    def ident(self) -> str:
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"{host}:{self.port}"


@functools.lru_cache(maxsize=1 << 16)
def ipvs_dest(address: str, port: int, weight: int, method: str, tun_type: str = "") -> IpvsDest:
    """The one IpvsDest of these values, as ``element`` is for map elements.

    Compile and the IPVS reader make their destinations here, so a service
    read back from the kernel and the compiled one hold the same objects,
    and comparing their destination tuples stops at identity (10,000
    services hold 160,000 destinations of a few hundred servers)."""
    return IpvsDest(address, port, weight, method, tun_type)


@dataclass(frozen=True)
class IpvsService:
    """An IPVS virtual service with its destinations in kernel list order.

    The order matters: ``mh`` fills its table walking the list, and a new
    destination goes to the head of the list, so two directors agree only
    when they hold the same list.  kdsr keeps it canonical (see
    compile/lb_ipvs.py).
    """

    family: int
    protocol: str  # "tcp" | "udp" | "fwmark"
    address: str  # the VIP, or "" for a fwmark service
    port: int  # 0 for a fwmark service
    fwmark: int  # 0 unless a fwmark service
    scheduler: str
    flags: tuple[str, ...]  # sorted, e.g. ("mh-fallback", "mh-port")
    dests: tuple[IpvsDest, ...] = ()
    pointer: str = field(default="", compare=False)

    @property
    def ident(self) -> str:
        if self.protocol == "fwmark":
            return f"fwmark {self.fwmark:#x} ipv{self.family}"
        host = f"[{self.address}]" if self.family == 6 else self.address
        return f"{self.protocol} {host}:{self.port}"

    def config(self) -> tuple:
        return (self.scheduler, self.flags)


@dataclass(frozen=True)
class BgpSession:
    """One BGP session in kdsr's BIRD fragment."""

    neighbor: str
    asn: int
    local: str
    local_asn: int
    hold_time: int
    bfd: bool = False
    multihop: int | None = None
    password: bool = False  # whether one is set (the secret itself is only in the file)
    pointer: str = field(default="", compare=False)

    @property
    def ident(self) -> str:
        return self.neighbor


@dataclass(frozen=True)
class BgpRoute:
    """One VIP announced by this node, with the attributes its role gives it."""

    prefix: str
    role: str  # "active" | "standby"
    prepend: int = 0
    med: int | None = None
    communities: tuple[tuple[int, int], ...] = ()
    pointer: str = field(default="", compare=False)

    @property
    def ident(self) -> str:
        return self.prefix


@dataclass(frozen=True)
class BirdConfig:
    """kdsr's BIRD fragment: what it announces and to whom, and the file text.

    ``text`` carries the model in its first line (kdsr/bird_text.py), so
    the fragment read back from disk is an Observed BirdConfig too."""

    config: str  # the user's main BIRD config (it includes ``fragment``)
    fragment: str
    socket: str
    router_id: str | None
    sessions: tuple[BgpSession, ...]
    routes: tuple[BgpRoute, ...]
    text: str
    # (first line, last line, intent pointer): maps BIRD's parse errors back.
    lines: tuple[tuple[int, int, str], ...] = field(default=(), compare=False)
    withdrawn: tuple[tuple[str, str], ...] = field(default=(), compare=False)  # (prefix, why)


@dataclass(frozen=True)
class VrrpInstance:
    """One VIP owned by VRRP: a keepalived vrrp_instance in kdsr's fragment."""

    name: str  # kdsr_v4_51: family and virtual router ID
    vip: str  # with prefix length, /32 or /128
    interface: str
    virtual_router_id: int
    priority: int
    advert_interval: float
    preempt: bool
    unicast_source: str | None  # None: multicast
    unicast_peers: tuple[str, ...]
    track_file: str  # the gate (VrrpGate.path)
    pointer: str = field(default="", compare=False)

    @property
    def ident(self) -> str:
        return self.name


@dataclass(frozen=True)
class KeepalivedConfig:
    """kdsr's keepalived fragment: the VIPs this node may own, and the file text.

    ``text`` carries the model in its first line (kdsr/keepalived_text.py),
    so the fragment read back from disk is an Observed KeepalivedConfig too."""

    config: str  # keepalived's main config (it includes ``fragment``)
    fragment: str
    pid_file: str
    instances: tuple[VrrpInstance, ...]
    text: str
    # (first line, last line, intent pointer): maps keepalived's errors back.
    lines: tuple[tuple[int, int, str], ...] = field(default=(), compare=False)
    withdrawn: tuple[tuple[str, str], ...] = field(default=(), compare=False)  # (vip, why)


@dataclass(frozen=True)
class VrrpGate:
    """Whether keepalived may own a VIP now: the track file of its instance
    holds 0 (yes) or 1 (no: the instance goes to FAULT and gives the VIP
    up).  The files live in a directory emptied at boot, and keepalived
    creates a missing one as 1 (``init_file 1``), so a rebooted load
    balancer owns nothing until kdsr has verified its fast path and written
    0 (kdsr/compile/keepalived.py)."""

    path: str
    open: bool
    vip: str = ""
    pointer: str = field(default="", compare=False)

    @property
    def ident(self) -> str:
        return self.path

    @property
    def value(self) -> str:
        return "0" if self.open else "1"


@dataclass(frozen=True)
class Desired:
    """Everything kdsr wants on one node."""

    node: str
    role: str  # "load-balancer" | "server"
    tables: tuple[NftTable, ...] = ()
    addresses: tuple[Address, ...] = ()
    sysctls: tuple[Sysctl, ...] = ()
    links: tuple[Link, ...] = ()
    routes: tuple[Route, ...] = ()
    rules: tuple[Rule, ...] = ()
    ipvs: tuple[IpvsService, ...] = ()
    # Kernel modules the node needs (checked, and loaded where possible,
    # before any write).
    modules: tuple[str, ...] = ()
    bird: BirdConfig | None = None  # load balancers with bgp
    announce: tuple[AnnounceRoute, ...] = ()  # the VIPs BIRD may announce now (bgp)
    xdp: XdpState | None = None  # kdsr's XDP program and its maps (xdp engine)
    keepalived: KeepalivedConfig | None = None  # load balancers with vrrp
    gates: tuple[VrrpGate, ...] = ()  # may keepalived own each VIP now (vrrp)


@dataclass(frozen=True)
class Observed:
    """What the kernel has of kdsr's objects (and what could collide with them).

    ``addresses`` lists the owned addresses and any foreign address that
    equals a desired one; ``owned_addresses`` says which are kdsr's.
    ``sysctl_previous`` holds the values kdsr found before it first changed
    a key, so destroy can put them back; ``sysctl_written`` what kdsr wrote,
    so a value someone changed after kdsr is left alone.
    """

    tables: tuple[NftTable, ...] = ()
    addresses: tuple[Address, ...] = ()
    owned_addresses: frozenset[str] = frozenset()  # Address.ident, present now
    address_records: frozenset[str] = frozenset()  # Address.ident, as the state file says
    sysctls: tuple[Sysctl, ...] = ()
    sysctl_previous: tuple[tuple[str, str], ...] = ()
    sysctl_written: tuple[tuple[str, str], ...] = ()  # what kdsr wrote, per key
    links: tuple[Link, ...] = ()  # every link with kdsr's prefix
    foreign_links: frozenset[str] = frozenset()  # of those, the ones kdsr did not create
    routes: tuple[Route, ...] = ()  # in kdsr's routing tables
    rules: tuple[Rule, ...] = ()  # at kdsr's rule priority
    ipvs: tuple[IpvsService, ...] = ()  # services kdsr owns or wants
    foreign_ipvs: frozenset[str] = frozenset()  # wanted idents that exist but are not kdsr's
    bird: BirdConfig | None = None  # kdsr's BIRD fragment as found on disk
    announce: tuple[AnnounceRoute, ...] = ()  # the routes in kdsr's announce table
    xdp: XdpState | None = None  # kdsr's XDP program found (desired or recorded interface)
    foreign_xdp: str = ""  # another XDP program on the interface kdsr wants: who it is
    keepalived: KeepalivedConfig | None = None  # kdsr's keepalived fragment as found on disk
    gates: tuple[VrrpGate, ...] = ()  # kdsr's track files as found


@dataclass
class TableDiff:
    """Everything that differs inside one nft table, grouped for the batch
    builder (kernel/nft_json.py ``batch_for``); diff.py makes it."""

    family: str
    name: str
    desired: NftTable | None
    observed: NftTable | None
    chains_add: list[NftChain] = field(default_factory=list)
    chains_delete: list[NftChain] = field(default_factory=list)
    chains_replace: list[tuple[NftChain, NftChain]] = field(default_factory=list)
    chains_rebuild: list[NftChain] = field(default_factory=list)  # same hook, new rules
    maps_add: list[NftMap] = field(default_factory=list)
    maps_delete: list[NftMap] = field(default_factory=list)
    maps_replace: list[tuple[NftMap, NftMap]] = field(default_factory=list)
    # Per surviving map: keys to delete (removed or changed), elements to add.
    elements_delete: dict[str, list] = field(default_factory=dict)
    elements_add: dict[str, list] = field(default_factory=dict)

    @property
    def empty(self) -> bool:
        return not (
            (self.desired is None) != (self.observed is None)
            or self.chains_add
            or self.chains_delete
            or self.chains_replace
            or self.chains_rebuild
            or self.maps_add
            or self.maps_delete
            or self.maps_replace
            or any(self.elements_delete.values())
            or any(self.elements_add.values())
        )
