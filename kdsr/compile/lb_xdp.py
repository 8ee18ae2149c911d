"""Load-balancer role, xdp engine, L2 DSR: what kdsr's XDP program's maps hold.

Pure: the desired content of the maps (kdsr/model_xdp.py), never their
layout.  The Maglev tables are the nft engine's own (the same selectors,
names, sizes, seeds and slot -> server tables: kdsr/compile/selectors.py),
and the program hashes flows into slots as nft's ``jhash`` does, so an xdp
and an nft balancer with one intent send each flow to the same server.

Servers whose MAC the intent does not pin are resolved by the program
through bpf_fib_lookup(), which answers only on an interface that forwards
(net/core/filter.c: BPF_FIB_LKUP_RET_FWD_DISABLED otherwise, 6.1 and 6.18),
so such a pool wants ``forwarding`` on the front interface for its family.
"""

from __future__ import annotations

from kdsr.compile.cache import CompileCache
from kdsr.compile.selectors import selectors_for
from kdsr.intent.model import ENGINE_XDP, Intent, LoadBalancerNode, Service, address_text
from kdsr.model import Sysctl
from kdsr.model_xdp import XdpSelector, XdpServer, XdpService, XdpState


def wanted(service: Service) -> bool:
    return service.mode == "l2" and service.engine == ENGINE_XDP


def compile_xdp(
    intent: Intent, lb: LoadBalancerNode, cache: CompileCache | None = None
) -> tuple[XdpState | None, list[Sysctl]]:
    """The XDP program's state on the front interface (None: no xdp service), and the sysctls it needs."""
    selectors = selectors_for(intent, wanted, cache=cache)
    if not selectors:
        return None, []
    services: list[XdpService] = []
    tables: list[XdpSelector] = []
    servers: dict[str, XdpServer] = {}
    resolve: set[int] = set()
    for sel in selectors:
        tables.append(
            XdpSelector(
                name=sel.name,
                family=sel.family,
                fields=sel.hashing.fields,
                seed=sel.hashing.seed,
                size=sel.table_size,
                table=sel.addresses(cache),
                pointer=sel.pool.pointer,
            )
        )
        for member in sel.members:
            address = address_text(member.address)
            servers[address] = XdpServer(
                address=address, mac=member.mac or "", pointer=member.pointer, neighbour=not member.mac
            )
            if not member.mac:
                resolve.add(sel.family)
        for service in sel.services:
            vip = address_text(service.vip)
            for proto in service.protocols:
                for ports in service.ports:
                    services.append(XdpService(vip, proto, ports.first, ports.last, sel.name, ports.pointer))
    state = XdpState(
        interface=lb.interface,
        services=tuple(sorted(services, key=lambda s: s.ident)),
        selectors=tuple(sorted(tables, key=lambda s: s.name)),
        servers=tuple(sorted(servers.values(), key=lambda s: s.ident)),
        pointer=f"{lb.pointer}/interface",
    )
    sysctls = []
    if 4 in resolve:
        sysctls.append(Sysctl(key=f"net/ipv4/conf/{lb.interface}/forwarding", value="1", pointer=state.pointer))
    if 6 in resolve:
        sysctls.append(Sysctl(key=f"net/ipv6/conf/{lb.interface}/forwarding", value="1", pointer=state.pointer))
    return state, sysctls
