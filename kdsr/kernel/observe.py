"""Read what the kernel has of the objects kdsr owns or wants -> Observed."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from kdsr import naming
from kdsr.bird_text import parse_model
from kdsr.errors import ForeignObjectError
from kdsr.keepalived_text import parse_model as parse_keepalived
from kdsr.kernel import Kernel
from kdsr.kernel.state import NodeState
from kdsr.model import (
    LINK_PREFIX,
    Address,
    BirdConfig,
    Desired,
    IpvsService,
    KeepalivedConfig,
    Link,
    NftTable,
    Observed,
    Sysctl,
    TableDiff,
    VrrpGate,
)

# The tables kdsr may own.  Only these are ever read, changed or deleted.
OWNED_TABLES = (("netdev", "kdsr"), ("inet", "kdsr"))
OWNED_LABEL_SUFFIX = ":kdsr"  # "lo:kdsr", "eth0:kdsr"


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
        # Reuse a read no nftables transaction has outdated (nft_generation.py).
        table = kernel.nft.read_table(family, name, reuse=True)
        if table is not None:
            tables.append(table)
    return tables


def observe(
    kernel: Kernel,
    desired: Desired,
    state: NodeState,
    orphans: bool = False,
    ipvs_list: Callable[[], list[IpvsService]] | None = None,
) -> Observed:
    """``orphans``: also read kdsr tables no node's state file claims (destroy).
    ``ipvs_list``: where the IPVS table comes from, if not a full listing
    (an apply's read-back of the services it wrote, ipvs_apply.read_back)."""
    wanted = {a.ident: a for a in desired.addresses}
    interfaces = {a.ifname for a in desired.addresses} | {i.split(" ", 1)[0] for i in state.owned_addresses}
    addresses: list[Address] = []
    owned: set[str] = set()
    for ifname in sorted(interfaces):
        for addr in kernel.links.addr_list(ifname):
            mine = addr.ident in state.owned_addresses or addr.label.endswith(OWNED_LABEL_SUFFIX)
            if mine:
                owned.add(addr.ident)
            if mine or addr.ident in wanted:
                addresses.append(addr)

    keys = {s.key for s in desired.sysctls} | set(state.sysctl_previous)
    sysctls = []
    for key in sorted(keys):
        value = kernel.sysctl.read(key)
        if value is not None:
            sysctls.append(Sysctl(key=key, value=value))

    links, foreign_links = _links(kernel, state, orphans)
    l3 = bool(desired.links or desired.routes or state.links or orphans)
    # kdsr's announce table is read where BIRD announces for this node, or
    # did (destroy, an intent without bgp), or by a destroy without records.
    bgp = bool(desired.bird or desired.announce or state.bird_files or orphans)
    if desired.ipvs or state.ipvs:
        ipvs, foreign_ipvs = _ipvs(ipvs_list or kernel.ipvs.list_all, desired, state)
    else:
        ipvs, foreign_ipvs = [], frozenset()
    xdp, foreign_xdp = _xdp(kernel, desired, state)
    return Observed(
        xdp=xdp,
        foreign_xdp=foreign_xdp,
        links=tuple(links),
        foreign_links=foreign_links,
        routes=tuple(sorted(kernel.links.route_list(), key=lambda r: r.ident)) if l3 else (),
        rules=tuple(sorted(kernel.links.rule_list(naming.RULE_PRIORITY), key=lambda r: r.ident)) if l3 else (),
        ipvs=tuple(ipvs),
        foreign_ipvs=foreign_ipvs,
        tables=tuple(read_tables(kernel, desired, state, orphans)),
        addresses=tuple(sorted(addresses, key=lambda a: a.ident)),
        owned_addresses=frozenset(owned),
        address_records=frozenset(state.owned_addresses),
        sysctls=tuple(sysctls),
        sysctl_previous=tuple(sorted(state.sysctl_previous.items())),
        sysctl_written=tuple(sorted(state.sysctl_written.items())),
        bird=_bird(kernel, desired, state),
        announce=tuple(sorted(kernel.links.announce_list(), key=lambda r: r.ident)) if bgp else (),
        **_vrrp(kernel, desired, state),
    )


def observe_announcement(kernel: Kernel, desired: Desired, state: NodeState) -> Observed:
    """Only what tells BIRD what to announce: the fragment and kdsr's announce table."""
    return Observed(
        bird=_bird(kernel, desired, state),
        announce=tuple(sorted(kernel.links.announce_list(), key=lambda r: r.ident)),
        **_vrrp(kernel, desired, state),
    )


def keep_unchanged(kernel: Kernel, desired: Desired, observed: Observed, changed: Iterable[TableDiff]) -> None:
    """Each table a plan leaves alone (not in ``changed``, its table diffs) equals its read, as the diff compares
    them: the kernel handle keeps the compiled table as that read.  The next
    diff (the daemon's next health event) then meets compile's own map
    tuples and stops at identity.  Without this the first event after a
    start compared every read element with its compiled twin, pair by pair."""
    if desired.xdp is not None and observed.xdp is not None:
        kernel.xdp.adopt(desired.xdp)  # the xdp maps' elements that equal compile's, likewise
    touched = {(td.family, td.name) for td in changed}
    read = {t.ident: t for t in observed.tables}
    for table in desired.tables:
        if (table.family, table.name) not in touched and table.ident in read:
            kernel.nft.adopt(read[table.ident], table)


def _bird(kernel: Kernel, desired: Desired, state: NodeState) -> BirdConfig | None:
    """kdsr's BIRD fragment as it is on disk (the one wanted, else the one recorded)."""
    if desired.bird is not None:
        files = [desired.bird.config, desired.bird.fragment, desired.bird.socket]
    elif state.bird_files:
        files = state.bird_files
    else:
        return None
    config, fragment, socket = files
    text = kernel.bird.read(fragment)
    if text is None:
        return None
    found = parse_model(text, config, fragment, socket)
    if found is None:
        _require_placeholder(text, fragment, "BIRD", "bgp.bird.fragment")
        return BirdConfig(config, fragment, socket, None, (), (), text)
    return found


def _require_placeholder(text: str, fragment: str, daemon: str, field: str) -> None:
    """A fragment kdsr did not write (no model line).  One with nothing but
    comments is the empty placeholder a user creates for the include: kdsr
    may fill it; anything else is the user's, and refused."""
    meaningful = [line for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if meaningful:
        raise ForeignObjectError(
            f"{fragment} exists and kdsr did not write it (its first line is not kdsr's model line). "
            f"kdsr owns that file and would replace it: move your {daemon} config elsewhere, or name another "
            f"file in {field}."
        )


def _vrrp(kernel: Kernel, desired: Desired, state: NodeState) -> dict:
    """kdsr's keepalived fragment as it is on disk (the one wanted, else the
    one recorded), and the track files kdsr wants, wrote, or the fragment names."""
    if desired.keepalived is not None:
        files = [desired.keepalived.config, desired.keepalived.fragment, desired.keepalived.pid_file]
    else:
        files = state.keepalived_files
    found = None
    if files:
        config, fragment, pid_file = files
        text = kernel.keepalived.read(fragment)
        if text is not None:
            found = parse_keepalived(text, config, fragment, pid_file)
            if found is None:
                _require_placeholder(text, fragment, "keepalived", "vrrp.keepalived.fragment")
                found = KeepalivedConfig(config, fragment, pid_file, (), text)
    vips = {i.track_file: i.vip for i in (found.instances if found else ())}
    vips.update({g.path: g.vip for g in desired.gates})
    gates = []
    for path in sorted(set(vips) | state.gates):
        value = kernel.keepalived.gate_read(path)
        if value is not None:
            gates.append(VrrpGate(path, open=value == "0", vip=vips.get(path, "")))
    return {"keepalived": found, "gates": tuple(gates)}


def _links(kernel: Kernel, state: NodeState, orphans: bool) -> tuple[list[Link], frozenset[str]]:
    """Every link with kdsr's prefix, and which of them kdsr has no record of
    creating.  Destroy after a lost state directory (``orphans``) also takes
    links whose whole name is one only kdsr gives (kdsr/naming.py)."""
    links = kernel.links.link_list(LINK_PREFIX)
    if orphans:
        foreign = frozenset(x.name for x in links if x.name not in state.links and not naming.is_kdsr_link_name(x.name))
    else:
        foreign = frozenset(x.name for x in links if x.name not in state.links)
    return links, foreign


def _ipvs(
    ipvs_list: Callable[[], list[IpvsService]], desired: Desired, state: NodeState
) -> tuple[list[IpvsService], frozenset[str]]:
    """IPVS services kdsr created or wants.  IPVS objects carry no label, so
    ownership is the state file's record; a wanted service that exists
    without one is someone else's."""
    wanted = {s.ident for s in desired.ipvs}
    found = [s for s in ipvs_list() if s.ident in state.ipvs or s.ident in wanted]
    foreign = frozenset(s.ident for s in found if s.ident not in state.ipvs)
    return found, foreign


def _xdp(kernel: Kernel, desired: Desired, state: NodeState):
    """kdsr's XDP program on the interface it wants (or recorded), and a
    foreign program found where kdsr wants its own.  kdsr's program is
    found by its name on the interface (kdsr/kernel/xdp.py)."""
    interfaces = sorted(({desired.xdp.interface} if desired.xdp is not None else set()) | state.xdp)
    found, foreign = None, ""
    for ifname in interfaces:
        if not kernel.links.link_exists(ifname):
            continue
        have, other = kernel.xdp.read(ifname)
        if have is not None and (found is None or desired.xdp is None or ifname == desired.xdp.interface):
            found = have
        if other and desired.xdp is not None and ifname == desired.xdp.interface and ifname not in state.xdp:
            foreign = f"{other} on {ifname}"
    return found, foreign
