"""Load-balancer role: the Desired state from every engine and mode it serves.

- nft engine, l2:  the ``netdev kdsr`` table (lb_nft_l2);
- nft engine, L3:  chains and maps in the same ``netdev kdsr`` table,
                   tunnels, routes and rules (lb_nft_l3);
- health probes:  for dsr monitors of l2 services, a route and rule per
                   server (kdsr/compile/targets.py);
- xdp engine:      kdsr's XDP program's map contents (lb_xdp), and for L3
                   pools with dsr monitors the probes' tunnels, routes and
                   rules;
- ipvs engine:     IPVS services, VIP addresses, IPVS sysctls, and for port
                   ranges a marking chain in ``inet kdsr`` (lb_ipvs);
- bgp:             the BIRD fragment, and the announce routes that let BIRD
                   announce its VIPs (bird);
- vrrp:            the keepalived fragment, and the gates that let keepalived
                   own its VIPs (keepalived).
"""

from __future__ import annotations

from kdsr.compile import lb_ipvs, lb_nft_l2, lb_nft_l3, lb_xdp
from kdsr.compile.bird import announce_routes, bird_config
from kdsr.compile.cache import CompileCache
from kdsr.compile.keepalived import gates, keepalived_config
from kdsr.compile.selectors import selectors_for
from kdsr.compile.targets import probe_paths
from kdsr.intent.model import Intent, LoadBalancerNode
from kdsr.model import Desired, NftTable


def compile_load_balancer(
    intent: Intent, lb: LoadBalancerNode, withdraw: dict[str, str] | None = None, cache: CompileCache | None = None
) -> Desired:
    """``withdraw``: VIPs this node must not announce now, and why (health).
    ``cache``: what an earlier compile left to reuse (compile/cache.py)."""
    cache = cache if cache is not None else CompileCache()
    tables = []
    modules: set[str] = set()
    l3 = lb_nft_l3.compile_l3(intent, lb, cache)
    l2 = selectors_for(intent, cache=cache)  # L2 on nft
    chains, maps = lb_nft_l2.chains_and_maps(intent, lb, cache) if l2 else ([], [])
    if chains or l3:
        # L3's chains and maps join L2's in the one netdev table.
        chains += l3.get("chains", [])
        maps += l3.get("maps", [])
        tables.append(_table(lb_nft_l2.TABLE_FAMILY, lb_nft_l2.TABLE_NAME, chains, maps, lb))
        modules.add("nf_tables")
    ipvs = lb_ipvs.compile_ipvs(intent, lb, cache)
    if ipvs.get("chains"):
        tables.append(_table(lb_ipvs.TABLE_FAMILY, lb_ipvs.TABLE_NAME, ipvs["chains"], ipvs.get("maps", []), lb))
    xdp = lb_xdp.compile_xdp(intent, lb, cache)
    modules.update(l3.get("modules", ()))
    modules.update(ipvs.get("modules", ()))
    modules.update(xdp.get("modules", ()))
    sysctls = {s.key: s for s in [*l3.get("sysctls", ()), *ipvs.get("sysctls", ()), *xdp.get("sysctls", ())]}
    probe_routes, probe_rules = probe_paths(intent, lb)
    # An nft L3 service and an xdp L3 service on one pool and mode name the same tunnels.
    links = {link.name: link for link in [*xdp.get("links", ()), *l3.get("links", ())]}
    routes = {r.ident: r for r in [*xdp.get("routes", ()), *l3.get("routes", ()), *probe_routes]}
    rules = {r.ident: r for r in [*xdp.get("rules", ()), *l3.get("rules", ()), *probe_rules]}
    bird = bird_config(intent, lb, withdraw)
    keepalived = keepalived_config(intent, lb, withdraw)
    return Desired(
        node=lb.name,
        role="load-balancer",
        tables=tuple(tables),
        addresses=tuple(sorted(ipvs.get("addresses", ()), key=lambda a: a.ident)),
        sysctls=tuple(sorted(sysctls.values(), key=lambda s: s.key)),
        links=tuple(sorted(links.values(), key=lambda x: x.name)),
        routes=tuple(sorted(routes.values(), key=lambda r: r.ident)),
        rules=tuple(sorted(rules.values(), key=lambda r: r.ident)),
        ipvs=tuple(ipvs.get("ipvs", ())),
        modules=tuple(sorted(modules)),
        bird=bird,
        announce=announce_routes(bird),
        xdp=xdp["state"],
        keepalived=keepalived,
        gates=gates(keepalived),
    )


def _table(family: str, name: str, chains: list, maps: list, lb: LoadBalancerNode) -> NftTable:
    return NftTable(
        family=family,
        name=name,
        chains=tuple(sorted(chains, key=lambda c: c.name)),
        maps=tuple(sorted(maps, key=lambda m: m.name)),
        pointer=lb.pointer,
    )
