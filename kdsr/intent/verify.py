"""Cross-object rules of an intent: what a JSON Schema cannot express.

``verify`` runs on a document that already passed the schema (``load`` skips it
otherwise), so shapes and types are known here; values are not, which is why
every address is parsed defensively and a bad one is reported, never raised.
Every rule reports all of its problems; nothing stops at the first.

The value parsers (``parse_address``, ``port_entries``, ``member_address``
...) are kdsr/intent/values.py's, shared with ``load``, which builds the
model from the same document.
"""

from __future__ import annotations

from dataclasses import dataclass

from kdsr import naming
from kdsr.errors import Problem, quote
from kdsr.intent.bgp_rules import check_bgp
from kdsr.intent.health_rules import check_health
from kdsr.intent.model import (
    DEFAULT_HASH_FIELDS,
    DEFAULT_HASH_SEED,
    DEFAULT_PATH_MTU,
    DSR_L2,
    ENGINE_IPVS,
    ENGINE_NFT,
    ENGINE_XDP,
    HASH_FIVE_TUPLE,
    IPVS_MH_TABLE_SIZE,
    L3_TUNNELS,
    IPAddress,
    IPInterface,
)
from kdsr.intent.primes import is_prime, next_prime
from kdsr.intent.values import (
    auto_mss,
    did_you_mean,
    member_address,
    names_list,
    parse_address,
    parse_interface,
    parse_port,
    port_entries,
    service_engine,
    service_mode,
    service_protocols,
)
from kdsr.intent.vrrp_rules import check_vrrp

L3_HINT = 'an L3 mode ("l3-ipip", "l3-gre" or "l3-ip6tnl") for servers behind routers'
# The smallest MSS a host must accept (RFC 879 for IPv4, RFC 8200's 1280-byte
# minimum MTU for IPv6); a clamp below it breaks peers that assume it.
MIN_MSS = {4: 536, 6: 1220}


# --- the rules ----------------------------------------------------------------


@dataclass
class _Owner:
    """Who holds an address, for "already used by" messages."""

    role: str  # "load_balancers", "servers" or "pools"
    what: str  # "load balancer lb1", "server s1", "pool web member 0"
    pointer: str


@dataclass
class _Member:
    pointer: str  # /pools/web/servers/0
    address: IPAddress | None  # None: unresolvable, already reported
    address_pointer: str  # the field the address came from


class _Verifier:
    def __init__(self, doc: dict, source: str):
        self.doc = doc
        self.source = source
        self.problems: list[Problem] = []
        self.services: dict = doc["services"]
        self.pools: dict = doc["pools"]
        self.load_balancers: dict = doc["load_balancers"]
        self.servers: dict = doc.get("servers", {})
        # Filled by the first passes, read by the cross-object rules.
        self.node_addresses: dict[tuple[str, str], list[IPInterface]] = {}
        self.address_owner: dict[IPAddress, _Owner] = {}
        self.vips: dict[str, IPAddress] = {}
        self.members: dict[str, list[_Member]] = {}

    def report(self, pointer: str, message: str, hint: str = "") -> None:
        self.problems.append(Problem(self.source, pointer, message, hint))

    def run(self) -> list[Problem]:
        # A reload verifies a cut-down document (kdsr/intent/reverify.py),
        # which knows which entries each rule pairs: a rule that pairs others,
        # or spans the whole document, must be taught there too.
        self.check_node_names()
        self.check_node_addresses()
        self.check_vips()
        self.check_pool_references()
        self.check_members()
        self.check_vip_owners()
        self.check_member_macs()
        self.check_address_families()
        self.check_l2_reachability()
        self.check_ports()
        self.check_table_sizes()
        self.check_l3()
        self.check_ipvs()
        self.check_flow_pinning()
        self.check_tunnel_names()
        self.check_health()
        self.check_bgp()
        self.check_vrrp()
        return self.problems

    # Health monitors: kdsr/intent/health_rules.py.
    def check_health(self) -> None:
        check_health(self.services, self.pools, self.report)

    # BGP and VIP announcement: kdsr/intent/bgp_rules.py.
    def check_bgp(self) -> None:
        check_bgp(self.services, self.load_balancers, self.report)

    # VIP ownership by VRRP: kdsr/intent/vrrp_rules.py.
    def check_vrrp(self) -> None:
        check_vrrp(self.services, self.load_balancers, self.report)

    # One role per node: the CLI selects a node by name (--node).
    def check_node_names(self) -> None:
        for name in self.servers:
            if name in self.load_balancers:
                self.report(
                    f"/servers/{name}",
                    f"{quote(name)} is both a load balancer and a server.",
                    "A node is a load balancer or a server, not both; rename one of them.",
                )

    # Rule 12 for node addresses, plus: one address, one owner.
    def check_node_addresses(self) -> None:
        for kind, label, nodes in (
            ("load_balancers", "load balancer", self.load_balancers),
            ("servers", "server", self.servers),
        ):
            for name, node in nodes.items():
                parsed: list[IPInterface] = []
                for i, text in enumerate(node["addresses"]):
                    pointer = f"/{kind}/{name}/addresses/{i}"
                    try:
                        interface = parse_interface(text)
                    except ValueError as error:
                        self.report(pointer, f"{error}.", 'Write them like "10.10.0.2/24" or "fd00:10::2/64".')
                        continue
                    parsed.append(interface)
                    self.claim(interface.ip, _Owner(kind, f"{label} {name}", pointer), pointer)
                self.node_addresses[(kind, name)] = parsed

    def claim(self, address: IPAddress, owner: _Owner, pointer: str) -> None:
        """Record who holds an address; report when someone already does."""
        earlier = self.address_owner.get(address)
        if earlier is None:
            self.address_owner[address] = owner
            return
        self.report(
            pointer,
            f"{address} is already the address of {earlier.what} ({earlier.pointer}).",
            "Each address belongs to one node; fix the duplicate.",
        )

    # Rule 12 for VIPs; rule 2 comes later, once member addresses are known.
    def check_vips(self) -> None:
        for name, service in self.services.items():
            pointer = f"/services/{name}/vip"
            try:
                vip = parse_address(service["vip"])
            except ValueError as error:
                self.report(pointer, f"{error}.", 'A VIP is one address, e.g. "10.10.0.100" or "fd00:10::100".')
                continue
            if vip.is_unspecified or vip.is_multicast or vip.is_loopback:
                kind = "unspecified" if vip.is_unspecified else "multicast" if vip.is_multicast else "loopback"
                self.report(pointer, f"{vip} is a {kind} address.", "A VIP is a unicast address clients reach.")
                continue
            self.vips[name] = vip

    # Rule 2: a VIP is nobody's own address.
    def check_vip_owners(self) -> None:
        for name, vip in self.vips.items():
            owner = self.address_owner.get(vip)
            if owner is not None:
                self.report(
                    f"/services/{name}/vip",
                    f"VIP {vip} is the address of {owner.what} ({owner.pointer}).",
                    "A VIP needs an address of its own: load balancers attract it and servers "
                    "hold it on loopback; pick an unused address.",
                )

    # Rule 4 for services.
    def check_pool_references(self) -> None:
        known = list(self.pools)
        for name, service in self.services.items():
            pool = service["pool"]
            if pool not in self.pools:
                self.report(
                    f"/services/{name}/pool",
                    f"unknown pool {quote(pool)}.",
                    f"{did_you_mean(pool, known)}Defined pools: {names_list(known)}.",
                )

    # Rules 4 (nodes), 7, 12 for members; the member `port` field; resolution.
    def check_members(self) -> None:
        for pool_name, pool in self.pools.items():
            members: list[_Member] = []
            seen: dict[IPAddress, str] = {}
            for i, member in enumerate(pool["servers"]):
                pointer = f"/pools/{pool_name}/servers/{i}"
                if "port" in member:
                    self.report(
                        f"{pointer}/port",
                        "a server port other than the service's is not supported.",
                        "DSR forwards packets unchanged, so a server must listen on the "
                        "service's own port; remove this field.",
                    )
                node_ok = self.check_member_node(member, pointer)
                address, field = self.resolve(member, pointer, node_ok)
                members.append(_Member(pointer, address, pointer + field))
                if address is None:
                    continue
                owner = self.address_owner.get(address)
                if address in seen:
                    self.report(
                        pointer + field,
                        f"{address} is already a member of this pool ({seen[address]}).",
                        "List each server once; use 'weight' to give it a bigger share.",
                    )
                    continue
                seen[address] = pointer
                if owner is None:
                    # An unmanaged server (address only): no VIP may take it either.
                    self.address_owner[address] = _Owner("pools", f"pool {pool_name} member {i}", pointer)
                elif owner.role == "load_balancers":
                    self.report(
                        pointer + field,
                        f"{address} is the address of {owner.what} ({owner.pointer}).",
                        "A load balancer cannot be a member of its own pool; use a server's address.",
                    )
            self.members[pool_name] = members

    def check_member_node(self, member: dict, pointer: str) -> bool:
        """Rule 4 for members: True when `node` is absent or names a server."""
        node = member.get("node")
        if node is None or node in self.servers:
            return True
        if node in self.load_balancers:
            self.report(
                f"{pointer}/node",
                f"{quote(node)} is a load balancer, not a server node.",
                "Pool members are servers (under /servers).",
            )
            return False
        known = list(self.servers)
        hint = (
            f"{did_you_mean(node, known)}Defined server nodes: {names_list(known)}."
            if known
            else "There are no server nodes; define it under /servers, or give the member an 'address'."
        )
        self.report(f"{pointer}/node", f"unknown server node {quote(node)}.", hint)
        return False

    def resolve(self, member: dict, pointer: str, node_ok: bool) -> tuple[IPAddress | None, str]:
        """The member's address (None when it can't be known) and its field."""
        resolved = member_address(member, self.servers) if node_ok else None
        if resolved is None:
            return None, "/node"
        text, field = resolved
        try:
            address = parse_address(text)
        except ValueError as error:
            if field == "/address":
                self.report(pointer + field, f"{error}.", 'Give one address, e.g. "10.10.0.11".')
            # else: the node's own address is bad, reported under /servers.
            return None, field
        node = member.get("node")
        if field == "/address" and node is not None:
            ips = [i.ip for i in self.node_addresses.get(("servers", node), [])]
            if ips and address not in ips:
                self.report(
                    pointer + field,
                    f"{address} is not an address of server {node} ({', '.join(map(str, ips))}).",
                    "Use one of the node's addresses, or leave 'address' out to use its first one.",
                )
        return address, field

    # Rule 6: the compiler either programs static neighbours or resolves all.
    def check_member_macs(self) -> None:
        for pool_name, pool in self.pools.items():
            servers = pool["servers"]
            pinned = [i for i, m in enumerate(servers) if "mac" in m]
            for i in pinned:
                mac = bytes.fromhex(servers[i]["mac"].replace(":", ""))
                if mac == bytes(6) or mac[0] & 1:
                    self.report(
                        f"/pools/{pool_name}/servers/{i}/mac",
                        f"{servers[i]['mac']} is not a unicast MAC address.",
                        "Give the server interface's own MAC address.",
                    )
            unpinned = [i for i in range(len(servers)) if i not in pinned]
            if pinned and unpinned:
                self.report(
                    f"/pools/{pool_name}/servers",
                    f"{_members(pinned)} {'pins' if len(pinned) == 1 else 'pin'} a 'mac' but "
                    f"{_members(unpinned)} {'does' if len(unpinned) == 1 else 'do'} not.",
                    "Pin a MAC on every member of the pool or on none (kdsr then resolves them by ARP/ND).",
                )

    # Rule 3: one pool serves one address family.
    def check_address_families(self) -> None:
        for name, service in self.services.items():
            vip = self.vips.get(name)
            members = self.members.get(service["pool"])
            if vip is None or members is None:
                continue
            wrong = [m for m in members if m.address is not None and m.address.version != vip.version]
            if wrong:
                listed = ", ".join(f"{m.address} ({m.pointer})" for m in wrong)
                self.report(
                    f"/services/{name}/pool",
                    f"service {name} has IPv{vip.version} VIP {vip} but pool {service['pool']} "
                    f"has IPv{wrong[0].address.version} members: {listed}.",
                    f"DSR does not translate addresses: give those members an IPv{vip.version} "
                    "'address', or use a separate pool per address family.",
                )

    # Rule 5: L2 DSR rewrites only the MAC, so each server must be on a
    # segment every load balancer is directly connected to.
    def check_l2_reachability(self) -> None:
        l2_pools = dict.fromkeys(
            s["pool"] for s in self.services.values() if service_mode(s) == DSR_L2 and s["pool"] in self.members
        )
        for pool_name in l2_pools:
            for member in self.members[pool_name]:
                if member.address is None:
                    continue
                for lb_name in self.load_balancers:
                    interfaces = self.node_addresses.get(("load_balancers", lb_name), [])
                    if not interfaces:
                        continue  # all its addresses are invalid, reported already
                    if any(member.address in i.network for i in interfaces if i.version == member.address.version):
                        continue
                    networks = ", ".join(str(i.network) for i in interfaces)
                    self.report(
                        member.address_pointer,
                        f"server {member.address} is not on a subnet connected to load balancer "
                        f"{lb_name} ({networks}).",
                        f"L2 DSR needs servers on the LB's segment; use a server on that segment or {L3_HINT}.",
                    )

    # Port ranges (rule 12's cousin) and rule 1: one service per VIP/proto/port.
    def check_ports(self) -> None:
        # Earlier entries by (VIP, protocol), each with its order of claim, so a
        # service is checked against its own VIP's entries only (10k VIPs stay
        # linear) and clashes are still reported in the order they were claimed.
        claimed: dict[tuple[IPAddress, str], list[tuple[int, int, int, str, str]]] = {}
        order = 0
        for name, service in self.services.items():
            vip = self.vips.get(name)
            protocols = service_protocols(service)
            for pointer, item in port_entries(service["ports"], f"/services/{name}/ports"):
                try:
                    first, last = parse_port(item)
                except ValueError as error:
                    self.report(pointer, f"{error}.", 'Ports are 1-65535; a range is written "A-B" with A <= B.')
                    continue
                if vip is None:
                    continue
                # Group by earlier entry so "tcp/udp" is one line, not two.
                clashes: dict[tuple[str, str, int, int], list[str]] = {}
                earlier = sorted((entry, proto) for proto in protocols for entry in claimed.get((vip, proto), ()))
                for (_, c_first, c_last, c_name, c_pointer), c_proto in earlier:
                    if c_first <= last and first <= c_last:
                        clashes.setdefault((c_name, c_pointer, c_first, c_last), []).append(c_proto)
                for (c_name, c_pointer, c_first, c_last), protos in clashes.items():
                    what = f"{vip} {'/'.join(protos)} {_ports(first, last)}"
                    where = "this service" if c_name == name else f"service {c_name}"
                    if (c_first, c_last) == (first, last):
                        message = f"{what} already belong{'s' if first == last else ''} to {where} ({c_pointer})."
                    else:
                        verb = "overlaps" if first == last else "overlap"
                        message = f"{what} {verb} {_ports(c_first, c_last)} of {where} ({c_pointer})."
                    hint = (
                        "Remove the duplicate."
                        if c_name == name
                        else "A VIP, protocol and port select one service; change the ports or the VIP."
                    )
                    self.report(pointer, message, hint)
                for proto in protocols:
                    claimed.setdefault((vip, proto), []).append((order, first, last, name, pointer))
                    order += 1

    # Rule 10: Maglev needs a prime table size.
    def check_table_sizes(self) -> None:
        for name, service in self.services.items():
            size = service.get("hashing", {}).get("table_size")
            if size is not None and not is_prime(int(size)):
                # next_prime(<= 65537) <= 65537, so the suggestion is always allowed.
                self.report(
                    f"/services/{name}/hashing/table_size",
                    f"table_size {size} is not prime.",
                    f"A consistent-hash (Maglev) table needs a prime size; try {next_prime(int(size))}.",
                )
                continue
            pool = self.pools.get(service.get("pool"), {}) if isinstance(service.get("pool"), str) else {}
            members = len(pool.get("servers", [])) if isinstance(pool, dict) else 0
            if size is not None and members and int(size) < members:
                # Fewer slots than servers: some servers would never get a flow.
                self.report(
                    f"/services/{name}/hashing/table_size",
                    f"table_size {size} is smaller than pool {service['pool']!r}'s {members} servers.",
                    f"Use a prime of at least 100 x the servers ({next_prime(100 * members)}), "
                    "or leave table_size out to have it chosen.",
                )

    # L3 modes: the tunnel carries one family; its ends need addresses of it;
    # the MSS clamp must leave room for a TCP segment.
    def check_l3(self) -> None:
        for name, service in self.services.items():
            mode = service_mode(service)
            dsr_pointer = f"/services/{name}/dsr"
            if mode not in L3_TUNNELS:
                if isinstance(service.get("dsr", {}).get("mss_clamp"), int):
                    self.report(
                        f"{dsr_pointer}/mss_clamp",
                        "mss_clamp applies to L3 modes; L2 DSR does not encapsulate.",
                        "Remove mss_clamp, or use an L3 mode.",
                    )
                continue
            _kind, family, overhead = L3_TUNNELS[mode]
            vip = self.vips.get(name)
            if vip is not None and vip.version != family:
                suggestion = '"l3-ip6tnl"' if vip.version == 6 else '"l3-ipip" or "l3-gre"'
                self.report(
                    f"{dsr_pointer}/mode",
                    f"{mode} carries IPv{family} only, but VIP {vip} is IPv{vip.version}.",
                    f"For an IPv{vip.version} VIP use {suggestion}.",
                )
                continue
            for lb_name in self.load_balancers:
                interfaces = self.node_addresses.get(("load_balancers", lb_name), [])
                if interfaces and not any(i.version == family for i in interfaces):
                    self.report(
                        f"/load_balancers/{lb_name}/addresses",
                        f"load balancer {lb_name} has no IPv{family} address to source {mode} tunnels "
                        f"from (service {name}).",
                        f"Add the load balancer's IPv{family} address (the tunnels' outer source).",
                    )
            pool = service["pool"]
            for i, member in enumerate(self.pools.get(pool, {}).get("servers", [])):
                if "mac" in member:
                    self.report(
                        f"/pools/{pool}/servers/{i}/mac",
                        f"service {name} uses {mode}: a tunnel has no MACs to pin.",
                        "Remove 'mac' (it is for L2 DSR), or use a separate pool.",
                    )
            for member in self.members.get(pool, []):
                address = member.address
                if address is None:
                    continue
                if address.is_loopback or address.is_link_local or address.is_multicast or address.is_unspecified:
                    self.report(
                        member.address_pointer,
                        f"{address} is not routable, so no tunnel from a load balancer can reach it "
                        f"(service {name} uses {mode}).",
                        "Give the server's routable (global or private) address.",
                    )
            path_mtu = int(service.get("dsr", {}).get("path_mtu", DEFAULT_PATH_MTU))
            largest = auto_mss(mode, path_mtu)
            clamp = service.get("dsr", {}).get("mss_clamp", "auto")
            if largest < MIN_MSS[family]:
                self.report(
                    f"{dsr_pointer}/path_mtu",
                    f"path_mtu {path_mtu} leaves {largest} bytes per TCP segment after the {mode} "
                    f"tunnel's {overhead} bytes and the headers, below the minimum MSS {MIN_MSS[family]}.",
                    f"Raise path_mtu to at least {path_mtu - largest + MIN_MSS[family]}.",
                )
            elif isinstance(clamp, int) and not MIN_MSS[family] <= clamp <= largest:
                self.report(
                    f"{dsr_pointer}/mss_clamp",
                    f"mss_clamp {clamp} is outside {MIN_MSS[family]}-{largest}: "
                    + (
                        "too small to carry a TCP segment every host accepts."
                        if clamp < MIN_MSS[family]
                        else f"segments that large do not fit path_mtu {path_mtu} through {mode}."
                    ),
                    f'Use "auto" ({largest} here) or a value in that range.',
                )

    # Flow pinning lives in the L2 nft fast path (a dynamic map in the netdev
    # ingress table); IPVS keeps established connections on their server by itself.
    def check_flow_pinning(self) -> None:
        for name, service in self.services.items():
            if service.get("hashing", {}).get("flow_pinning", False) is False:
                continue
            engine = service_engine(service)
            if engine != ENGINE_NFT or service_mode(service) != DSR_L2:
                why = {
                    ENGINE_IPVS: "The ipvs engine keeps established connections on their server by itself; ",
                    # bpf/kdsr_xdp.c is stateless: a pin would need a flow table it does not keep.
                    ENGINE_XDP: "The xdp engine keeps no per-flow state; ",
                }.get(engine, "")
                self.report(
                    f"/services/{name}/hashing/flow_pinning",
                    "flow pinning is available for L2 DSR with the nft engine only.",
                    f"{why}remove flow_pinning, or use mode l2 with engine nft.",
                )

    # The ipvs engine: what IPVS's mh scheduler can and cannot honour.
    def check_ipvs(self) -> None:
        for name, service in self.services.items():
            if service_engine(service) != ENGINE_IPVS:
                continue
            hashing = service.get("hashing", {})
            pointer = f"/services/{name}/hashing"
            if hashing.get("fields", DEFAULT_HASH_FIELDS) == HASH_FIVE_TUPLE:
                self.report(
                    f"{pointer}/fields",
                    "the ipvs engine cannot hash the five-tuple: IPVS mh hashes the source address, "
                    "and the source port with its mh-port flag, nothing else.",
                    'Use "source-ip" or "source-ip-port", or the nft engine.',
                )
            if "seed" in hashing and int(hashing["seed"]) != DEFAULT_HASH_SEED:
                self.report(
                    f"{pointer}/seed",
                    "the ipvs engine cannot take a seed: IPVS mh hashes with fixed keys (the same on every "
                    "director, so load balancers agree anyway).",
                    "Remove the seed, or use the nft engine.",
                )
            size = hashing.get("table_size")
            if size is not None and int(size) != IPVS_MH_TABLE_SIZE:
                self.report(
                    f"{pointer}/table_size",
                    f"the ipvs engine's table size is the kernel's ({IPVS_MH_TABLE_SIZE} slots on Debian), not {size}.",
                    "Remove table_size, or use the nft engine.",
                )
            pool = service["pool"]
            for i, member in enumerate(self.pools.get(pool, {}).get("servers", [])):
                if "mac" in member and service_mode(service) == DSR_L2:
                    self.report(
                        f"/pools/{pool}/servers/{i}/mac",
                        f"service {name} uses the ipvs engine, which resolves servers' MACs itself.",
                        "Remove 'mac', or use the nft engine.",
                    )

    # Tunnel link names and fwmarks are derived from (mode, server address):
    # two different servers must not end up with the same one.
    # An l2 health probe's mark (and routing table) shares that space.
    def check_tunnel_names(self) -> None:
        seen: dict[int, tuple[str, str, str]] = {}
        for service in self.services.values():
            mode = service_mode(service)
            if not marks_members(mode, self.pools.get(service["pool"], {})):
                continue
            for member in self.members.get(service["pool"], []):
                if member.address is None:
                    continue
                address = str(member.address)
                mark, what = member_mark(mode, address)
                earlier = seen.setdefault(mark, (address, what, member.address_pointer))
                if earlier[:2] != (address, what):
                    self.report(
                        member.address_pointer,
                        f"server {member.address} ({what}) gets the same mark and routing table as "
                        f"{earlier[0]} ({earlier[1]}, {earlier[2]}).",
                        "This is a hash collision kdsr cannot resolve by itself; report it, and use another "
                        "server address meanwhile.",
                    )


def marks_members(mode: str, pool: dict) -> bool:
    """Whether a service in ``mode`` on ``pool`` gives each member a mark:
    a tunnel (L3), or the route of an l2 health probe."""
    return mode in L3_TUNNELS or (mode == DSR_L2 and "health" in pool)


def member_mark(mode: str, address: str) -> tuple[int, str]:
    """(mark, what it routes) of a member of such a service."""
    if mode in L3_TUNNELS:
        return naming.tunnel_mark(mode, address), f"{mode} tunnel"
    return naming.probe_mark(address), "l2 health probe route"


def _members(indexes: list[int]) -> str:
    return ("member " if len(indexes) == 1 else "members ") + ", ".join(map(str, indexes))


def _ports(first: int, last: int) -> str:
    return f"port {first}" if first == last else f"ports {first}-{last}"


def verify(doc: dict, source: str) -> list[Problem]:
    """Every cross-object problem of a schema-valid intent document."""
    return _Verifier(doc, source).run()
