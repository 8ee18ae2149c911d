"""Load-balancer role: the Desired state from every engine and mode it serves.

- nft engine, l2:  the ``netdev kdsr`` table (lb_nft_l2);
- nft engine, L3:  the ``inet kdsr`` table, tunnels, routes and rules (lb_nft_l3);
- health probes:  for dsr monitors of l2 services, a route and rule per
                   server (kdsr/health/targets.py);
- ipvs engine:     IPVS services, VIP addresses, IPVS sysctls, and for port
                   ranges a marking chain in ``inet kdsr`` (lb_ipvs);
- bgp:             the BIRD fragment announcing its VIPs (bird).
"""

from __future__ import annotations

from kdsr.compile import lb_ipvs, lb_nft_l2, lb_nft_l3
from kdsr.compile.bird import bird_config
from kdsr.compile.selectors import selectors_for
from kdsr.health.targets import probe_paths
from kdsr.intent.model import Intent, LoadBalancerNode
from kdsr.model import Desired, NftTable


def compile_load_balancer(intent: Intent, lb: LoadBalancerNode, withdraw: dict[str, str] | None = None) -> Desired:
    """``withdraw``: VIPs this node must not announce now, and why (health)."""
    tables = []
    modules: set[str] = set()
    if selectors_for(intent):  # L2 services on the nft engine
        tables.append(lb_nft_l2.build_table(intent, lb))
        modules.add("nf_tables")
    l3 = lb_nft_l3.compile_l3(intent, lb)
    ipvs = lb_ipvs.compile_ipvs(intent, lb)
    inet_chains = list(l3["tables"][0].chains) if l3 else []
    inet_maps = list(l3["tables"][0].maps) if l3 else []
    inet_chains += ipvs.get("chains", [])
    inet_maps += ipvs.get("maps", [])
    if inet_chains:
        tables.append(
            NftTable(
                family=lb_nft_l3.TABLE_FAMILY,
                name=lb_nft_l3.TABLE_NAME,
                chains=tuple(sorted(inet_chains, key=lambda c: c.name)),
                maps=tuple(sorted(inet_maps, key=lambda m: m.name)),
                pointer=lb.pointer,
            )
        )
    modules.update(l3.get("modules", ()))
    modules.update(ipvs.get("modules", ()))
    sysctls = {s.key: s for s in list(l3.get("sysctls", ())) + list(ipvs.get("sysctls", ()))}
    probe_routes, probe_rules = probe_paths(intent, lb)
    return Desired(
        node=lb.name,
        role="load-balancer",
        tables=tuple(tables),
        addresses=tuple(sorted(ipvs.get("addresses", ()), key=lambda a: a.ident)),
        sysctls=tuple(sorted(sysctls.values(), key=lambda s: s.key)),
        links=tuple(l3.get("links", ())),
        routes=tuple(sorted([*l3.get("routes", ()), *probe_routes], key=lambda r: r.ident)),
        rules=tuple(sorted([*l3.get("rules", ()), *probe_rules], key=lambda r: r.ident)),
        ipvs=tuple(ipvs.get("ipvs", ())),
        modules=tuple(sorted(modules)),
        bird=bird_config(intent, lb, withdraw),
    )
