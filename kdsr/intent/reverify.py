"""The cross-object rules again after an edit, on the part an edit can reach.

verify (kdsr/intent/verify.py) reads the whole document: on a large intent
that is most of what was left of a reload's time after the schema and the
build were made per entry (kdsr/intent/reload.py).  But the last
document had no problem, so every problem of the new one involves an entry
the edit changed, and each rule pairs an entry with only a few others:

- a service with its pool (families, L2 reach, L3, table size, ipvs, a
  pool monitor's first service) and with the services on its VIP (ports,
  BGP announcements);
- a VIP with every member address (no VIP may be someone's address);
- a server with every other server through its tunnel or probe mark (a
  23-bit digest: two addresses may collide).

So verify runs on a document cut down to the changed entries and those
partners: the changed services and pools, every service on a changed pool
(or on the pool a changed service left), every service on a changed
service's VIP, and the pools those services use.  The two global rules use
indexes of the last document, kept from reload to reload: a changed VIP that
is a member address anywhere, or a changed member address that is a VIP
anywhere, is a problem for sure; a mark already taken by another server is
one too.  In each of those cases, and whenever the cut-down document shows
any problem, the whole document is verified again, so the problems reported
are exactly verify's.  An edit of anything but services and pools (nodes,
load balancers, BGP) verifies the whole document.

tests/test_intent_reverify.py checks chains of random edits against cold loads.

Why kept: verify on the whole document is most of a whole reload's time and
by itself over the daemon's budget for an edit on a large intent
(docs/performance.md; bench/reload_parts.py, variant "whole verify").
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from kdsr.errors import Problem
from kdsr.intent import values
from kdsr.intent import verify as rules
from kdsr.intent.model import IPAddress

# A mark's owner, as check_tunnel_names tells them apart: (address, what).
Owner = tuple[str, str]


@dataclass
class Indexes:
    """Of one valid document: who uses each VIP and pool, the member
    addresses, and the marks (every (address, what) it ever held: a
    superset, so that a stale entry costs at most a full verify)."""

    by_vip: dict[IPAddress, set[str]] = field(default_factory=dict)
    by_pool: dict[str, set[str]] = field(default_factory=dict)
    pool_addresses: dict[str, tuple[IPAddress, ...]] = field(default_factory=dict)
    member_addresses: Counter = field(default_factory=Counter)
    marks: dict[int, set[Owner]] = field(default_factory=dict)

    @classmethod
    def of(cls, doc: dict) -> Indexes:
        index = cls()
        servers = doc.get("servers", {})
        for name, service in doc["services"].items():
            index._add_service(name, service)
        for name, pool in doc["pools"].items():
            index._add_pool(name, pool, servers)
        seen: set[tuple[str, str]] = set()  # (mode, pool): the services on a pool share its marks
        for service in doc["services"].values():
            kind = (values.service_mode(service), service["pool"])
            if kind not in seen:
                seen.add(kind)
                index._add_marks(_marks(service, doc["pools"], servers))
        return index

    def _add_service(self, name: str, service: dict) -> None:
        vip = _vip(service)
        if vip is not None:
            self.by_vip.setdefault(vip, set()).add(name)
        self.by_pool.setdefault(service["pool"], set()).add(name)

    def _drop_service(self, name: str, service: dict) -> None:
        vip = _vip(service)
        if vip is not None:
            self.by_vip[vip].discard(name)
        self.by_pool[service["pool"]].discard(name)

    def _add_pool(self, name: str, pool: dict, servers: dict) -> None:
        addresses = _member_addresses(pool, servers)
        self.pool_addresses[name] = addresses
        self.member_addresses.update(addresses)

    def _drop_pool(self, name: str) -> None:
        self.member_addresses.subtract(self.pool_addresses.pop(name))

    def _add_marks(self, marks: dict[int, Owner]) -> None:
        for mark, owner in marks.items():
            self.marks.setdefault(mark, set()).add(owner)


@dataclass
class Edit:
    """What changed between the last valid document and this one."""

    old: dict
    new: dict
    services: frozenset[str]  # changed, added or removed
    pools: frozenset[str]

    def new_services(self) -> list[str]:
        return [name for name in self.services if name in self.new["services"]]

    def new_pools(self) -> list[str]:
        return [name for name in self.pools if name in self.new["pools"]]


def verify_edit(edit: Edit, index: Indexes, source: str) -> tuple[list[Problem], list[tuple[int, Owner]] | None]:
    """verify's problems of ``edit.new``, and the marks its changed part adds
    (for ``apply``, once the document is accepted); None instead of the marks
    when the whole document was verified: the next reload then builds the
    index again (which also drops the stale marks that may have led here)."""
    doc, servers = edit.new, edit.new.get("servers", {})
    services, pools = doc["services"], doc["pools"]
    if _surely_wrong(edit, index) or _touches_vrrp(edit):
        return rules.verify(doc, source), None
    # Changed pools (removed ones too: their services now name no pool) and
    # the pools a changed service joined or left: every service on them.
    touched_pools = set(edit.pools)
    for name in edit.services:
        for side in (edit.old, edit.new):
            if name in side["services"]:
                touched_pools.add(side["services"][name]["pool"])
    keep = set(edit.new_services())
    for pool in touched_pools:
        keep |= _on_pool(edit, index, pool)
    for name in edit.new_services():
        vip = _vip(services[name])
        if vip is not None:
            keep |= _on_vip(edit, index, vip)
    keep_pools = {pool for pool in touched_pools if pool in pools}
    keep_pools |= {services[name]["pool"] for name in keep if services[name]["pool"] in pools}
    marks = {}
    for name in keep:
        marks.update(_marks(services[name], pools, servers))
    if any(owner != other for mark, owner in marks.items() for other in index.marks.get(mark, ())):
        return rules.verify(doc, source), None
    part = {
        **doc,
        "services": {name: entry for name, entry in services.items() if name in keep},
        "pools": {name: entry for name, entry in pools.items() if name in keep_pools},
    }
    if rules.verify(part, source):
        return rules.verify(doc, source), None  # the whole document's problems, in verify's words
    return [], list(marks.items())


def _touches_vrrp(edit: Edit) -> bool:
    """A VRRP VIP's virtual router ID pairs it with every other VRRP VIP
    (kdsr/intent/vrrp_rules.py), not only with its pool and VIP partners."""
    for name in edit.services:
        for side in (edit.old, edit.new):
            announce = side["services"].get(name, {}).get("announce")
            if isinstance(announce, dict) and announce.get("mode") == "vrrp":
                return True
    return False


def apply(edit: Edit, index: Indexes, marks: list[tuple[int, Owner]]) -> Indexes:
    """``index`` (of ``edit.old``) made the index of ``edit.new``, in place."""
    servers = edit.new.get("servers", {})
    for name in edit.services:
        if name in edit.old["services"]:
            index._drop_service(name, edit.old["services"][name])
    for name in edit.new_services():
        index._add_service(name, edit.new["services"][name])
    for name in edit.pools:
        if name in edit.old["pools"]:
            index._drop_pool(name)
    for name in edit.new_pools():
        index._add_pool(name, edit.new["pools"][name], servers)
    index._add_marks(dict(marks))
    return index


# --- the new document's view of the last one's indexes --------------------------


def _on_pool(edit: Edit, index: Indexes, pool: str) -> set[str]:
    services = edit.new["services"]
    return (index.by_pool.get(pool, set()) - edit.services) | {
        name for name in edit.new_services() if services[name]["pool"] == pool
    }


def _on_vip(edit: Edit, index: Indexes, vip: IPAddress) -> set[str]:
    services = edit.new["services"]
    return (index.by_vip.get(vip, set()) - edit.services) | {
        name for name in edit.new_services() if _vip(services[name]) == vip
    }


def _surely_wrong(edit: Edit, index: Indexes) -> bool:
    """A changed VIP that is a member address, or a changed member address
    that is a VIP: check_vip_owners reports it, whoever holds it."""
    servers = edit.new.get("servers", {})
    changed = Counter()
    for name in edit.pools:
        changed.subtract(index.pool_addresses.get(name, ()))
    new_addresses: set[IPAddress] = set()
    for name in edit.new_pools():
        addresses = _member_addresses(edit.new["pools"][name], servers)
        changed.update(addresses)
        new_addresses.update(addresses)
    for name in edit.new_services():
        vip = _vip(edit.new["services"][name])
        if vip is not None and index.member_addresses[vip] + changed[vip] > 0:
            return True
    return any(_on_vip(edit, index, address) for address in new_addresses)


# --- per entry ------------------------------------------------------------------


def _vip(service: dict) -> IPAddress | None:
    try:
        return values.parse_address(service["vip"])
    except ValueError:
        return None  # a problem verify reports (the entry is in the cut-down document)


def _member_addresses(pool: dict, servers: dict) -> tuple[IPAddress, ...]:
    found = []
    for member in pool["servers"]:
        resolved = values.member_address(member, servers)
        if resolved is None:
            continue
        try:
            found.append(values.parse_address(resolved[0]))
        except ValueError:
            continue
    return tuple(found)


def _marks(service: dict, pools: dict, servers: dict) -> dict[int, Owner]:
    """The marks check_tunnel_names gives the service's members."""
    mode = values.service_mode(service)
    pool = pools.get(service["pool"])
    if pool is None or not rules.marks_members(mode, pool):
        return {}
    marks = {}
    for address in map(str, _member_addresses(pool, servers)):
        mark, what = rules.member_mark(mode, address)
        marks[mark] = (address, what)
    return marks
