"""Carry out a Plan: ordered, journaled, rolled back on failure, read back.

Order (deletes mirror creates):
  0. kernel modules      - checked (and loaded) before any write;
  1. links to create     - tunnels first: per-link sysctls and routes need them;
  2. sysctls to set      - before the VIP appears on lo, so the server never
                           answers ARP for it, not even for a moment;
  3. addresses to add;
  4. routes, then rules  - a rule never points at an empty table;
  5. nftables            - one transaction per table, checked (dry run)
                           before anything at all is written;
  6. IPVS services and destinations (canonical order, see below);
  7. IPVS services to delete;
  8. rules, then routes to delete;
  9. addresses to delete;
 10. sysctls to restore  - after the VIP is gone, for the same reason;
 11. links to delete;
 12. BIRD's fragment (kdsr/kernel/bird.py), checked with BIRD's parser
     before any write: last when it only announces, first when the plan
     withdraws a VIP or removes fast path, so routers stop sending first.
VRRP's keepalived fragment and gates follow the same order (kdsr/vrrp_apply.py).
Announce routes (kdsr/compile/bird.py: BIRD announces a VIP while its route
is in kdsr's announce table) are deleted before everything else, so a
withdrawal comes first.  They are added only after the read-back has
verified the rest: a VIP is announced once this boot's fast path for it is
in, and a fragment that only announces is written after them.

nftables is transactional; links, routes, rules, IPVS, addresses and sysctls
are not.  Each completed
step records its inverse in a journal; when a later step fails, the journal
runs backwards and the error says whether the old state is back.  The state
file is saved after every step, so even a SIGKILL leaves a record that the
next plan can converge from.  Afterwards the kernel is read again and
compared with Desired: a mismatch is an error, not a silent success.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

from kdsr import vrrp_apply
from kdsr.bird_text import pointer_at
from kdsr.diff import CREATE, DELETE, REPLACE, UPDATE, Plan, diff, diff_table, reorder_from
from kdsr.errors import ApplyError, KernelFeatureError
from kdsr.faults import crash_point
from kdsr.kernel import Kernel, KernelError
from kdsr.kernel import ipvs as ipvs_cmd
from kdsr.kernel.bird import BirdError
from kdsr.kernel.ipvs import IpvsCommand
from kdsr.kernel.nft_json import batch_for, with_stand_in_links
from kdsr.kernel.observe import keep_unchanged, observe, observe_announcement
from kdsr.kernel.state import NodeState, StateStore
from kdsr.model import Address, AnnounceRoute, BirdConfig, Desired, IpvsService, Link, TableDiff
from kdsr.step import Step


@dataclass
class ApplyResult:
    steps: list[str] = field(default_factory=list)
    writes: int = 0
    # True when the ruleset generation proved the one nft transaction was
    # the only commit since the read: the read-back then takes the map
    # elements as sent, and lists the table's structure only if it changed
    # (SystemKernel.nft_apply).
    proved_by_generation: bool = False
    # IPVS services the read-back listed again by their selectors, the rest
    # being as the plan's read found them (_ipvs_read_back); 0: a full
    # listing, or no IPVS change.
    ipvs_listed_again: int = 0
    # What a person should know about how it went (e.g. BIRD was not running).
    notes: list[str] = field(default_factory=list)


class Journal:
    """Completed steps with the state records as they were before each one.

    Rolling back undoes the kernel side of each step, newest first, and puts
    the records back as they were, so the state file never claims what a
    rolled-back step had added.
    """

    def __init__(self, state: NodeState, store: StateStore) -> None:
        self.state = state
        self.store = store
        self.done: list[tuple[Step, NodeState]] = []

    def run(self, step: Step) -> None:
        crash_point(f"before {step.description}")
        before = copy.deepcopy(self.state)
        try:
            step.run()
        except Exception:
            # The failed step may have recorded what it was about to do.
            self._restore(before)
            raise
        self.done.append((step, before))

    def _restore(self, before: NodeState) -> None:
        self.state.__dict__.update(copy.deepcopy(before).__dict__)
        self.store.save(self.state)

    def roll_back(self) -> list[str]:
        """Undo completed steps, newest first.  Returns the failures."""
        failures = []
        for step, before in reversed(self.done):
            try:
                if step.undo is not None:
                    step.undo()
                self._restore(before)
            except Exception as exc:  # noqa: BLE001 - report every failed undo, keep undoing
                failures.append(f"undo of '{step.description}' failed: {exc}")
        self.done.clear()
        return failures


def _steps(
    plan: Plan, kernel: Kernel, store: StateStore, state: NodeState, notes: list[str]
) -> tuple[list[Step], list[Step]]:
    """One Step per kernel write: those to run, then those that announce,
    which run only once the kernel has been read back after the first.

    Ownership is recorded *before* a write that creates something and dropped
    *after* a write that removes it, so a crash at any point leaves a state
    file that claims too much rather than too little; diff forgets records of
    things that are not there.
    """
    steps: list[Step] = []

    def save() -> None:
        store.save(state)
        crash_point("after saving the ownership record")

    def set_sysctl(key: str, value: str, previous: str | None) -> Step:
        def run() -> None:
            if previous is not None:
                state.sysctl_previous.setdefault(key, previous)
            state.sysctl_written[key] = value
            save()
            kernel.sysctl_write(key, value)

        def undo() -> None:
            if previous is not None:
                kernel.sysctl_write(key, previous)

        return Step(f"set sysctl {key.replace('/', '.')}={value}", run, undo)

    def restore_sysctl(key: str, value: str, current: str | None, write: bool) -> Step:
        def run() -> None:
            if write:
                kernel.sysctl_write(key, value)
                crash_point("after the write, before its record is updated")
            state.sysctl_previous.pop(key, None)
            state.sysctl_written.pop(key, None)
            save()

        def undo() -> None:
            if write and current is not None:
                kernel.sysctl_write(key, current)

        verb = "restore" if write else "forget"
        return Step(f"{verb} sysctl {key.replace('/', '.')}={value}", run, undo)

    def add_addresses(addrs: list[Address]) -> Step:
        """Addresses as ONE step: one ownership record, saved before the
        first write (a crash part-way leaves it claiming too much, as for
        any create), then the addresses, many to a kernel call.  One step
        per address cost the journal a copy of the state and the store a
        saved file for each: quadratic in time and memory (an ipvs director
        has one VIP address per service).  A failure part-way takes back
        what this step added before it re-raises; the journal puts the
        record back."""
        added: list[Address] = []

        def undo() -> None:
            _take_back(kernel, True, added)

        def run() -> None:
            state.owned_addresses.update(a.ident for a in addrs)
            save()
            _in_batches(kernel, True, addrs, added, undo)

        return Step(_addresses("add", "to", addrs), run, undo)

    def delete_addresses(addrs: list[Address], write: bool = True) -> Step:
        """Addresses as ONE step (see ``add_addresses``): each deleted, then
        their records dropped in one save."""
        removed: list[Address] = []

        def undo() -> None:
            _take_back(kernel, False, removed)

        def run() -> None:
            if write:
                _in_batches(kernel, False, addrs, removed, undo)
                crash_point("after the write, before its record is updated")
            state.owned_addresses.difference_update(a.ident for a in addrs)
            save()

        verb = "delete" if write else "forget"
        return Step(_addresses(verb, "on", addrs), run, undo)

    for change in plan.of_kind("link"):
        if change.action == REPLACE:
            steps.append(_delete_link(kernel, state, save, change.before))
        if change.action in (CREATE, REPLACE):
            steps.append(_add_link(kernel, state, save, change.after))
    for change in plan.of_kind("sysctl"):
        if change.action == UPDATE:
            previous = change.before.value if change.before is not None else None
            steps.append(set_sysctl(change.after.key, change.after.value, previous))
    for change in plan.of_kind("address"):
        if change.action == REPLACE:
            steps += [delete_addresses([change.before]), add_addresses([change.after])]
    created = [c.after for c in plan.of_kind("address") if c.action == CREATE]
    if created:
        steps.append(add_addresses(created))

    # A table whose default route moves to another link: the old route goes
    # first, or the kernel refuses the new one (EEXIST).
    created_tables = {(c.after.family, c.after.table) for c in plan.of_kind("route") if c.action == CREATE}
    moved = [
        c for c in plan.of_kind("route") if c.action == DELETE and (c.before.family, c.before.table) in created_tables
    ]
    for change in moved:
        route = change.before
        steps.append(
            Step(f"delete route {change.ident}", partial(kernel.route_del, route), partial(kernel.route_add, route))
        )
    for kind, add, delete in (
        ("route", kernel.route_add, kernel.route_del),
        ("rule", kernel.rule_add, kernel.rule_del),
    ):
        for change in plan.of_kind(kind):
            if change.action == CREATE:
                steps.append(
                    Step(f"add {kind} {change.ident}", partial(add, change.after), partial(delete, change.after))
                )
            elif change.action == REPLACE:  # its link was replaced, which took it away
                steps.append(Step(f"restore {kind} {change.ident}", partial(add, change.after), None))

    for td in plan.tables:
        commands = batch_for(td)
        inverse = batch_for(diff_table(td.observed, td.desired, []))
        ident = f"{td.family} {td.name}"

        def run(commands=commands, ident=ident, create=td.desired is not None) -> None:
            kernel.nft_apply(commands)
            crash_point("after the write, before its record is updated")
            (state.tables.add if create else state.tables.discard)(ident)
            save()

        def undo(inverse=inverse) -> None:
            kernel.nft_apply(inverse)

        steps.append(Step(f"nftables transaction on table {ident} ({len(commands)} commands)", run, undo))

    steps.extend(_ipvs_steps(plan, kernel, state, save))
    for kind, add, delete in (
        ("rule", kernel.rule_add, kernel.rule_del),
        ("route", kernel.route_add, kernel.route_del),
    ):
        for change in plan.of_kind(kind):
            if change.action == DELETE and change not in moved:
                steps.append(
                    Step(f"delete {kind} {change.ident}", partial(delete, change.before), partial(add, change.before))
                )
    for write in (True, False):
        gone = [c.before for c in plan.of_kind("address") if c.action == DELETE and (c.reason != "forget") == write]
        if gone:
            steps.append(delete_addresses(gone, write))
    for change in plan.of_kind("sysctl"):
        if change.action == DELETE:
            current = change.before.value if change.before is not None else None
            steps.append(restore_sysctl(change.after.key, change.after.value, current, change.reason == "restore"))
    for change in plan.of_kind("link"):
        if change.action == DELETE:
            steps.append(_delete_link(kernel, state, save, change.before))
    # Routers stop sending before the fast path goes, and start only once it
    # is there: withdrawals first, announcements last.
    first: list[Step] = []
    announce: list[Step] = []
    for change in plan.of_kind("announce route"):
        if change.action in (DELETE, REPLACE):
            first.append(_announce_step(kernel, False, change.before, change.reason))
        if change.action in (CREATE, REPLACE):
            announce.append(_announce_step(kernel, True, change.after))
    bird_change = next(iter(plan.of_kind("bird config")), None)
    if bird_change is not None:
        (first if _withdraws(plan) else announce).append(_bird_step(kernel, state, save, bird_change, notes))
    vrrp = vrrp_apply.steps(plan, kernel, state, save, notes)
    return vrrp.first + first + steps, announce + vrrp.last


# A plan that deletes any of these reloads BIRD before its other steps.
WITHDRAW_FIRST = ("bgp route", "nft table", "nft chain", "ipvs service", "address")


def _withdraws(plan: Plan) -> bool:
    return any(c.action == DELETE and c.kind in WITHDRAW_FIRST for c in plan.changes)


def _announce_step(kernel: Kernel, add: bool, route: AnnounceRoute, why: str = "") -> Step:
    if add:
        return Step(
            f"add announce route {route.prefix} (BIRD announces it)",
            partial(kernel.announce_add, route),
            partial(kernel.announce_del, route),
        )
    because = f": {why}" if why else ""
    return Step(
        f"delete announce route {route.prefix} (BIRD withdraws it{because})",
        partial(kernel.announce_del, route),
        partial(kernel.announce_add, route),
    )


def _bird_step(kernel: Kernel, state: NodeState, save: Callable[[], None], change, notes: list[str]) -> Step:
    want: BirdConfig = change.after
    have: BirdConfig | None = change.before
    declares = _declares(want)
    # A fragment that declares nothing (destroy) needs no running BIRD: a
    # stopped BIRD announces nothing, and reads the file when it starts.
    reload = declares or kernel.bird_running(want.socket)

    def run() -> None:
        if declares:
            state.bird_files = [want.config, want.fragment, want.socket]
            save()
        kernel.bird_install(want.config, want.fragment, want.socket, want.text, reload=reload)
        if not reload:
            notes.append(
                f"BIRD was not running (no answer on {want.socket}): {want.fragment} was emptied without a "
                "reload, so BIRD announces nothing of kdsr's when it starts."
            )
        if not declares:
            crash_point("after the write, before its record is updated")
            state.bird_files = []
            save()

    def undo() -> None:
        if have is not None:
            kernel.bird_install(have.config, have.fragment, have.socket, have.text, reload=reload)

    what = f"{len(want.routes)} routes, {len(want.sessions)} sessions" if declares else "empty"
    how = "and reload BIRD" if reload else "(BIRD is not running: no reload)"
    return Step(f"write BIRD fragment {want.fragment} ({what}) {how}", run, undo)


def _declares(config: BirdConfig) -> bool:
    return bool(config.routes or config.sessions or config.router_id)


def _add_link(kernel: Kernel, state: NodeState, save: Callable[[], None], link: Link) -> Step:
    def run() -> None:
        state.links.add(link.name)
        save()
        kernel.link_add(link)

    return Step(
        f"add {link.kind} link {link.name} ({link.local} -> {link.remote or 'any'})",
        run,
        lambda: kernel.link_del(link.name),
    )


# Addresses per kernel call (SystemKernel sends them in one netlink batch,
# not one request and answer at a time: bench/addresses.py measures both).
ADDRESS_BATCH = 256


def _in_batches(kernel: Kernel, add: bool, addrs: list[Address], done: list[Address], undo: Callable[[], None]) -> None:
    """Add (or delete) the addresses in order, noting each that landed in
    ``done``; a failure undoes what was done, then re-raises.  The first
    address goes alone, so a crash after it with the rest still to come
    stays a point the safety lab reaches however few addresses it has."""
    start, size = 0, 1
    while start < len(addrs):
        if done:
            crash_point(f"part-way through the addresses, before {addrs[start].cidr}")
        try:
            kernel.addr_write(add, addrs[start : start + size], done)
        except Exception:
            undo()
            raise
        start, size = start + size, ADDRESS_BATCH


def _take_back(kernel: Kernel, added: bool, done: list[Address]) -> None:
    """Reverse the writes in ``done``, last first; what could not be taken
    back stays in ``done`` and the error goes up (the journal reports it)."""
    undone: list[Address] = []
    try:
        kernel.addr_write(not added, done[::-1], undone)
    finally:
        gone = set(map(id, undone))
        done[:] = [a for a in done if id(a) not in gone]


def _addresses(verb: str, preposition: str, addrs: list[Address]) -> str:
    first = f"{addrs[0].cidr} {preposition} {addrs[0].ifname}"
    if len(addrs) == 1:
        return f"{verb} address {first}"
    return f"{verb} {len(addrs)} addresses ({first} and {len(addrs) - 1} more)"


def _delete_link(kernel: Kernel, state: NodeState, save: Callable[[], None], link: Link) -> Step:
    def run() -> None:
        kernel.link_del(link.name)
        crash_point("after the write, before its record is updated")
        state.links.discard(link.name)
        save()

    return Step(f"delete link {link.name}", run, lambda: kernel.link_add(link))


def _ipvs_steps(plan: Plan, kernel: Kernel, state: NodeState, save: Callable[[], None]) -> list[Step]:
    """At most four steps, each ONE ipvsadm batch (``Kernel.ipvs_batch``), so
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
    listing = ipvs_cmd.Listing(kernel.ipvs_list, seen=plan.ipvs_seen)
    services = plan.of_kind("ipvs service")
    created = [c.after for c in services if c.action == CREATE]
    edited = [(c.before, c.after) for c in services if c.action == UPDATE]
    deleted = [c.before for c in services if c.action == DELETE]
    new_idents = {s.ident for s in created}

    steps: list[Step] = []
    if created:
        steps.append(_create_services_step(kernel, state, save, listing, created))
    if edited:
        steps.append(_edit_services_step(kernel, listing, edited))
    targets = [t for t in _dest_targets(plan) if t.ident not in new_idents]
    if targets:
        steps.append(_sync_dests_step(kernel, targets, listing))
    if deleted:
        steps.append(_delete_services_step(kernel, state, save, listing, deleted))
    return steps


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


def _send(kernel: Kernel, listing, commands: list, results: dict[str, IpvsService | None]) -> None:
    """One batch; the listing learns what it made, or forgets all when it failed."""
    if not commands:
        return
    crash_point(f"before an ipvsadm batch of {len(commands)} commands")
    try:
        kernel.ipvs_batch(commands)
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


def _create_services_step(kernel: Kernel, state: NodeState, save, listing, created: list[IpvsService]) -> Step:
    def delete_what_landed() -> None:
        # Which lines of a failed batch ran is unknown: list, delete ours that exist.
        there = [s for s in created if listing.get(s.ident) is not None]
        _send(kernel, listing, [IpvsCommand("-D", s) for s in there], {s.ident: None for s in there})

    def run() -> None:
        state.ipvs.update(s.ident for s in created)
        save()
        try:
            _send(kernel, listing, _create_commands(created), {s.ident: s for s in created})
        except Exception:
            delete_what_landed()  # the journal drops the ownership records again
            raise

    def undo() -> None:
        _send(kernel, listing, [IpvsCommand("-D", s) for s in created], {s.ident: None for s in created})

    if len(created) == 1:
        svc = created[0]
        what = (
            f"add IPVS service {svc.ident} ({svc.scheduler} {','.join(svc.flags)}) with {len(svc.dests)} destinations"
        )
    else:
        what = f"add {len(created)} IPVS services with their destinations ({_names(created)})"
    return Step(what, run, undo)


def _edit_services_step(kernel: Kernel, listing, edited: list[tuple[IpvsService, IpvsService]]) -> Step:
    def edit(pairs: list[tuple[IpvsService, IpvsService]]) -> None:
        """``-E`` each ``old`` to ``new``'s settings; an edit keeps the destinations."""
        results = {}
        for _old, new in pairs:
            have = listing.get(new.ident)
            if have is not None:
                results[new.ident] = dataclasses.replace(have, scheduler=new.scheduler, flags=new.flags)
        _send(kernel, listing, [IpvsCommand("-E", new) for _old, new in pairs], results)

    def undo() -> None:
        edit([(new, old) for old, new in edited])

    if len(edited) == 1:
        svc = edited[0][1]
        what = f"edit IPVS service {svc.ident} ({svc.scheduler} {','.join(svc.flags)})"
    else:
        what = f"edit {len(edited)} IPVS services ({_names([new for _old, new in edited])})"
    return Step(what, partial(edit, edited), undo)


def _delete_services_step(kernel: Kernel, state: NodeState, save, listing, deleted: list[IpvsService]) -> Step:
    def run() -> None:
        _send(kernel, listing, [IpvsCommand("-D", s) for s in deleted], {s.ident: None for s in deleted})
        crash_point("after the write, before its record is updated")
        state.ipvs.difference_update(s.ident for s in deleted)
        save()

    def undo() -> None:
        # Back with the destination lists they had, in the same order.
        _send(kernel, listing, _create_commands(deleted), {s.ident: s for s in deleted})

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


def _sync_dests_step(kernel: Kernel, targets: list[IpvsService], listing) -> Step:
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
        _send(kernel, listing, commands, results)

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


def check_modules(desired: Desired, kernel: Kernel) -> None:
    """Raise before any write when the kernel lacks (and cannot load) a module."""
    missing = kernel.modules_missing(desired.modules)
    if missing:
        raise KernelFeatureError(
            f"this kernel lacks {', '.join(missing)} (needed by node {desired.node}'s intent) and cannot load "
            f"{'it' if len(missing) == 1 else 'them'}: nothing was changed. Install a kernel with "
            f"{'this module' if len(missing) == 1 else 'these modules'} (e.g. Debian's linux-image-amd64), "
            "or choose a mode and engine this kernel has (l2 on the nft engine needs only nf_tables)."
        )


def check_bird(plan: Plan, kernel: Kernel) -> None:
    """BIRD must accept the new fragment before anything is written (that
    BIRD runs and includes it, prepare checked when it made the plan)."""
    for change in plan.of_kind("bird config"):
        want: BirdConfig = change.after
        try:
            kernel.bird_check(want.config, want.fragment, want.text)
        except BirdError as exc:
            if exc.missing and not _declares(want):
                continue  # BIRD is not installed: nothing reads the emptied fragment
            where = pointer_at(want, exc.line) if exc.line else ""
            at = f" (fragment line {exc.line}, from the intent's {where})" if where else ""
            raise ApplyError(f"nothing was changed: {exc}{at}", rolled_back=True) from exc


def apply_plan(plan: Plan, desired: Desired, kernel: Kernel, store: StateStore, state: NodeState) -> ApplyResult:
    result = ApplyResult()
    if plan.empty:
        return result
    check_modules(desired, kernel)
    check_bird(plan, kernel)
    vrrp_apply.check(plan, kernel)
    # Check every nftables batch before anything is written: a transaction the
    # kernel would refuse must not leave addresses or sysctls half done.  A
    # plan that is one nft transaction and nothing else (every health change,
    # every weight change on the nft engine) needs no rehearsal: the
    # transaction itself is all-or-nothing.
    only_one_transaction = len(plan.tables) == 1 and all(c.kind.startswith("nft ") for c in plan.changes)
    for td in plan.tables:
        crash_point(f"before the nft {'transaction' if only_one_transaction else 'dry run'} on {td.family} {td.name}")
        try:
            # The batch is not kept here: the kernel lets a large one go
            # before libnftables parses it (SystemKernel.nft_apply).
            if only_one_transaction:
                result.proved_by_generation = kernel.nft_apply(batch_for(td), becomes=td.desired)
            else:
                kernel.nft_apply(_rehearsal(plan, td, batch_for(td)), check_only=True)
        except KernelError as exc:
            raise ApplyError(f"nothing was changed: {exc}", rolled_back=True) from exc
    if only_one_transaction:
        return _finish_single_transaction(plan, desired, kernel, store, state, result)

    writes_before = kernel.writes
    journal = Journal(state, store)
    steps, announce = _steps(plan, kernel, store, state, result.notes)
    steps += xdp_steps(plan, desired, kernel, store, state)
    _run_steps(journal, steps, result)
    if desired.xdp is not None:
        result.notes.extend(kernel.xdp.warnings)
    crash_point("after the last step, before the read-back")
    ipvs_list, result.ipvs_listed_again = _ipvs_read_back(plan, kernel)
    if announce:
        # What this plan built is read back before BIRD may announce it;
        # then the announce routes (and a fragment that only announces).
        # A plan that builds nothing (a VIP whose pool is served again) had
        # the kernel read and found equal to the intent when it was made.
        if steps:
            _read_back(_before_announcing(desired, plan), kernel, state, ipvs_list)
        _run_steps(journal, announce, result)
        crash_point("after announcing, before its read-back")
        _read_back_announcement(desired, kernel, state)
    else:
        _read_back(desired, kernel, state, ipvs_list)
    result.writes = kernel.writes - writes_before
    return result


def _run_steps(journal: Journal, steps: list[Step], result: ApplyResult) -> None:
    for step in steps:
        try:
            journal.run(step)
        except Exception as exc:  # noqa: BLE001 - any failure (netlink, disk) must roll back
            failures = journal.roll_back()
            if failures:
                raise ApplyError(
                    f"{step.description} failed: {exc}; rolling back also failed:\n  "
                    + "\n  ".join(failures)
                    + "\nthe kernel is between the old and the new state; `kdsr plan` shows what is left "
                    "and `kdsr apply` converges",
                    rolled_back=False,
                ) from exc
            raise ApplyError(
                f"{step.description} failed: {exc}; the previous state was restored", rolled_back=True
            ) from exc
        result.steps.append(step.description)


def _before_announcing(desired: Desired, plan: Plan) -> Desired:
    """What the kernel holds before the announcing steps: ``desired`` less
    the announce routes still to add, with the fragment as it was when its
    write is one of those steps."""
    coming = {c.ident for c in plan.of_kind("announce route") if c.action in (CREATE, REPLACE)}
    bird = desired.bird
    change = next(iter(plan.of_kind("bird config")), None)
    if change is not None and not _withdraws(plan):
        bird = change.before
    desired = dataclasses.replace(
        desired, announce=tuple(r for r in desired.announce if r.ident not in coming), bird=bird
    )
    return vrrp_apply.before_announcing(desired, plan)


def _read_back_announcement(desired: Desired, kernel: Kernel, state: NodeState) -> None:
    """The announce routes and the fragment, after the announcing steps."""
    wanted = Desired(
        node=desired.node,
        role=desired.role,
        bird=desired.bird,
        announce=desired.announce,
        keepalived=desired.keepalived,
        gates=desired.gates,
    )
    leftover = diff(wanted, observe_announcement(kernel, desired, state))
    if not leftover.empty:
        lines = ", ".join(f"{c.action} {c.kind} {c.ident}" for c in leftover.changes[:5])
        raise ApplyError(f"read-back after apply does not match the intent: {lines}", rolled_back=False)


def _rehearsal(plan: Plan, td: TableDiff, commands: list[dict]) -> list[dict]:
    """The batch the dry run checks: links this plan makes come before the
    transaction (step 1) but after the check, so an element naming one
    names ``lo`` in the check (L3's tunnel-link map)."""
    coming = {c.ident for c in plan.of_kind("link") if c.action in (CREATE, REPLACE)}
    by_index = {m.name for m in (td.desired.maps if td.desired else ()) if m.data_type == "iface_index"}
    return with_stand_in_links(commands, by_index, coming) if coming and by_index else commands


def _finish_single_transaction(
    plan: Plan, desired: Desired, kernel: Kernel, store: StateStore, state: NodeState, result: ApplyResult
) -> ApplyResult:
    """After the one nft transaction of a plan went in: record it, read back."""
    td = plan.tables[0]
    crash_point("after the one nft transaction, before recording it")
    (state.tables.add if td.desired is not None else state.tables.discard)(f"{td.family} {td.name}")
    store.save(state)
    result.steps.append(f"nftables transaction on table {td.family} {td.name}")
    result.writes = 1
    _read_back(desired, kernel, state)
    return result


def _read_back(
    desired: Desired, kernel: Kernel, state: NodeState, ipvs_list: Callable[[], list[IpvsService]] | None = None
) -> None:
    """The kernel must now hold exactly what we asked for."""
    observed = observe(kernel, desired, state, ipvs_list=ipvs_list)
    leftover = diff(desired, observed)
    keep_unchanged(kernel, desired, observed, leftover.tables)
    if not leftover.empty:
        lines = ", ".join(f"{c.action} {c.kind} {c.ident}" for c in leftover.changes[:5])
        raise ApplyError(f"read-back after apply does not match the intent: {lines}", rolled_back=False)


# What a read-back's IPVS listing costs, in services of a full listing: an
# ``ipvsadm -R`` run of ``-L`` lines costs about as much as listing 64
# services in full, and each service it lists as 4 (ipvsadm 1.31;
# bench/ipvs_control_plane.py measures both ways).
_RUN_COST = 64
_LISTED_COST = 4


def _ipvs_read_back(plan: Plan, kernel: Kernel) -> tuple[Callable[[], list[IpvsService]] | None, int]:
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
    does.  A service expected gone ends an ipvsadm run (``ipvs_list_some``),
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
    return (lambda: untouched + kernel.ipvs_list_some(wanted)), len(wanted)


def xdp_steps(plan: Plan, desired: Desired, kernel: Kernel, store: StateStore, state: NodeState) -> list[Step]:
    """The xdp engine's changes as one step: attach kdsr's program where it
    is wanted and absent, bring its maps to the desired elements (servers,
    then tables, then services; what goes, in reverse), or detach it.  Its
    undo puts back what the maps held before the step."""
    changes = [c for c in plan.changes if c.kind.startswith("xdp ")]
    if not changes:
        return []
    want = desired.xdp
    gone = [c.before for c in changes if c.kind == "xdp program" and c.action == DELETE]
    create = any(c.kind == "xdp program" and c.action == CREATE for c in changes)
    # The program replaced by a newer object: attached over the old one in
    # one step (the kernel swaps programs atomically), with fresh maps that
    # converge fills: VIP packets meanwhile go to the stack (XDP_PASS).  The
    # old program's counters are carried into the new one's.
    replace = any(c.kind == "xdp program" and c.action == REPLACE for c in changes)
    before: dict[str, object] = {}

    def run() -> None:
        for old in gone:
            kernel.xdp.detach(kernel, old.interface)
            state.xdp.discard(old.interface)
            store.save(state)
        if want is None:
            return
        carried = None
        if replace:
            carried = kernel.xdp.carried(want.interface)
            kernel.xdp.attach(kernel, want.interface, force=True)
        elif create:
            force = want.interface in state.xdp  # a foreign program the user let kdsr adopt (--adopt)
            state.xdp.add(want.interface)
            store.save(state)
            kernel.xdp.attach(kernel, want.interface, force=force)
        else:
            before["state"] = kernel.xdp.read(want.interface)[0]
        kernel.xdp.converge(kernel, want)
        kernel.xdp.carry_over(kernel, want.interface, carried)

    def undo() -> None:
        if want is not None and create:
            kernel.xdp.detach(kernel, want.interface)
        elif before.get("state") is not None:
            kernel.xdp.converge(kernel, before["state"])

    what = "detach kdsr's XDP program" if want is None else f"XDP maps on {want.interface} ({len(changes)} changes)"
    return [Step(what, run, undo)]
