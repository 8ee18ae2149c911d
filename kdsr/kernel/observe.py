"""Read what the kernel has of the objects kdsr owns or wants -> Observed."""

from __future__ import annotations

from kdsr.kernel import Kernel
from kdsr.kernel.state import NodeState
from kdsr.model import Address, Desired, NftTable, Observed, Sysctl

# The tables kdsr may own.  Only these are ever read, changed or deleted.
OWNED_TABLES = (("netdev", "kdsr"),)
OWNED_LABEL = "lo:kdsr"


def read_tables(kernel: Kernel, desired: Desired, state: NodeState, orphans: bool) -> list[NftTable]:
    """The kdsr tables this node wants or owns.

    A server node never reads (so never deletes) a load balancer's table.
    Destroy also takes an orphan kdsr table (one no state file claims, e.g.
    after the state directory was lost), never one another node owns.
    """
    wanted = {t.ident for t in desired.tables} | state.tables
    tables = []
    for family, name in OWNED_TABLES:
        if f"{family} {name}" not in wanted and not orphans:
            continue
        table, _listing = kernel.nft_read_table(family, name)
        if table is not None:
            tables.append(table)
    return tables


def observe(kernel: Kernel, desired: Desired, state: NodeState, orphans: bool = False) -> Observed:
    """``orphans``: also read kdsr tables no node's state file claims (destroy)."""
    wanted = {a.ident: a for a in desired.addresses}
    interfaces = {a.ifname for a in desired.addresses} | {i.split(" ", 1)[0] for i in state.owned_addresses}
    addresses: list[Address] = []
    owned: set[str] = set()
    for ifname in sorted(interfaces):
        for addr in kernel.addr_list(ifname):
            mine = addr.ident in state.owned_addresses or addr.label == OWNED_LABEL
            if mine:
                owned.add(addr.ident)
            if mine or addr.ident in wanted:
                addresses.append(addr)

    keys = {s.key for s in desired.sysctls} | set(state.sysctl_previous)
    sysctls = []
    for key in sorted(keys):
        value = kernel.sysctl_read(key)
        if value is not None:
            sysctls.append(Sysctl(key=key, value=value))

    return Observed(
        tables=tuple(read_tables(kernel, desired, state, orphans)),
        addresses=tuple(sorted(addresses, key=lambda a: a.ident)),
        owned_addresses=frozenset(owned),
        address_records=frozenset(state.owned_addresses),
        sysctls=tuple(sysctls),
        sysctl_previous=tuple(sorted(state.sysctl_previous.items())),
        sysctl_written=tuple(sorted(state.sysctl_written.items())),
    )
