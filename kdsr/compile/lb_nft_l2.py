"""Load-balancer role, nft engine, L2 DSR: the ``netdev kdsr`` table.

Shape (see nft/l2-lb.nft for the readable skeleton):

- base chain ``ingress`` on the front interface looks up
  ``daddr . l4proto . dport`` in the verdict maps ``services-v4`` /
  ``services-v6`` and jumps to the service's selector chain;
- one selector chain + slot map per (pool, family, hashing profile): the chain
  hashes the flow into a Maglev slot (``jhash`` with the intent's seed, the
  same on every load balancer) and forwards the unchanged IP packet to the
  slot's server.

Rules are static; everything that changes with the intent (VIPs, ports,
servers, weights) is map elements, so a change is an element diff inside one
transaction.  Rules and chains exist per selector, and selectors are few.
"""

from __future__ import annotations

from kdsr.compile.selectors import Selector, selectors_for
from kdsr.intent.model import (
    HASH_FIVE_TUPLE,
    HASH_SOURCE_IP,
    HASH_SOURCE_IP_PORT,
    Intent,
    LoadBalancerNode,
)
from kdsr.model import ChainHook, Desired, NftChain, NftElement, NftMap, NftRule, NftTable

TABLE_FAMILY = "netdev"
TABLE_NAME = "kdsr"
INGRESS_CHAIN = "ingress"
# A user's own netdev filter (DDoS drops, ACLs) normally sits at priority 0
# ("filter").  Running after it means their drops still apply to VIP traffic;
# our fwd then steals the packet before the rest of the stack sees it.
INGRESS_PRIORITY = 10
SERVICE_MAPS = {4: "services-v4", 6: "services-v6"}
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
    still needs the port; see README ("Fragments").
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


def _ingress_chain(lb: LoadBalancerNode) -> NftChain:
    rules = []
    for family in (4, 6):
        expr = [
            {
                "vmap": {
                    "key": {
                        "concat": [
                            _payload(ADDR_PROTO[family], "daddr"),
                            {"meta": {"key": "l4proto"}},
                            _payload("th", "dport"),
                        ]
                    },
                    "data": f"@{SERVICE_MAPS[family]}",
                }
            }
        ]
        rules.append(NftRule.build(expr, "/services"))
    hook = ChainHook(type="filter", hook="ingress", device=lb.interface, priority=INGRESS_PRIORITY, policy="accept")
    return NftChain(name=INGRESS_CHAIN, hook=hook, rules=tuple(rules), pointer=f"{lb.pointer}/interface")


def _service_maps(selectors: list[Selector]) -> list[NftMap]:
    elements: dict[int, dict] = {4: {}, 6: {}}
    for sel in selectors:
        for service in sel.services:
            vip = str(service.vip)
            for proto in service.protocols:
                for ports in service.ports:
                    key = (vip, proto, (ports.first, ports.last))
                    elements[sel.family][key] = NftElement(value=("jump", sel.name), comment=ports.pointer)
    return [
        NftMap(
            name=SERVICE_MAPS[family],
            key_type=(ADDR_TYPE[family], "inet_proto", "inet_service"),
            data_type="verdict",
            flags=("interval",),
            counter=True,  # per VIP:proto:port packet counts for `kdsr show`
            elements=tuple(sorted(elements[family].items())),
            pointer="/services",
        )
        for family in (4, 6)
    ]


def _selector_chain(sel: Selector, device: str) -> NftChain:
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
    lookup = {"map": {"key": {"meta": {"key": "mark"}}, "data": f"@{sel.name}"}}
    if sel.pins_macs:
        # MACs pinned in the intent: rewrite the frame and send it out as is.
        forward = [
            {"mangle": {"key": _payload("ether", "saddr"), "value": _payload("ether", "daddr")}},
            {"mangle": {"key": _payload("ether", "daddr"), "value": lookup}},
            {"fwd": {"dev": device}},
        ]
    else:
        # The kernel's neighbour layer resolves the server's MAC at packet
        # time, so a replaced server (new MAC, same address) needs no apply.
        forward = [{"fwd": {"dev": device, "family": ADDR_PROTO[sel.family], "addr": lookup}}]
    pointer = sel.pool.pointer
    rules = (
        NftRule.build([hashing], f"{sel.services[0].hashing.pointer or sel.services[0].pointer}"),
        NftRule.build(forward, pointer),
        # Reached only when the slot has no server (every member drained).
        NftRule.build([{"drop": None}], f"{pointer} (no server)"),
    )
    return NftChain(name=sel.name, hook=None, rules=rules, pointer=pointer)


def _concat(parts: list[dict]) -> dict:
    return parts[0] if len(parts) == 1 else {"concat": parts}


def _selector_map(sel: Selector) -> NftMap:
    table = sel.table()
    return NftMap(
        name=sel.name,
        key_type=("mark",),
        data_type="ether_addr" if sel.pins_macs else ADDR_TYPE[sel.family],
        counter=True,  # per-slot packets, summed per server by `kdsr show`
        elements=tuple((slot, NftElement(value=member)) for slot, member in enumerate(table)),
        pointer=sel.pool.pointer,
    )


def build_table(intent: Intent, lb: LoadBalancerNode) -> NftTable:
    selectors = selectors_for(intent)
    chains = [_ingress_chain(lb)] + [_selector_chain(s, lb.interface) for s in selectors]
    maps = _service_maps(selectors) + [_selector_map(s) for s in selectors]
    return NftTable(
        family=TABLE_FAMILY,
        name=TABLE_NAME,
        chains=tuple(sorted(chains, key=lambda c: c.name)),
        maps=tuple(sorted(maps, key=lambda m: m.name)),
        pointer=lb.pointer,
    )


def compile_load_balancer(intent: Intent, lb: LoadBalancerNode) -> Desired:
    return Desired(node=lb.name, role="load-balancer", tables=(build_table(intent, lb),))
