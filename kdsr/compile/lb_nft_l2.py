"""Load-balancer role, nft engine, L2 DSR: the ``netdev kdsr`` table.

Shape (see nft/l2-lb.nft for the readable skeleton):

- base chain ``ingress`` on the front interface first lets every frame not
  addressed to this host's MAC go on untouched (``not_for_this_host``), then
  looks up
  ``daddr . l4proto . dport`` in the verdict maps ``services-v4`` /
  ``services-v6`` (single ports, exact match) and then ``service-ranges-v4``
  / ``-v6`` (port ranges) and jumps to the service's selector chain;
- one selector chain + slot map per (pool, family, hashing profile): the chain
  hashes the flow into a Maglev slot (``jhash`` with the intent's seed, the
  same on every load balancer), takes the slot's server id, and forwards the
  unchanged IP packet to that server through the pool's servers map, whose
  per-element counters count each member's packets and bytes.

Rules are static; everything that changes with the intent (VIPs, ports,
servers, weights) is map elements, so a change is an element diff inside one
transaction.  Rules and chains exist per selector, and selectors are few.
"""

from __future__ import annotations

from kdsr.compile.cache import CompileCache
from kdsr.compile.selectors import Selector, selectors_for, server_ids
from kdsr.intent.model import (
    HASH_FIVE_TUPLE,
    HASH_SOURCE_IP,
    HASH_SOURCE_IP_PORT,
    L3_TUNNELS,
    Intent,
    LoadBalancerNode,
    address_text,
)
from kdsr.model import ChainHook, NftChain, NftMap, NftRule, element

TABLE_FAMILY = "netdev"
TABLE_NAME = "kdsr"
INGRESS_CHAIN = "ingress"
# A user's own netdev filter (DDoS drops, ACLs) normally sits at priority 0
# ("filter").  Running after it means their drops still apply to VIP traffic;
# our fwd then steals the packet before the rest of the stack sees it.
INGRESS_PRIORITY = 10
SERVICE_MAPS = {4: "services-v4", 6: "services-v6"}
RANGE_MAPS = {4: "service-ranges-v4", 6: "service-ranges-v6"}
ADDR_PROTO = {4: "ip", 6: "ip6"}
ADDR_TYPE = {4: "ipv4_addr", 6: "ipv6_addr"}


def _payload(protocol: str, field: str) -> dict:
    return {"payload": {"protocol": protocol, "field": field}}


def hash_inputs(fields: str, family: int) -> list[dict]:
    """The header fields jhash reads, per the intent's hashing choice.

    Non-first IP fragments carry no transport header: nft's ``th`` payload
    then fails and the service lookup in ``ingress`` (which reads ``th
    dport``) never matches, so such fragments are not load-balanced at all.
    ``source-ip`` alone hashes fragments consistently but a service match
    still needs the port; see docs/how-it-works.md ("Fragments").
    """
    ip = ADDR_PROTO[family]
    if fields == HASH_SOURCE_IP:
        return [_payload(ip, "saddr")]
    if fields == HASH_SOURCE_IP_PORT:
        return [_payload(ip, "saddr"), _payload("th", "sport")]
    if fields == HASH_FIVE_TUPLE:
        return [
            _payload(ip, "saddr"),
            _payload(ip, "daddr"),
            {"meta": {"key": "l4proto"}},
            _payload("th", "sport"),
            _payload("th", "dport"),
        ]
    raise ValueError(f"unknown hash fields {fields!r}")


def service_lookups(family: int, names: dict[int, str], range_names: dict[int, str]) -> list[dict]:
    """The two verdict-map lookups of ``daddr . l4proto . dport``: single
    ports first, then ranges.

    Why two maps: a map that allows ranges (``flags interval``) on a
    concatenated key is a pipapo set, whose lookup cost grows with its element
    count; an exact-match map is a hash, O(1) (bench/fast_path.py's
    10,000-VIP row against its 1-VIP row).  Ports of one VIP never
    overlap (intent/verify.py), so at most one of the two maps matches.
    """
    key = {"concat": [_payload(ADDR_PROTO[family], "daddr"), {"meta": {"key": "l4proto"}}, _payload("th", "dport")]}
    return [{"vmap": {"key": key, "data": f"@{table[family]}"}} for table in (names, range_names)]


def not_for_this_host(pointer: str) -> NftRule:
    """The first rule of every ingress chain: a frame whose destination MAC
    is not this interface's own goes on untouched (``accept`` ends only this
    base chain): the rest of the stack sees it as if kdsr were not there,
    and ip_rcv / ipv6_rcv drop one addressed to another host.

    A flooded frame (unknown unicast after a switch forgot a MAC, a port
    mirror, a hub-like or promiscuous virtual switch) reaches every balancer
    on the segment; only the one it is addressed to may forward it, or the
    server gets one copy per balancer, and two balancers on a hub forward
    each other's forwarded frames back and forth, many times over.
    Broadcast and multicast frames are not addressed to one host either.

    ``skb->pkt_type`` is set by eth_type_trans() in the driver's receive
    path, before __netif_receive_skb_core() runs the netdev ingress hook,
    and nft_meta loads it as is for every type but PACKET_LOOPBACK, which a
    received frame never has (lab-checked on the host's 6.18 and Debian's
    6.1).  One rule, once per packet, ahead of the lookups: a frame for this
    host pays a 1-byte load and compare, a frame for another no lookup."""
    return NftRule.build(
        [{"match": {"op": "!=", "left": {"meta": {"key": "pkttype"}}, "right": "host"}}, {"accept": None}],
        f"{pointer} (frames not addressed to this host)",
    )


def _ingress_chain(lb: LoadBalancerNode) -> NftChain:
    rules = [not_for_this_host(f"{lb.pointer}/interface")] + [
        NftRule.build([lookup], "/services")
        for family in (4, 6)
        for lookup in service_lookups(family, SERVICE_MAPS, RANGE_MAPS)
    ]
    hook = ChainHook(type="filter", hook="ingress", device=lb.interface, priority=INGRESS_PRIORITY, policy="accept")
    return NftChain(name=INGRESS_CHAIN, hook=hook, rules=tuple(rules), pointer=f"{lb.pointer}/interface")


def service_maps(
    selectors: list[Selector],
    names: dict[int, str] = SERVICE_MAPS,
    range_names: dict[int, str] = RANGE_MAPS,
    cache: CompileCache | None = None,
) -> list[NftMap]:
    """Per family, the verdict maps VIP . protocol . port -> jump to the
    selector: one exact map for single ports, one interval map for ranges
    (see ``service_lookups``; shared with the L3 engine, which names them
    differently).  Keys hold ports as ``(first, last)`` in both, the form a
    listing decodes to."""
    if cache is None:
        return _service_maps(selectors, names, range_names)
    # The last answer per pair of map names (L2, L3), with what it was built
    # from: a change to a pool leaves every service as it was, and building,
    # then sorting, 20,000 elements at 10,000 VIPs costs more than comparing.
    which = (tuple(names.items()), tuple(range_names.items()))
    heads = tuple((sel.name, sel.family, sel.services) for sel in selectors)
    last = cache.service_maps.get(which)
    # The same service objects (a health event's intent shares them): no
    # need to look inside.  Else compare by value, pointers included (they
    # are the elements' comments, and services compare without them).
    if last is not None and _same_objects(last[0], heads):
        return list(last[2])
    made_of = tuple(
        (name, family, tuple((s.vip, s.protocols, s.ports, tuple(p.pointer for p in s.ports)) for s in services))
        for name, family, services in heads
    )
    if last is not None and last[1] == made_of:
        maps = last[2]
    else:
        maps = _service_maps(selectors, names, range_names)
    cache.service_maps.put(which, (heads, made_of, maps))
    return list(maps)


def _same_objects(a: tuple, b: tuple) -> bool:
    """Equal (name, family, services) heads, the services the very same objects."""
    return len(a) == len(b) and all(x[0] == y[0] and x[1] == y[1] and x[2] is y[2] for x, y in zip(a, b, strict=True))


def _service_maps(selectors: list[Selector], names: dict[int, str], range_names: dict[int, str]) -> list[NftMap]:
    exact: dict[int, dict] = {4: {}, 6: {}}
    ranges: dict[int, dict] = {4: {}, 6: {}}
    for sel in selectors:
        for service in sel.services:
            vip = address_text(service.vip)
            for proto in service.protocols:
                for ports in service.ports:
                    key = (vip, proto, (ports.first, ports.last))
                    into = exact if ports.first == ports.last else ranges
                    into[sel.family][key] = element(("jump", sel.name), ports.pointer)
    maps = []
    for family in (4, 6):
        for name, elements, flags in ((names, exact, ()), (range_names, ranges, ("interval",))):
            maps.append(
                NftMap(
                    name=name[family],
                    key_type=(ADDR_TYPE[family], "inet_proto", "inet_service"),
                    data_type="verdict",
                    flags=flags,
                    counter=True,  # per VIP:proto:port packet counts for `kdsr show`
                    elements=tuple(sorted(elements[family].items())),
                    pointer="/services",
                )
            )
    return maps


def _selector_chain(sel: Selector, device: str, cache: CompileCache) -> NftChain:
    if sel.hashing.pinning is not None:
        return _build_selector_chain(sel, device)
    # By everything the chain is made of: the daemon's recompile after a
    # change then builds (and digests) only the chains whose selector
    # changed, not one per pool.
    key = (sel.name, sel.family, sel.table_size, sel.hashing, sel.pins_macs, device, sel.pool.pointer)
    return cache.chains.get_or_make(key, lambda: _build_selector_chain(sel, device))


def _build_selector_chain(sel: Selector, device: str) -> NftChain:
    hashing = {
        "mangle": {
            "key": {"meta": {"key": "mark"}},
            "value": {
                "jhash": {
                    "mod": sel.table_size,
                    "seed": sel.hashing.seed,
                    "expr": _concat(hash_inputs(sel.hashing.fields, sel.family)),
                }
            },
        }
    }
    if sel.hashing.pinning is not None:
        return _pinned_selector_chain(sel, hashing, device)
    # Every rule points at the pool, never at one of its services: a
    # service's name in a rule would make adding or removing that service
    # rewrite the chain, where it must be map elements only.
    pointer = sel.pool.pointer
    # One rule: hash into the slot, the slot's server id, and on to the
    # server (the servers map's lookup counts the packet).  nft 1.0.6 will
    # not key a ``type mark`` map by jhash directly ("datatype mismatch"),
    # hence the mark in between.
    rules = (
        NftRule.build([hashing, _to_server_id(sel.name), *forward_to_server(sel, device)], pointer),
        # Reached only when the slot has no server (every member drained).
        NftRule.build([{"drop": None}], f"{pointer} (no server)"),
    )
    return NftChain(name=sel.name, hook=None, rules=rules, pointer=pointer)


# --- the pool's servers map: forwarding and counting -------------------------
#
# A slot names its server by the server's id (selectors.server_id: an IPv4
# address itself, a digest of an IPv6 one), never by the server's forwarding
# data.  The pool's servers map turns the id into that data (address, or MAC
# when the intent pins MACs; L3: the tunnel's mark) and carries a counter per
# element.  Its elements belong to the pool's members, not to slots: a
# health event, a drain or a weight change rewrites slot elements only, so a
# member's counter (per CPU, like a rule's) only ever grows while the member
# is in the pool.  Per packet that is two lookups (slot, server) and no jump.
#
# A chain (or a named counter object) per member counted as well, but
# libnftables 1.0.6 fetches every chain and object of the table into its
# cache for any transaction, so at 10,000 VIPs x 16 servers every one-element
# change paid for 16,000 of them (bench/control_plane.py); elements cost
# nothing there.


def servers_map_name(pool: str, family: int, mode: str = "l2") -> str:
    """``servers-web-v4`` (L2), ``servers-web-v4-l3-ipip`` (L3, by mode)."""
    name = f"servers-{pool}-v{family}"
    return name if mode == "l2" else f"{name}-{mode}"


def servers_map_parts(name: str) -> tuple[str, int] | None:
    """``servers-web-v4`` or ``servers-web-v4-l3-gre`` -> ("web", 4); None
    for any other name.  Pool names are ``[a-z][a-z0-9-]*``; the family and
    mode parts are fixed."""
    if not name.startswith("servers-"):
        return None
    rest = name[len("servers-") :]
    for mode in L3_TUNNELS:
        if rest.endswith(f"-{mode}"):
            rest = rest[: -len(mode) - 1]
            break
    pool, _, family = rest.rpartition("-")
    if not pool or family not in ("v4", "v6"):
        return None
    return pool, int(family[1])


def _to_server_id(slot_map: str) -> dict:
    mark = {"meta": {"key": "mark"}}
    return {"mangle": {"key": mark, "value": {"map": {"key": mark, "data": f"@{slot_map}"}}}}


def forward_to_server(sel: Selector, device: str) -> list[dict]:
    """The statements that send the packet to the server whose id is in the
    mark, through the pool's servers map (which counts it)."""
    servers = {"map": {"key": {"meta": {"key": "mark"}}, "data": f"@{servers_map_name(sel.pool.name, sel.family)}"}}
    if sel.pins_macs:
        # MACs pinned in the intent: rewrite the frame and send it out as is.
        return [
            {"mangle": {"key": _payload("ether", "saddr"), "value": _payload("ether", "daddr")}},
            {"mangle": {"key": _payload("ether", "daddr"), "value": servers}},
            {"fwd": {"dev": device}},
        ]
    # The kernel's neighbour layer resolves the server's MAC at packet
    # time, so a replaced server (new MAC, same address) needs no apply.
    return [{"fwd": {"dev": device, "family": ADDR_PROTO[sel.family], "addr": servers}}]


def servers_map(
    sel: Selector, source: str, name: str, data_type: str, value, members: tuple, cache: CompileCache
) -> NftMap:
    """The pool's servers map: server id -> ``value(member)``, counted, each
    element's comment the member's address (what `kdsr show` names it by).
    Kept while the pool object and the members taken are the same: a health
    event's recompile rebuilds one pool's map, not every pool's."""
    last = cache.servers_maps.get(name)
    if last is not None and last[0] is sel.pool and last[1] == members:
        return last[2]
    ids = server_ids(sel, source)
    elements = sorted((ids[address_text(m.address)], element(value(m), address_text(m.address))) for m in members)
    built = NftMap(
        name=name,
        key_type=("mark",),
        data_type=data_type,
        counter=True,  # per member: what kdsr sent it (`kdsr show`, the metrics)
        elements=tuple(elements),
        pointer=sel.pool.pointer,
    )
    cache.servers_maps.put(name, (sel.pool, members, built))
    return built


def _l2_servers_maps(selectors: list[Selector], source: str, cache: CompileCache) -> list[NftMap]:
    """One servers map per pool and family its L2 selectors use.

    Every member is in it, drained and down ones too, so their counters
    last; a pool with flow pinning leaves out the members health took down,
    whose pinned flows must move (see the flow pinning comment below)."""
    pinned = {(s.pool.name, s.family) for s in selectors if s.hashing.pinning is not None}
    maps: dict[str, NftMap] = {}
    for sel in selectors:
        name = servers_map_name(sel.pool.name, sel.family)
        if name in maps:
            continue
        members = sel.members
        if (sel.pool.name, sel.family) in pinned:
            members = tuple(m for m in members if not m.down)
        if sel.pins_macs:
            maps[name] = servers_map(sel, source, name, "ether_addr", lambda m: m.mac, members, cache)
        else:
            data_type, value = ADDR_TYPE[sel.family], lambda m: address_text(m.address)
            maps[name] = servers_map(sel, source, name, data_type, value, members, cache)
    return [maps[n] for n in sorted(maps)]


# --- flow pinning ------------------------------------------------------------
#
# Conntrack does not run before netdev ingress, so a pinned selector keeps its
# own flow table: a map the packet path fills, flow -> server id, each entry
# living `timeout` seconds past the flow's last packet.
#
#   mark = jhash(fields) mod M                          the Maglev slot
#   mark = slot map[mark]                               the table's server id
#   update pins { flow : mark }                         a new flow is pinned to it; a
#                                                       known one keeps its pin (update
#                                                       only refreshes the timeout)
#   mark = pins[flow]                                   the pinned server id
#   fwd to servers[mark]                                (address, or MAC when pinned)
#   -- reached only when servers[] has no such id: the pinned server was removed
#   -- from the pool or health took it down, so the pin is stale
#   delete pins { flow }                                unpin
#   mark = slot map[jhash(fields) mod M]; update pins   the table's choice, pinned afresh
#   fwd to servers[mark]
#   drop                                                (no server: empty table)
#
# The stale pin is replaced in the same chain walk, so the packet that finds
# it is forwarded, not lost.  Without the second half a stale pin dropped
# every packet of its flow, and every packet refreshed the pin's timeout, so a
# flow that kept sending was black-holed for good.  The re-choice is one rule:
# when the table is empty its slot lookup fails and the rule stops before the
# update, so no slot number is pinned as if it were a server id.  The update
# itself fails when the map is full (a packet-path delete only marks the
# element dead: it counts against `size` until the set's garbage collector
# frees it, about a second later, checked on 6.1 and 6.18); the flow is then
# forwarded by the table, unpinned, and pinned by a later packet.
# Kernel: on a map, the packet path's delete (NFT_DYNSET_OP_DELETE) wants a
# data register too (EINVAL without one, 6.1 and 6.18), hence `delete @pins
# { flow : meta mark }`, whose data is ignored.  Kernels without "nft_set_hash:
# mark set element as dead when deleting from packet path" (upstream 6.5, in
# the stable series) unlink the element without ever giving its place back.
#
# When the pins map is full the first update fails, the rule stops there and
# the lookup misses, so the flow is forwarded by the table without a pin.
# Server ids are stable per server (selectors.server_id), and the pins and
# servers maps belong to the pool, not to a table size, so pins survive a new
# table, a new table size and a new selector name.  The servers map holds the
# pool's members minus those health took down: drained members (weight 0)
# stay, so their pinned flows keep going there (connection draining); a
# removed or health-down member's pinned flows move to the table's choice at
# their next packet.
#
# The flow is the 5-tuple, hashed to 31 bits: nft 1.0.6 cannot write a map
# keyed by five header fields from the packet path (the register allocator
# asserts above four 32-bit registers), and a hash fits every family.  Two
# flows that share a hash share a pin: the second is sent, consistently, to
# the first one's server, which serves it as well as any other.  31 bits: the
# JSON listing of nft 1.0.6 prints a modulus above 2^31 as a negative number.
PIN_KEY_MOD = 2**31 - 1


def pins_map_name(pool: str, family: int) -> str:
    return f"pins-{pool}-v{family}"


def _flow_key(family: int, seed: int) -> dict:
    return {"jhash": {"mod": PIN_KEY_MOD, "seed": seed, "expr": _concat(hash_inputs(HASH_FIVE_TUPLE, family))}}


def _pinned_selector_chain(sel: Selector, hashing: dict, device: str) -> NftChain:
    mark = {"meta": {"key": "mark"}}
    pins = f"@{pins_map_name(sel.pool.name, sel.family)}"
    flow = _flow_key(sel.family, sel.hashing.seed)
    to_id = _to_server_id(sel.name)
    pin = {
        "map": {
            "op": "update",
            "elem": {"elem": {"val": flow, "timeout": sel.hashing.pinning.timeout}},
            "data": mark,
            "map": pins,
        }
    }
    pinned = {"mangle": {"key": mark, "value": {"map": {"key": flow, "data": pins}}}}
    unpin = {"map": {"op": "delete", "elem": flow, "data": mark, "map": pins}}
    # An id no longer in the servers map matches nothing and falls through.
    to_server = forward_to_server(sel, device)
    first = NftRule.build([hashing], sel.pool.pointer)
    forward = NftRule.build(to_server, sel.pool.pointer)
    drop = NftRule.build([{"drop": None}], f"{sel.pool.pointer} (no server)")
    rules = (
        first,
        NftRule.build([to_id], sel.pool.pointer),
        NftRule.build([pin], f"{sel.pool.pointer} (flow pinning)"),
        NftRule.build([pinned], f"{sel.pool.pointer} (flow pinning)"),
        forward,
        NftRule.build([unpin], f"{sel.pool.pointer} (flow pinning: pinned server gone)"),
        NftRule.build([hashing, to_id, pin], f"{sel.pool.pointer} (flow pinning: pinned afresh)"),
        NftRule.build(forward.expr, f"{sel.pool.pointer} (pinned afresh)"),
        drop,
    )
    return NftChain(name=sel.name, hook=None, rules=rules, pointer=sel.pool.pointer)


def _pins_maps(selectors: list[Selector]) -> list[NftMap]:
    """Per pinned pool and family: the pins map (flow -> server id).  The
    servers map it names ids in is the pool's (``_l2_servers_maps``)."""
    maps: dict[str, NftMap] = {}
    for sel in selectors:
        if sel.hashing.pinning is None:
            continue
        pins = pins_map_name(sel.pool.name, sel.family)
        size = max(sel.hashing.pinning.max_flows, maps[pins].size if pins in maps else 0)
        maps[pins] = NftMap(
            name=pins,
            key_type=("integer",),  # a 31-bit flow hash
            data_type="mark",
            flags=("timeout",),
            size=size,
            pointer=f"{sel.services[0].hashing.pointer}/flow_pinning",
        )
    return list(maps.values())


def _concat(parts: list[dict]) -> dict:
    return parts[0] if len(parts) == 1 else {"concat": parts}


def _selector_map(sel: Selector, source: str, cache: CompileCache) -> NftMap:
    # The last slot map of this selector, with the pool and hashing it came
    # from: after a health event only the changed pool is a new object, so
    # the other 999 of 1,000 maps skip their Maglev lookup and element tuples.
    last = cache.selector_maps.get((sel.name, source))
    if last is not None and last[0] is sel.pool and last[1] == sel.hashing:
        return last[2]
    built = _build_selector_map(sel, source, cache)
    cache.selector_maps.put((sel.name, source), (sel.pool, sel.hashing, built))
    return built


def _build_selector_map(sel: Selector, source: str, cache: CompileCache) -> NftMap:
    return NftMap(
        name=sel.name,
        key_type=("mark",),
        data_type="mark",  # slot -> server id; the pool's servers map forwards and counts
        elements=slot_elements(sel, source, cache),
        pointer=sel.pool.pointer,
    )


def slot_elements(sel: Selector, source: str, cache: CompileCache | None = None) -> tuple:
    """slot -> the server's id, one shared element value per server.

    ``cache``: element tuples already built, by pool and Maglev table (the
    cache hands back the same table for an unchanged pool): the daemon's
    recompile after a change then rebuilds one pool's elements, and the
    diff compares the others' by identity."""
    table = sel.addresses(cache)
    if cache is None:
        return _slot_elements(server_ids(sel, source), table)
    return cache.slot_elements.get_or_make(
        (sel.pool.name, table), lambda: _slot_elements(server_ids(sel, source), table)
    )


def _slot_elements(ids: dict[str, int], table: tuple[str, ...]) -> tuple:
    values = {member: element(ids[member]) for member in set(table)}
    return tuple(zip(range(len(table)), map(values.__getitem__, table), strict=True))


def chains_and_maps(intent: Intent, lb: LoadBalancerNode, cache: CompileCache) -> tuple[list[NftChain], list[NftMap]]:
    """L2's part of the ``netdev kdsr`` table (compile/load_balancer.py builds the table)."""
    selectors = selectors_for(intent, cache=cache)
    chains = [_ingress_chain(lb)] + [_selector_chain(s, lb.interface, cache) for s in selectors]
    maps = service_maps(selectors, cache=cache) + [_selector_map(s, intent.source, cache) for s in selectors]
    maps += _l2_servers_maps(selectors, intent.source, cache) + _pins_maps(selectors)
    return chains, maps
