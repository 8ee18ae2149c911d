"""The apply steps for IPVS (kdsr/kernel/ipvs.py): services and their
destination lists, a handful of ``ipvsadm -R`` batches however many
services change, and what the read-back lists again afterwards.

IPVS has no transactions: each batch records how to take itself back, from
a fresh listing when it failed part-way (kdsr/apply.py's journal runs the
undo when a later step fails).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from functools import partial

from kdsr.diff import CREATE, DELETE, UPDATE, Plan, reorder_from
from kdsr.faults import crash_point
from kdsr.kernel import IpvsBackend, KernelError, ipvsadm
from kdsr.kernel.ipvsadm import IpvsCommand
from kdsr.kernel.state import NodeState
from kdsr.model import IpvsService
from kdsr.step import Phase, Step


def steps(plan: Plan, ipvs: IpvsBackend, state: NodeState, save: Callable[[], None]) -> list[tuple[Phase, Step]]:
    """At most four steps, each ONE ipvsadm batch (``IpvsBackend.batch``), so
    10,000 services cost a handful of processes, not one per write:

    1. new services with their destination lists (``-A``, then ``-a``
       last-first: the kernel adds at the head, and the order decides the
       mh table);
    2. edited services (``-E``);
    3. the destination lists of the other touched services, each brought
       to the desired one (see ``converge_commands``);
    4. deleted services last.

    The kernel is not listed again: the steps start from what the plan was
    made from (``Plan.ipvs_seen``), and list it only after a batch failed.
    Batches are not transactional, so a step whose batch fails puts back,
    from a fresh listing, what it had found; its undo (a later step failed)
    does the same: every destination list is exactly the old one again,
    order included, so the mh table is too.
    """
    listing = ipvsadm.Listing(ipvs.list_all, seen=plan.ipvs_seen)
    services = plan.of_kind("ipvs service")
    created = [c.after for c in services if c.action == CREATE]
    edited = [(c.before, c.after) for c in services if c.action == UPDATE]
    deleted = [c.before for c in services if c.action == DELETE]
    new_idents = {s.ident for s in created}

    out: list[Step] = []
    if created:
        out.append(_create_services_step(ipvs, state, save, listing, created))
    if edited:
        out.append(_edit_services_step(ipvs, listing, edited))
    targets = [t for t in _dest_targets(plan) if t.ident not in new_idents]
    if targets:
        out.append(_sync_dests_step(ipvs, targets, listing))
    if deleted:
        out.append(_delete_services_step(ipvs, state, save, listing, deleted))
    return [(Phase.IPVS, step) for step in out]


def _dest_targets(plan: Plan) -> list[IpvsService]:
    """Each service whose destinations or settings change, with the list it must end with."""
    touched: dict[str, IpvsService | None] = {}
    for change in plan.of_kind("ipvs dest"):
        if change.after is not None:
            touched[change.after[0].ident] = change.after[0]
        else:
            touched.setdefault(change.before[0].ident, None)
    for change in plan.of_kind("ipvs service"):
        if change.action in (CREATE, UPDATE):
            touched.setdefault(change.ident, change.after)
    desired_by_ident = {c.after.ident: c.after for c in plan.of_kind("ipvs service") if c.after is not None}
    targets = []
    for ident in sorted(touched):
        target = touched[ident] or desired_by_ident.get(ident)
        if target is None:
            # Only destinations were dropped: the target is the kernel's list without them.
            dropped = {c.before[1].ident for c in plan.of_kind("ipvs dest") if c.before and c.before[0].ident == ident}
            have = next(c.before[0] for c in plan.of_kind("ipvs dest") if c.before and c.before[0].ident == ident)
            target = dataclasses.replace(have, dests=tuple(d for d in have.dests if d.ident not in dropped))
        targets.append(target)
    return targets


def _names(services: list[IpvsService]) -> str:
    shown = ", ".join(s.ident for s in services[:3])
    return shown + (f" and {len(services) - 3} more" if len(services) > 3 else "")


def _send(ipvs: IpvsBackend, listing, commands: list, results: dict[str, IpvsService | None]) -> None:
    """One batch; the listing learns what it made, or forgets all when it failed."""
    if not commands:
        return
    crash_point(f"before an ipvsadm batch of {len(commands)} commands")
    try:
        ipvs.batch(commands)
    except Exception:
        listing.forget()
        raise
    for ident, service in results.items():
        listing.put(ident, service)


def _create_commands(services: list[IpvsService]) -> list:
    commands = []
    for svc in services:
        commands.append(IpvsCommand("-A", svc))
        commands.extend(IpvsCommand("-a", svc, d) for d in reversed(svc.dests))
    return commands


def _create_services_step(ipvs: IpvsBackend, state: NodeState, save, listing, created: list[IpvsService]) -> Step:
    def delete_what_landed() -> None:
        # Which lines of a failed batch ran is unknown: list, delete ours that exist.
        there = [s for s in created if listing.get(s.ident) is not None]
        _send(ipvs, listing, [IpvsCommand("-D", s) for s in there], {s.ident: None for s in there})

    def run() -> None:
        state.ipvs.update(s.ident for s in created)
        save()
        try:
            _send(ipvs, listing, _create_commands(created), {s.ident: s for s in created})
        except Exception:
            delete_what_landed()  # the journal drops the ownership records again
            raise

    def undo() -> None:
        _send(ipvs, listing, [IpvsCommand("-D", s) for s in created], {s.ident: None for s in created})

    if len(created) == 1:
        svc = created[0]
        what = (
            f"add IPVS service {svc.ident} ({svc.scheduler} {','.join(svc.flags)}) with {len(svc.dests)} destinations"
        )
    else:
        what = f"add {len(created)} IPVS services with their destinations ({_names(created)})"
    return Step(what, run, undo)


def _edit_services_step(ipvs: IpvsBackend, listing, edited: list[tuple[IpvsService, IpvsService]]) -> Step:
    def edit(pairs: list[tuple[IpvsService, IpvsService]]) -> None:
        """``-E`` each ``old`` to ``new``'s settings; an edit keeps the destinations."""
        results = {}
        for _old, new in pairs:
            have = listing.get(new.ident)
            if have is not None:
                results[new.ident] = dataclasses.replace(have, scheduler=new.scheduler, flags=new.flags)
        _send(ipvs, listing, [IpvsCommand("-E", new) for _old, new in pairs], results)

    def undo() -> None:
        edit([(new, old) for old, new in edited])

    if len(edited) == 1:
        svc = edited[0][1]
        what = f"edit IPVS service {svc.ident} ({svc.scheduler} {','.join(svc.flags)})"
    else:
        what = f"edit {len(edited)} IPVS services ({_names([new for _old, new in edited])})"
    return Step(what, partial(edit, edited), undo)


def _delete_services_step(ipvs: IpvsBackend, state: NodeState, save, listing, deleted: list[IpvsService]) -> Step:
    def run() -> None:
        _send(ipvs, listing, [IpvsCommand("-D", s) for s in deleted], {s.ident: None for s in deleted})
        crash_point("after the write, before its record is updated")
        state.ipvs.difference_update(s.ident for s in deleted)
        save()

    def undo() -> None:
        # Back with the destination lists they had, in the same order.
        _send(ipvs, listing, _create_commands(deleted), {s.ident: s for s in deleted})

    what = f"delete IPVS service {deleted[0].ident}" if len(deleted) == 1 else None
    return Step(what or f"delete {len(deleted)} IPVS services ({_names(deleted)})", run, undo)


def converge_commands(current: IpvsService, target: IpvsService) -> list:
    """The writes that turn the kernel's destination list ``current`` into
    ``target``, order included: drop what goes, edit weights in place, then
    (re)add the head of the target list last-first, because the kernel adds
    at the head.

    A re-added destination is deleted and added back by two consecutive
    lines; the kernel parks it in its trash meanwhile and takes the same
    object back, so its established connections survive.
    """
    wanted = {d.ident for d in target.dests}
    have = {d.ident: d for d in current.dests}
    commands = [IpvsCommand("-d", target, d) for d in current.dests if d.ident not in wanted]
    readd = reorder_from(current, target)
    commands += [IpvsCommand("-e", target, d) for d in target.dests[readd:] if have[d.ident] != d]
    for dest in reversed(target.dests[:readd]):
        if dest.ident in have:
            commands.append(IpvsCommand("-d", target, have[dest.ident]))
        commands.append(IpvsCommand("-a", target, dest))
    return commands


def _sync_dests_step(ipvs: IpvsBackend, targets: list[IpvsService], listing) -> Step:
    found: dict[str, IpvsService] = {}

    def converge(wanted: dict[str, IpvsService]) -> None:
        """One batch taking each service, as the listing has it, to ``wanted``'s list."""
        commands: list = []
        results: dict[str, IpvsService | None] = {}
        for ident, want in wanted.items():
            now = listing.get(ident)
            if now is None:
                continue  # gone (deleted by someone else): nothing to converge
            commands += converge_commands(now, want)
            results[ident] = dataclasses.replace(now, dests=want.dests)
        _send(ipvs, listing, commands, results)

    def run() -> None:
        for target in targets:
            found[target.ident] = listing.get(target.ident) or dataclasses.replace(target, dests=())
        try:
            converge({t.ident: t for t in targets})
        except Exception as exc:
            # Put these lists back (from a fresh listing) before the journal undoes the rest.
            try:
                converge(found)
            except Exception as again:  # noqa: BLE001 - say both
                raise KernelError(f"{exc}; putting the destination lists back also failed: {again}") from exc
            raise

    def undo() -> None:
        converge(found)

    if len(targets) == 1:
        listing_text = ", ".join(f"{d.ident} w{d.weight}" for d in targets[0].dests)
        what = f"set IPVS destinations of {targets[0].ident} to [{listing_text}]"
    else:
        what = f"set IPVS destinations of {len(targets)} services ({_names(targets)})"
    return Step(what, run, undo)


# What a read-back's IPVS listing costs, in services of a full listing: an
# ``ipvsadm -R`` run of ``-L`` lines costs about as much as listing 64
# services in full, and each service it lists as 4 (ipvsadm 1.31;
# bench/ipvs_control_plane.py measures both ways).
_RUN_COST = 64
_LISTED_COST = 4


def read_back(plan: Plan, ipvs: IpvsBackend) -> tuple[Callable[[], list[IpvsService]] | None, int]:
    """Where the read-back takes the IPVS table from, and how many services
    it lists again; (None, 0): a full listing.

    IPVS has no generation that would prove nothing else changed since the
    plan's read (nftables has, kdsr/kernel/nft_cache.py), so the read-back
    cannot be cheaper by proof.  It can be by scope: the steps wrote only
    the services the plan changes, so those are listed again, each by its
    selector, and the others are taken as the plan's own read found them a
    moment before (``Plan.ipvs_seen``).  A change among 10,000 services then
    lists the 20 it wrote, not 10,000.  What that does not see is another
    program changing a service kdsr did not touch in between; the next plan
    does.  A service expected gone ends an ipvsadm run (``IpvsBackend.list_some``),
    so each costs a run: a plan with many of them, or a small table, is
    listed in full.
    """
    if plan.ipvs_seen is None:
        return None, 0
    touched: dict[str, IpvsService] = {}
    for change in plan.changes:
        if change.kind == "ipvs service":
            touched[change.ident] = change.after or change.before
        elif change.kind == "ipvs dest":
            svc = (change.after or change.before)[0]
            touched.setdefault(svc.ident, svc)
    if not touched:
        return None, 0
    gone = {c.ident for c in plan.of_kind("ipvs service") if c.after is None}
    table = [s for s in plan.ipvs_seen.values() if s is not None]
    cost = (1 + len(gone)) * _RUN_COST + len(touched) * _LISTED_COST
    if cost > len(table):
        return None, 0
    untouched = [s for s in table if s.ident not in touched]
    wanted = [touched[ident] for ident in sorted(touched)]
    return (lambda: untouched + ipvs.list_some(wanted)), len(wanted)
