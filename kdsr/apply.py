"""Carry out a Plan: ordered, journaled, rolled back on failure, read back.

Each kernel backend's steps are built apart (here: links, sysctls,
nftables, BIRD, XDP; kdsr/ipvs_apply.py: IPVS; kdsr/vrrp_apply.py:
keepalived), each tagged with its phase (kdsr/step.py ``Phase``), and run
in phase order.  Kernel modules are checked (and loaded), and every nftables
batch, BIRD's and keepalived's fragments are checked, before any write.

Phases (deletes mirror creates):
  RELEASE, WITHDRAW - keepalived gives a VIP up (a gate closes) and BIRD
                      withdraws it (its announce route goes; a fragment
                      that withdraws a VIP or removes fast path) before the
                      fast path changes, so routers stop sending first;
  MAKE_LINKS        - tunnels first: per-link sysctls and routes need them;
  SET_SYSCTLS       - before the VIP appears on lo, so the server never
                      answers ARP for it, not even for a moment;
  ADD_ADDRESSES;
  ADD_ROUTES        - routes, then rules: a rule never points at an empty table;
  NFT               - one transaction per table;
  IPVS              - services and destinations (canonical order), deletes last;
  DELETE_ROUTES     - rules, then routes;
  DELETE_ADDRESSES;
  RESTORE_SYSCTLS   - after the VIP is gone, for the same reason;
  DELETE_LINKS;
  XDP               - kdsr's XDP program and its maps;
  (read back)
  ANNOUNCE, OPEN    - announce routes added (kdsr/compile/bird.py: BIRD
                      announces a VIP while its route is in kdsr's announce
                      table), a fragment that only announces, gates that
                      open: only once the read-back has verified the rest,
                      so a VIP is announced once this boot's fast path for it
                      is in.

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

from kdsr import ipvs_apply, vrrp_apply
from kdsr.bird_text import pointer_at
from kdsr.diff import CREATE, DELETE, REPLACE, UPDATE, Plan, diff, diff_table
from kdsr.errors import ApplyError, KernelFeatureError
from kdsr.faults import crash_point
from kdsr.kernel import BirdBackend, Kernel, KernelError, LinksBackend, NftBackend, SysctlBackend, XdpEngine
from kdsr.kernel.bird import BirdError
from kdsr.kernel.nft_json import batch_for, with_stand_in_links
from kdsr.kernel.observe import keep_unchanged, observe, observe_announcement
from kdsr.kernel.state import NodeState, StateStore
from kdsr.model import Address, AnnounceRoute, BirdConfig, Desired, IpvsService, Link, TableDiff
from kdsr.step import Phase, Step


@dataclass
class ApplyResult:
    steps: list[str] = field(default_factory=list)
    writes: int = 0
    # True when the ruleset generation proved the one nft transaction was
    # the only commit since the read: the read-back then takes the map
    # elements as sent, and lists the table's structure only if it changed
    # (kdsr/kernel/nft.py ``Nftables.apply``).
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
    plan: Plan, desired: Desired, kernel: Kernel, store: StateStore, state: NodeState, notes: list[str]
) -> tuple[list[Step], list[Step]]:
    """Every backend's steps, one Step per kernel write (or batch of them), in
    phase order: those to run, then those that announce, which run only once
    the kernel has been read back after the first.

    Ownership is recorded *before* a write that creates something and dropped
    *after* a write that removes it, so a crash at any point leaves a state
    file that claims too much rather than too little; diff forgets records of
    things that are not there.
    """

    def save() -> None:
        store.save(state)
        crash_point("after saving the ownership record")

    phased = [
        *_links_steps(plan, kernel.links, state, save),
        *_sysctl_steps(plan, kernel.sysctl, state, save),
        *_nft_steps(plan, kernel.nft, state, save),
        *ipvs_apply.steps(plan, kernel.ipvs, state, save),
        *_bird_steps(plan, kernel.bird, state, save, notes),
        *vrrp_apply.steps(plan, kernel.keepalived, state, save, notes),
    ]
    if any(c.kind.startswith("xdp ") for c in plan.changes):  # the XDP backend loads libbpf: only when needed
        phased += _xdp_steps(plan, desired, kernel.xdp, store, state)
    phased.sort(key=lambda tagged: tagged[0])  # stable: a builder's order within a phase stays
    before = [step for phase, step in phased if phase < Phase.ANNOUNCE]
    return before, [step for phase, step in phased if phase >= Phase.ANNOUNCE]


def _links_steps(
    plan: Plan, links: LinksBackend, state: NodeState, save: Callable[[], None]
) -> list[tuple[Phase, Step]]:
    """Tunnels, addresses, the routes and rules that send marked packets
    into them, and kdsr's announce routes."""
    out: list[tuple[Phase, Step]] = []

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
            _take_back(links, True, added)

        def run() -> None:
            state.owned_addresses.update(a.ident for a in addrs)
            save()
            _in_batches(links, True, addrs, added, undo)

        return Step(_addresses("add", "to", addrs), run, undo)

    def delete_addresses(addrs: list[Address], write: bool = True) -> Step:
        """Addresses as ONE step (see ``add_addresses``): each deleted, then
        their records dropped in one save."""
        removed: list[Address] = []

        def undo() -> None:
            _take_back(links, False, removed)

        def run() -> None:
            if write:
                _in_batches(links, False, addrs, removed, undo)
                crash_point("after the write, before its record is updated")
            state.owned_addresses.difference_update(a.ident for a in addrs)
            save()

        verb = "delete" if write else "forget"
        return Step(_addresses(verb, "on", addrs), run, undo)

    for change in plan.of_kind("link"):
        if change.action == REPLACE:
            out.append((Phase.MAKE_LINKS, _delete_link(links, state, save, change.before)))
        if change.action in (CREATE, REPLACE):
            out.append((Phase.MAKE_LINKS, _add_link(links, state, save, change.after)))
        elif change.action == DELETE:
            out.append((Phase.DELETE_LINKS, _delete_link(links, state, save, change.before)))

    for change in plan.of_kind("address"):
        if change.action == REPLACE:
            out += [
                (Phase.ADD_ADDRESSES, delete_addresses([change.before])),
                (Phase.ADD_ADDRESSES, add_addresses([change.after])),
            ]
    created = [c.after for c in plan.of_kind("address") if c.action == CREATE]
    if created:
        out.append((Phase.ADD_ADDRESSES, add_addresses(created)))
    for write in (True, False):
        gone = [c.before for c in plan.of_kind("address") if c.action == DELETE and (c.reason != "forget") == write]
        if gone:
            out.append((Phase.DELETE_ADDRESSES, delete_addresses(gone, write)))

    # A table whose default route moves to another link: the old route goes
    # first, or the kernel refuses the new one (EEXIST).
    created_tables = {(c.after.family, c.after.table) for c in plan.of_kind("route") if c.action == CREATE}
    moved = [
        c for c in plan.of_kind("route") if c.action == DELETE and (c.before.family, c.before.table) in created_tables
    ]
    for change in moved:
        route = change.before
        step = Step(f"delete route {change.ident}", partial(links.route_del, route), partial(links.route_add, route))
        out.append((Phase.ADD_ROUTES, step))
    for kind, add, delete in (("route", links.route_add, links.route_del), ("rule", links.rule_add, links.rule_del)):
        for change in plan.of_kind(kind):
            if change.action == CREATE:
                step = Step(f"add {kind} {change.ident}", partial(add, change.after), partial(delete, change.after))
                out.append((Phase.ADD_ROUTES, step))
            elif change.action == REPLACE:  # its link was replaced, which took it away
                out.append((Phase.ADD_ROUTES, Step(f"restore {kind} {change.ident}", partial(add, change.after), None)))
    for kind, add, delete in (("rule", links.rule_add, links.rule_del), ("route", links.route_add, links.route_del)):
        for change in plan.of_kind(kind):
            if change.action == DELETE and change not in moved:
                step = Step(
                    f"delete {kind} {change.ident}", partial(delete, change.before), partial(add, change.before)
                )
                out.append((Phase.DELETE_ROUTES, step))

    # Routers stop sending before the fast path goes, and start only once it
    # is there: withdrawals first, announcements last.
    for change in plan.of_kind("announce route"):
        if change.action in (DELETE, REPLACE):
            out.append((Phase.WITHDRAW, _announce_step(links, False, change.before, change.reason)))
        if change.action in (CREATE, REPLACE):
            out.append((Phase.ANNOUNCE, _announce_step(links, True, change.after)))
    return out


def _sysctl_steps(
    plan: Plan, sysctl: SysctlBackend, state: NodeState, save: Callable[[], None]
) -> list[tuple[Phase, Step]]:
    def set_sysctl(key: str, value: str, previous: str | None) -> Step:
        def run() -> None:
            if previous is not None:
                state.sysctl_previous.setdefault(key, previous)
            state.sysctl_written[key] = value
            save()
            sysctl.write(key, value)

        def undo() -> None:
            if previous is not None:
                sysctl.write(key, previous)

        return Step(f"set sysctl {key.replace('/', '.')}={value}", run, undo)

    def restore_sysctl(key: str, value: str, current: str | None, write: bool) -> Step:
        def run() -> None:
            if write:
                sysctl.write(key, value)
                crash_point("after the write, before its record is updated")
            state.sysctl_previous.pop(key, None)
            state.sysctl_written.pop(key, None)
            save()

        def undo() -> None:
            if write and current is not None:
                sysctl.write(key, current)

        verb = "restore" if write else "forget"
        return Step(f"{verb} sysctl {key.replace('/', '.')}={value}", run, undo)

    out: list[tuple[Phase, Step]] = []
    for change in plan.of_kind("sysctl"):
        current = change.before.value if change.before is not None else None
        if change.action == UPDATE:
            out.append((Phase.SET_SYSCTLS, set_sysctl(change.after.key, change.after.value, current)))
        elif change.action == DELETE:
            step = restore_sysctl(change.after.key, change.after.value, current, change.reason == "restore")
            out.append((Phase.RESTORE_SYSCTLS, step))
    return out


def _nft_steps(plan: Plan, nft: NftBackend, state: NodeState, save: Callable[[], None]) -> list[tuple[Phase, Step]]:
    """One transaction per table; its undo is the transaction back."""
    out: list[tuple[Phase, Step]] = []
    for td in plan.tables:
        commands = batch_for(td)
        inverse = batch_for(diff_table(td.observed, td.desired, []))
        ident = f"{td.family} {td.name}"

        def run(commands=commands, ident=ident, create=td.desired is not None) -> None:
            nft.apply(commands)
            crash_point("after the write, before its record is updated")
            (state.tables.add if create else state.tables.discard)(ident)
            save()

        def undo(inverse=inverse) -> None:
            nft.apply(inverse)

        out.append((Phase.NFT, Step(f"nftables transaction on table {ident} ({len(commands)} commands)", run, undo)))
    return out


def _bird_steps(
    plan: Plan, bird: BirdBackend, state: NodeState, save: Callable[[], None], notes: list[str]
) -> list[tuple[Phase, Step]]:
    """BIRD's fragment: first when the plan withdraws, else once the rest is verified."""
    change = next(iter(plan.of_kind("bird config")), None)
    if change is None:
        return []
    return [(Phase.WITHDRAW if _withdraws(plan) else Phase.ANNOUNCE, _bird_step(bird, state, save, change, notes))]


# A plan that deletes any of these reloads BIRD before its other steps.
WITHDRAW_FIRST = ("bgp route", "nft table", "nft chain", "ipvs service", "address")


def _withdraws(plan: Plan) -> bool:
    return any(c.action == DELETE and c.kind in WITHDRAW_FIRST for c in plan.changes)


def _announce_step(links: LinksBackend, add: bool, route: AnnounceRoute, why: str = "") -> Step:
    if add:
        return Step(
            f"add announce route {route.prefix} (BIRD announces it)",
            partial(links.announce_add, route),
            partial(links.announce_del, route),
        )
    because = f": {why}" if why else ""
    return Step(
        f"delete announce route {route.prefix} (BIRD withdraws it{because})",
        partial(links.announce_del, route),
        partial(links.announce_add, route),
    )


def _bird_step(bird: BirdBackend, state: NodeState, save: Callable[[], None], change, notes: list[str]) -> Step:
    want: BirdConfig = change.after
    have: BirdConfig | None = change.before
    declares = _declares(want)
    # A fragment that declares nothing (destroy) needs no running BIRD: a
    # stopped BIRD announces nothing, and reads the file when it starts.
    reload = declares or bird.running(want.socket)

    def run() -> None:
        if declares:
            state.bird_files = [want.config, want.fragment, want.socket]
            save()
        bird.install(want.config, want.fragment, want.socket, want.text, reload=reload)
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
            bird.install(have.config, have.fragment, have.socket, have.text, reload=reload)

    what = f"{len(want.routes)} routes, {len(want.sessions)} sessions" if declares else "empty"
    how = "and reload BIRD" if reload else "(BIRD is not running: no reload)"
    return Step(f"write BIRD fragment {want.fragment} ({what}) {how}", run, undo)


def _declares(config: BirdConfig) -> bool:
    return bool(config.routes or config.sessions or config.router_id)


def _add_link(links: LinksBackend, state: NodeState, save: Callable[[], None], link: Link) -> Step:
    def run() -> None:
        state.links.add(link.name)
        save()
        links.link_add(link)

    return Step(
        f"add {link.kind} link {link.name} ({link.local} -> {link.remote or 'any'})",
        run,
        lambda: links.link_del(link.name),
    )


# Addresses per kernel call (kdsr/kernel/links.py sends them in one netlink
# batch, not one request and answer at a time: bench/netlink.py measures both).
ADDRESS_BATCH = 256


def _in_batches(
    links: LinksBackend, add: bool, addrs: list[Address], done: list[Address], undo: Callable[[], None]
) -> None:
    """Add (or delete) the addresses in order, noting each that landed in
    ``done``; a failure undoes what was done, then re-raises.  The first
    address goes alone, so a crash after it with the rest still to come
    stays a point the safety lab reaches however few addresses it has."""
    start, size = 0, 1
    while start < len(addrs):
        if done:
            crash_point(f"part-way through the addresses, before {addrs[start].cidr}")
        try:
            links.addr_write(add, addrs[start : start + size], done)
        except Exception:
            undo()
            raise
        start, size = start + size, ADDRESS_BATCH


def _take_back(links: LinksBackend, added: bool, done: list[Address]) -> None:
    """Reverse the writes in ``done``, last first; what could not be taken
    back stays in ``done`` and the error goes up (the journal reports it)."""
    undone: list[Address] = []
    try:
        links.addr_write(not added, done[::-1], undone)
    finally:
        gone = set(map(id, undone))
        done[:] = [a for a in done if id(a) not in gone]


def _addresses(verb: str, preposition: str, addrs: list[Address]) -> str:
    first = f"{addrs[0].cidr} {preposition} {addrs[0].ifname}"
    if len(addrs) == 1:
        return f"{verb} address {first}"
    return f"{verb} {len(addrs)} addresses ({first} and {len(addrs) - 1} more)"


def _delete_link(links: LinksBackend, state: NodeState, save: Callable[[], None], link: Link) -> Step:
    def run() -> None:
        links.link_del(link.name)
        crash_point("after the write, before its record is updated")
        state.links.discard(link.name)
        save()

    return Step(f"delete link {link.name}", run, lambda: links.link_add(link))


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


def check_bird(plan: Plan, bird: BirdBackend) -> None:
    """BIRD must accept the new fragment before anything is written (that
    BIRD runs and includes it, prepare checked when it made the plan)."""
    for change in plan.of_kind("bird config"):
        want: BirdConfig = change.after
        try:
            bird.check(want.config, want.fragment, want.text)
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
    check_bird(plan, kernel.bird)
    vrrp_apply.check(plan, kernel.keepalived)
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
            # before libnftables parses it (Nftables.apply).
            if only_one_transaction:
                result.proved_by_generation = kernel.nft.apply(batch_for(td), becomes=td.desired)
            else:
                kernel.nft.apply(_rehearsal(plan, td, batch_for(td)), check_only=True)
        except KernelError as exc:
            raise ApplyError(f"nothing was changed: {exc}", rolled_back=True) from exc
    if only_one_transaction:
        return _finish_single_transaction(plan, desired, kernel, store, state, result)

    writes_before = kernel.writes
    journal = Journal(state, store)
    steps, announce = _steps(plan, desired, kernel, store, state, result.notes)
    _run_steps(journal, steps, result)
    if desired.xdp is not None:
        result.notes.extend(kernel.xdp.warnings)
    crash_point("after the last step, before the read-back")
    ipvs_list, result.ipvs_listed_again = ipvs_apply.read_back(plan, kernel.ipvs)
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


def _xdp_steps(
    plan: Plan, desired: Desired, xdp: XdpEngine, store: StateStore, state: NodeState
) -> list[tuple[Phase, Step]]:
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
            xdp.detach(old.interface)
            state.xdp.discard(old.interface)
            store.save(state)
        if want is None:
            return
        carried = None
        if replace:
            carried = xdp.carried(want.interface)
            xdp.attach(want.interface, force=True)
        elif create:
            force = want.interface in state.xdp  # a foreign program the user let kdsr adopt (--adopt)
            state.xdp.add(want.interface)
            store.save(state)
            xdp.attach(want.interface, force=force)
        try:
            if replace or create:
                xdp.converge(want)
            else:
                # The undo's copy is what converge read before its first
                # write: no read of its own.
                xdp.converge(want, found=lambda have: before.__setitem__("state", have))
        except Exception:
            # Many writes, one step: the journal undoes only the steps that
            # completed, so this one takes its own writes back (as
            # _in_batches does for addresses).
            undo()
            raise
        xdp.carry_over(want.interface, carried)

    def undo() -> None:
        if want is not None and create:
            xdp.detach(want.interface)
        elif before.get("state") is not None:
            xdp.converge(before["state"])

    what = "detach kdsr's XDP program" if want is None else f"XDP maps on {want.interface} ({len(changes)} changes)"
    return [(Phase.XDP, Step(what, run, undo))]
