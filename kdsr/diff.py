"""Desired x Observed -> Plan: what must change, as data.

The same Plan drives the rendered dry run, apply, and drift reports.  Objects
are matched by identity (table family+name, chain name, map name, element
key, address interface+cidr, sysctl key) and compared on configuration only.
Where a field cannot change in place, the change is a replace and names the
field that forces it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kdsr.bird_text import empty_config, parse_model
from kdsr.model import (
    Address,
    AnnounceRoute,
    Desired,
    IpvsService,
    Link,
    NftChain,
    NftMap,
    NftTable,
    Observed,
    Sysctl,
    TableDiff,
    VrrpGate,
)

CREATE, UPDATE, REPLACE, DELETE = "create", "update", "replace", "delete"
# The reason of a "bird config" change written without `birdc configure`.
BIRD_NOT_RUNNING = "BIRD is not running: no reload"


@dataclass(frozen=True)
class Change:
    action: str
    kind: str  # "nft table" | "nft chain" | "nft map" | "nft element" | "address" | "sysctl"
    ident: str
    before: Any = None
    after: Any = None
    reason: str = ""  # for replace: the field that forces it
    pointer: str = ""  # where in the intent this comes from


@dataclass
class Plan:
    node: str
    role: str
    changes: list[Change]
    tables: list[TableDiff]
    # Facts a reviewer needs that are not changes (e.g. who announces which VIP).
    notes: list[str] = field(default_factory=list)
    # What the reviewer must not miss in the state this plan leaves (e.g. a
    # service with no server left to take its flows).
    warnings: list[str] = field(default_factory=list)
    # The change in the operator's terms: services and servers' shares
    # (kdsr/service_view.py ``summarise``); empty for a server node.
    service_changes: dict = field(default_factory=dict)
    # The IPVS services this plan was made from, by ident (None: absent),
    # for every service it may touch: apply starts from them instead of
    # listing the kernel again (a full listing of a large table is slow:
    # bench/ipvs_control_plane.py), and the read-back takes the
    # services it did not touch from here.  None: apply lists the kernel.
    ipvs_seen: dict[str, IpvsService | None] | None = field(default=None, repr=False, compare=False)

    @property
    def empty(self) -> bool:
        return not self.changes

    def of_kind(self, kind: str) -> list[Change]:
        return [c for c in self.changes if c.kind == kind]


def _chain_replace_reason(old: NftChain, new: NftChain) -> str:
    if (old.hook is None) != (new.hook is None):
        return "base chain"
    if old.hook and new.hook:
        for name in ("type", "hook", "device", "priority", "policy"):
            if getattr(old.hook, name) != getattr(new.hook, name):
                return f"{name} {getattr(old.hook, name)} -> {getattr(new.hook, name)}"
    return ""


def _map_replace_reason(old: NftMap, new: NftMap) -> str:
    for name in ("key_type", "data_type", "flags", "counter", "size", "timeout"):
        if getattr(old, name) != getattr(new, name):
            return f"{name} {getattr(old, name)} -> {getattr(new, name)}"
    return ""


def diff_table(desired: NftTable | None, observed: NftTable | None, changes: list[Change]) -> TableDiff:
    ref = desired or observed
    assert ref is not None
    td = TableDiff(family=ref.family, name=ref.name, desired=desired, observed=observed)
    tid = ref.ident
    if desired is None:
        changes.append(Change(DELETE, "nft table", tid, before=observed, pointer=""))
        return td
    if observed is None:
        changes.append(Change(CREATE, "nft table", tid, after=desired, pointer=desired.pointer))
        observed = NftTable(family=desired.family, name=desired.name, chains=(), maps=())

    old_chains = {c.name: c for c in observed.chains}
    for chain in desired.chains:
        old = old_chains.pop(chain.name, None)
        cid = f"{tid}/{chain.name}"
        if old is None:
            td.chains_add.append(chain)
            changes.append(Change(CREATE, "nft chain", cid, after=chain, pointer=chain.pointer))
        elif reason := _chain_replace_reason(old, chain):
            td.chains_replace.append((old, chain))
            changes.append(Change(REPLACE, "nft chain", cid, old, chain, reason=reason, pointer=chain.pointer))
        elif old.rules != chain.rules:
            td.chains_rebuild.append(chain)
            changes.append(Change(UPDATE, "nft chain", cid, old, chain, reason="rules", pointer=chain.pointer))
    for old in old_chains.values():
        td.chains_delete.append(old)
        changes.append(Change(DELETE, "nft chain", f"{tid}/{old.name}", before=old))

    old_maps = {m.name: m for m in observed.maps}
    for nmap in desired.maps:
        old = old_maps.pop(nmap.name, None)
        mid = f"{tid}/{nmap.name}"
        if old is None:
            td.maps_add.append(nmap)
            changes.append(Change(CREATE, "nft map", mid, after=nmap, pointer=nmap.pointer))
        elif reason := _map_replace_reason(old, nmap):
            td.maps_replace.append((old, nmap))
            changes.append(Change(REPLACE, "nft map", mid, old, nmap, reason=reason, pointer=nmap.pointer))
        else:
            _diff_elements(td, old, nmap, changes)
    for old in old_maps.values():
        td.maps_delete.append(old)
        changes.append(Change(DELETE, "nft map", f"{tid}/{old.name}", before=old))
    return td


def _diff_elements(td: TableDiff, old: NftMap, new: NftMap, changes: list[Change]) -> None:
    if old.elements == new.elements:
        return  # the common case (every untouched pool's map): one comparison in C
    before, after = old.element_dict(), new.element_dict()
    deletes, adds = [], []
    for key, elem in new.elements:
        prev = before.get(key)
        if prev == elem:
            continue
        eid = f"{td.family} {td.name}/{new.name}[{format_key(key)}]"
        if prev is None:
            adds.append((key, elem))
            changes.append(Change(CREATE, "nft element", eid, after=elem, pointer=elem.comment or new.pointer))
        elif prev != elem:
            # nft has no in-place element update: delete + add in one batch.
            deletes.append(key)
            adds.append((key, elem))
            changes.append(Change(UPDATE, "nft element", eid, prev, elem, pointer=elem.comment or new.pointer))
    for key, elem in old.elements:
        if key not in after:
            deletes.append(key)
            eid = f"{td.family} {td.name}/{new.name}[{format_key(key)}]"
            changes.append(Change(DELETE, "nft element", eid, before=elem, pointer=elem.comment))
    if deletes:
        td.elements_delete[new.name] = deletes
    if adds:
        td.elements_add[new.name] = adds


def format_key(key: Any) -> str:
    if isinstance(key, tuple) and len(key) == 2 and all(isinstance(p, int) for p in key):
        return str(key[0]) if key[0] == key[1] else f"{key[0]}-{key[1]}"
    if isinstance(key, tuple):
        return " . ".join(format_key(part) for part in key)
    return str(key)


def format_value(value: Any) -> str:
    if isinstance(value, tuple) and len(value) == 2 and value[0] in ("jump", "goto"):
        return f"{value[0]} {value[1]}"
    return str(value)


def _diff_addresses(desired: Desired, observed: Observed, changes: list[Change]) -> None:
    present = {a.ident: a for a in observed.addresses}
    wanted = {a.ident: a for a in desired.addresses}
    for ident, addr in sorted(wanted.items()):
        have = present.get(ident)
        if have is None:
            changes.append(Change(CREATE, "address", ident, after=addr, pointer=addr.pointer))
        elif ident in observed.owned_addresses and have.label != addr.label:
            changes.append(Change(REPLACE, "address", ident, have, addr, reason="label", pointer=addr.pointer))
        # A foreign address equal to a wanted one already does the job; kdsr
        # leaves it alone and never claims it (destroy will not remove it).
    for ident in sorted(observed.owned_addresses):
        if ident not in wanted and ident in present:
            changes.append(Change(DELETE, "address", ident, before=present[ident]))
    for ident in sorted(observed.address_records - set(present) - set(wanted)):
        # Recorded as ours but already gone: drop the record, or a later
        # address someone else adds with the same value would be taken for ours.
        ifname, cidr = ident.split(" ", 1)
        changes.append(Change(DELETE, "address", ident, before=Address(ifname, cidr), reason="forget"))


def _diff_sysctls(desired: Desired, observed: Observed, changes: list[Change]) -> None:
    current = {s.key: s for s in observed.sysctls}
    previous = dict(observed.sysctl_previous)
    written = dict(observed.sysctl_written)
    wanted = {s.key: s for s in desired.sysctls}
    for key, want in sorted(wanted.items()):
        have = current.get(key)
        if not want.satisfied_by(have.value if have else None):
            changes.append(Change(UPDATE, "sysctl", want.dotted, have, want, pointer=want.pointer))
    for key, value in sorted(previous.items()):
        if key in wanted:
            continue
        have = current.get(key)
        restore = Sysctl(key=key, value=value)
        ours = have is not None and written.get(key, have.value) == have.value
        if ours and have.value != value:
            changes.append(Change(DELETE, "sysctl", restore.dotted, have, restore, reason="restore"))
        else:
            # Already back at the recorded value, changed by someone after
            # kdsr (theirs stays), or the key is gone with its interface:
            # only the record goes.
            changes.append(Change(DELETE, "sysctl", restore.dotted, have, restore, reason="forget"))


def diff(desired: Desired, observed: Observed) -> Plan:
    changes: list[Change] = []
    tables: list[TableDiff] = []
    observed_tables = {t.ident: t for t in observed.tables}
    for table in desired.tables:
        td = diff_table(table, observed_tables.pop(table.ident, None), changes)
        tables.append(td)
    for table in observed_tables.values():
        tables.append(diff_table(None, table, changes))
    _diff_addresses(desired, observed, changes)
    _diff_sysctls(desired, observed, changes)
    _diff_links(desired, observed, changes)
    _diff_keyed(desired.routes, observed.routes, "route", changes)
    _diff_keyed(desired.rules, observed.rules, "rule", changes)
    _diff_ipvs(desired, observed, changes)
    _follow_replaced_links(desired, observed, changes)
    _resend_link_elements(tables, changes)
    _diff_bird(desired, observed, changes)
    _diff_announce(desired, observed, changes)
    _diff_xdp(desired, observed, changes)
    _diff_keepalived(desired, observed, changes)
    _diff_gates(desired, observed, changes)
    plan = Plan(node=desired.node, role=desired.role, changes=changes, tables=[t for t in tables if not t.empty])
    if any(c.kind.startswith("ipvs ") for c in changes):
        # Every ident the plan may touch is desired or observed.
        plan.ipvs_seen = {s.ident: None for s in desired.ipvs} | {s.ident: s for s in observed.ipvs}
    return plan


def _link_replace_reason(old: Link, new: Link) -> str:
    for name in ("kind", "local", "remote", "ttl"):
        if getattr(old, name) != getattr(new, name):
            return f"{name} {getattr(old, name) or 'any'} -> {getattr(new, name) or 'any'}"
    return ""


def _diff_links(desired: Desired, observed: Observed, changes: list[Change]) -> None:
    present = {link.name: link for link in observed.links}
    wanted = {link.name: link for link in desired.links}
    for name, link in sorted(wanted.items()):
        have = present.get(name)
        if have is None:
            changes.append(Change(CREATE, "link", name, after=link, pointer=link.pointer))
        elif reason := _link_replace_reason(have, link):
            changes.append(Change(REPLACE, "link", name, have, link, reason=reason, pointer=link.pointer))
    for name, have in sorted(present.items()):
        # A kdsr-named link kdsr did not create is not deleted here; plan
        # refuses to adopt it (operations.check_foreign).
        if name not in wanted and name not in observed.foreign_links:
            changes.append(Change(DELETE, "link", name, before=have))


def _diff_keyed(
    wanted_items: tuple,
    present_items: tuple,
    kind: str,
    changes: list[Change],
    changed: Callable[[Any, Any], tuple[str, str] | None] = lambda _have, _want: None,
    gone: Callable[[str], str] = lambda _ident: "",
) -> None:
    """Objects kdsr keys by ``ident``: created when missing, deleted (for
    the reason ``gone`` of the ident gives) when not wanted.  One that is
    there but differs gets the action and reason ``changed`` (have, want)
    gives; by default none (routes, rules: the identity is the whole
    configuration, never changed)."""
    present = {x.ident: x for x in present_items}
    wanted = {x.ident: x for x in wanted_items}
    for ident, item in sorted(wanted.items()):
        have = present.get(ident)
        if have is None:
            changes.append(Change(CREATE, kind, ident, after=item, pointer=item.pointer))
        elif (change := changed(have, item)) is not None:
            action, reason = change
            changes.append(Change(action, kind, ident, have, item, reason=reason, pointer=item.pointer))
    for ident, item in sorted(present.items()):
        if ident not in wanted:
            changes.append(Change(DELETE, kind, ident, before=item, reason=gone(ident)))


def reorder_from(observed: IpvsService, desired: IpvsService) -> int:
    """How many destinations at the head of the desired list must be (re)added
    so that the kernel's list ends up in the desired order.

    The kernel adds at the head, so the tail of the desired list that the
    kernel already holds, in order, at its own tail can stay; everything
    before it is deleted (if present) and added back in reverse order.
    """
    want = [d.ident for d in desired.dests]
    have = [d.ident for d in observed.dests if d.ident in set(want)]
    keep = 0
    while keep < len(want) and keep < len(have) and want[-1 - keep] == have[-1 - keep]:
        keep += 1
    # Destinations the kernel has but the intent dropped sit somewhere in the
    # list; deleting them does not change the relative order of the rest.
    return len(want) - keep


def _diff_ipvs(desired: Desired, observed: Observed, changes: list[Change]) -> None:
    present = {svc.ident: svc for svc in observed.ipvs}
    wanted = {svc.ident: svc for svc in desired.ipvs}
    for ident, svc in sorted(wanted.items()):
        have = present.get(ident)
        if have is None:
            changes.append(Change(CREATE, "ipvs service", ident, after=svc, pointer=svc.pointer))
            for dest in reversed(svc.dests):
                changes.append(
                    Change(CREATE, "ipvs dest", f"{ident} -> {dest.ident}", after=(svc, dest), pointer=svc.pointer)
                )
            continue
        if have == svc:
            continue  # compile and the reader share destination objects: mostly identity checks
        if have.config() != svc.config():
            # scheduler and flags change in place (ipvsadm -E): the
            # connection table survives.
            changes.append(
                Change(UPDATE, "ipvs service", ident, have, svc, reason="scheduler/flags", pointer=svc.pointer)
            )
        old_dests = {d.ident: d for d in have.dests}
        new_idents = {d.ident for d in svc.dests}
        for dest in have.dests:
            if dest.ident not in new_idents:
                changes.append(Change(DELETE, "ipvs dest", f"{ident} -> {dest.ident}", before=(have, dest)))
        readd = reorder_from(have, svc)
        for index, dest in enumerate(svc.dests):
            did = f"{ident} -> {dest.ident}"
            old = old_dests.get(dest.ident)
            if old is not None and index < readd:
                changes.append(
                    Change(
                        REPLACE,
                        "ipvs dest",
                        did,
                        (have, old),
                        (svc, dest),
                        reason="canonical order",
                        pointer=svc.pointer,
                    )
                )
            elif old is None:
                changes.append(Change(CREATE, "ipvs dest", did, after=(svc, dest), pointer=svc.pointer))
            elif old != dest:
                reason = "forwarding method" if (old.method, old.tun_type) != (dest.method, dest.tun_type) else "weight"
                changes.append(
                    Change(UPDATE, "ipvs dest", did, (have, old), (svc, dest), reason=reason, pointer=svc.pointer)
                )
    for ident, have in sorted(present.items()):
        if ident not in wanted and ident not in observed.foreign_ipvs:
            changes.append(Change(DELETE, "ipvs service", ident, before=have))


def _follow_replaced_links(desired: Desired, observed: Observed, changes: list[Change]) -> None:
    """A replaced link takes its routes and per-link sysctls with it: put them back."""
    replaced = {c.ident for c in changes if c.kind == "link" and c.action == REPLACE}
    if not replaced:
        return
    planned = {(c.kind, c.ident) for c in changes}
    present_routes = {r.ident for r in observed.routes}
    for route in desired.routes:
        if route.dev in replaced and route.ident in present_routes and ("route", route.ident) not in planned:
            reason = f"link {route.dev} is replaced"
            changes.append(Change(REPLACE, "route", route.ident, route, route, reason=reason, pointer=route.pointer))
    current = {s.key: s for s in observed.sysctls}
    for sysctl in desired.sysctls:
        parts = sysctl.key.split("/")
        if len(parts) > 3 and parts[3] in replaced and ("sysctl", sysctl.dotted) not in planned:
            changes.append(
                Change(UPDATE, "sysctl", sysctl.dotted, current.get(sysctl.key), sysctl, pointer=sysctl.pointer)
            )


def _resend_link_elements(tables: list[TableDiff], changes: list[Change]) -> None:
    """nft holds a link named in an ``iface_index`` map by its index, which a
    replaced link does not keep: send such an element again (delete + add in
    the same transaction), though it reads back unchanged."""
    replaced = {c.ident for c in changes if c.kind == "link" and c.action == REPLACE}
    if not replaced:
        return
    for td in tables:
        if td.desired is None or td.observed is None:
            continue  # a new table sends every element anyway
        present = {m.name: m for m in td.observed.maps}
        for nmap in td.desired.maps:
            old = present.get(nmap.name)
            if nmap.data_type != "iface_index" or old is None or _map_replace_reason(old, nmap):
                continue
            sent = set(td.elements_add.get(nmap.name, ()))
            before = old.element_dict()
            for key, elem in nmap.elements:
                if elem.value not in replaced or before.get(key) != elem or (key, elem) in sent:
                    continue
                td.elements_delete.setdefault(nmap.name, []).append(key)
                td.elements_add.setdefault(nmap.name, []).append((key, elem))
                eid = f"{td.family} {td.name}/{nmap.name}[{format_key(key)}]"
                reason = f"link {elem.value} is replaced"
                changes.append(Change(UPDATE, "nft element", eid, elem, elem, reason=reason, pointer=elem.comment))


def _diff_bird(desired: Desired, observed: Observed, changes: list[Change]) -> None:
    """Routes and sessions as the user thinks of them, then the one file
    write that carries them all ("bird config"; apply.py runs only that)."""
    want, have = desired.bird, observed.bird
    if want is None:
        if have is None or not (have.routes or have.sessions or have.router_id):
            return
        want = empty_config(have.config, have.fragment, have.socket)
    before_routes = have.routes if have else ()
    before_sessions = have.sessions if have else ()
    for kind, wanted, present in (
        ("bgp route", want.routes, before_routes),
        ("bgp session", want.sessions, before_sessions),
    ):
        wanted_by = {x.ident: x for x in wanted}
        present_by = {x.ident: x for x in present}
        for ident, item in wanted_by.items():
            old = present_by.get(ident)
            if old is None:
                changes.append(Change(CREATE, kind, ident, None, item, pointer=item.pointer))
            elif old != item:
                fields = [f for f in item.__dataclass_fields__ if getattr(old, f) != getattr(item, f)]
                changes.append(Change(UPDATE, kind, ident, old, item, reason=",".join(fields), pointer=item.pointer))
        for ident, item in present_by.items():
            if ident not in wanted_by:
                changes.append(Change(DELETE, kind, ident, item, None))
    old_id = have.router_id if have else None
    if want.router_id and old_id and want.router_id != old_id:
        changes.append(Change(UPDATE, "bgp router id", want.router_id, old_id, want.router_id))
    if have is None or have.text != want.text:
        edited = have is not None and parse_model(have.text, have.config, have.fragment, have.socket) is not None
        reason = "not what kdsr writes" if edited and not any(c.kind.startswith("bgp ") for c in changes) else ""
        action = CREATE if have is None else UPDATE
        changes.append(Change(action, "bird config", want.fragment, have, want, reason=reason))


def _diff_keepalived(desired: Desired, observed: Observed, changes: list[Change]) -> None:
    """VRRP instances as the user thinks of them, then the one file write
    (or removal) that carries them all ("keepalived config")."""
    want, have = desired.keepalived, observed.keepalived
    if want is None and have is None:
        return
    wanted_by = {i.ident: i for i in (want.instances if want else ())}
    present_by = {i.ident: i for i in (have.instances if have else ())}
    instance_changes = []
    for ident, item in wanted_by.items():
        old = present_by.get(ident)
        if old is None:
            instance_changes.append(Change(CREATE, "vrrp instance", ident, None, item, pointer=item.pointer))
        elif old != item:
            fields = [f for f in item.__dataclass_fields__ if getattr(old, f) != getattr(item, f)]
            instance_changes.append(
                Change(UPDATE, "vrrp instance", ident, old, item, reason=",".join(fields), pointer=item.pointer)
            )
    for ident, item in present_by.items():
        if ident not in wanted_by:
            instance_changes.append(Change(DELETE, "vrrp instance", ident, item, None))
    changes.extend(instance_changes)
    if want is None:
        changes.append(Change(DELETE, "keepalived config", have.fragment, have, None))
    elif have is None or have.text != want.text:
        edited = have is not None and not instance_changes
        reason = "not what kdsr writes" if edited else ""
        changes.append(
            Change(CREATE if have is None else UPDATE, "keepalived config", want.fragment, have, want, reason=reason)
        )


def _diff_gates(desired: Desired, observed: Observed, changes: list[Change]) -> None:
    """kdsr's track files: keepalived may own a VIP while its gate holds 0.
    A close carries why the VIP is given up (health), if that is why."""
    why = dict(desired.keepalived.withdrawn) if desired.keepalived else {}

    def changed(have: VrrpGate, gate: VrrpGate) -> tuple[str, str] | None:
        if have.open == gate.open:
            return None
        return UPDATE, "" if gate.open else why.get(gate.vip.split("/")[0], "")

    _diff_keyed(desired.gates, observed.gates, "vrrp gate", changes, changed)


def _diff_announce(desired: Desired, observed: Observed, changes: list[Change]) -> None:
    """kdsr's announce table: BIRD announces a VIP while its route is there.
    A delete carries why the VIP is withdrawn (health), if that is why."""
    why = dict(desired.bird.withdrawn) if desired.bird else {}

    def changed(have: AnnounceRoute, route: AnnounceRoute) -> tuple[str, str] | None:
        return None if have == route else (REPLACE, f"type {have.kind} -> {route.kind}")

    _diff_keyed(desired.announce, observed.announce, "announce route", changes, changed, lambda i: why.get(i, ""))


def _diff_xdp(desired: Desired, observed: Observed, changes: list[Change]) -> None:
    """kdsr's XDP program (xdp engine) and the elements of its maps.

    The program on an interface is created or deleted whole (deleting it
    frees its maps); inside, each service, selector (Maglev table) and
    server is an element, created, updated or deleted on its own."""
    want, have = desired.xdp, observed.xdp
    if want is None and have is None:
        return
    if want is None:
        changes.append(Change(DELETE, "xdp program", have.interface, before=have))
        return
    if have is not None and have.interface == want.interface and have.stale:
        # A new program starts with empty maps: every element is written again.
        reason = "program object (build/kdsr_xdp.o)"
        changes.append(Change(REPLACE, "xdp program", want.interface, have, want, reason=reason, pointer=want.pointer))
        have = type(want)(interface=want.interface, config_mac="")
    elif have is None or have.interface != want.interface:
        if have is not None:
            changes.append(Change(DELETE, "xdp program", have.interface, before=have))
        changes.append(Change(CREATE, "xdp program", want.interface, after=want, pointer=want.pointer))
        have = type(want)(interface=want.interface, config_mac="")
    elif not have.config_mac or (have.source4, have.source6) != (want.source4, want.source6):
        reason = "interface MAC" if not have.config_mac else "tunnel source"
        changes.append(Change(UPDATE, "xdp config", want.interface, have, want, reason=reason, pointer=want.pointer))
    for kind, wanted_items, present_items in (
        ("xdp server", want.servers, have.servers),
        ("xdp selector", want.selectors, have.selectors),
        ("xdp service", want.services, have.services),
    ):
        if wanted_items is present_items or (
            len(wanted_items) == len(present_items)
            and all(a is b for a, b in zip(wanted_items, present_items, strict=True))
        ):
            continue  # the read hands back compile's own objects (XdpBackend.adopt): equal
        present = {item.ident: item for item in present_items}
        for item in wanted_items:
            old = present.pop(item.ident, None)
            if old is None:
                changes.append(Change(CREATE, kind, item.ident, after=item, pointer=item.pointer))
            elif old is not item and old != item:
                changes.append(Change(UPDATE, kind, item.ident, old, item, pointer=item.pointer))
        for item in present.values():
            changes.append(Change(DELETE, kind, item.ident, before=item))
