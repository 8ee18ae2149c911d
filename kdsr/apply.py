"""Carry out a Plan: ordered, journaled, rolled back on failure, read back.

Order (deletes mirror creates):
  1. sysctls to set      - before the VIP appears on lo, so the server never
                           answers ARP for it, not even for a moment;
  2. addresses to add;
  3. nftables            - one transaction per table, checked (dry run)
                           before anything at all is written;
  4. addresses to delete;
  5. sysctls to restore  - after the VIP is gone, for the same reason.

nftables is transactional; addresses and sysctls are not.  Each completed
step records its inverse in a journal; when a later step fails, the journal
runs backwards and the error says whether the old state is back.  The state
file is saved after every step, so even a SIGKILL leaves a record that the
next plan can converge from.  Afterwards the kernel is read again and
compared with Desired: a mismatch is an error, not a silent success.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field

from kdsr.diff import CREATE, DELETE, REPLACE, UPDATE, Plan, diff, diff_table
from kdsr.errors import ApplyError
from kdsr.kernel import Kernel, KernelError
from kdsr.kernel.nft_json import batch_for
from kdsr.kernel.observe import observe
from kdsr.kernel.state import NodeState, StateStore
from kdsr.model import Address, Desired


@dataclass
class Step:
    description: str
    run: Callable[[], None]
    undo: Callable[[], None] | None


@dataclass
class ApplyResult:
    steps: list[str] = field(default_factory=list)
    writes: int = 0


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


def _steps(plan: Plan, kernel: Kernel, store: StateStore, state: NodeState) -> list[Step]:
    """One Step per kernel write.

    Ownership is recorded *before* a write that creates something and dropped
    *after* a write that removes it, so a crash at any point leaves a state
    file that claims too much rather than too little; diff forgets records of
    things that are not there.
    """
    steps: list[Step] = []

    def save() -> None:
        store.save(state)

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
            state.sysctl_previous.pop(key, None)
            state.sysctl_written.pop(key, None)
            save()

        def undo() -> None:
            if write and current is not None:
                kernel.sysctl_write(key, current)

        verb = "restore" if write else "forget"
        return Step(f"{verb} sysctl {key.replace('/', '.')}={value}", run, undo)

    def add_address(addr: Address) -> Step:
        def run() -> None:
            state.owned_addresses.add(addr.ident)
            save()
            kernel.addr_add(addr)

        return Step(f"add address {addr.cidr} to {addr.ifname}", run, lambda: kernel.addr_del(addr))

    def delete_address(addr: Address, write: bool = True) -> Step:
        def run() -> None:
            if write:
                kernel.addr_del(addr)
            state.owned_addresses.discard(addr.ident)
            save()

        def undo() -> None:
            if write:
                kernel.addr_add(addr)

        verb = "delete" if write else "forget"
        return Step(f"{verb} address {addr.cidr} on {addr.ifname}", run, undo)

    for change in plan.of_kind("sysctl"):
        if change.action == UPDATE:
            previous = change.before.value if change.before is not None else None
            steps.append(set_sysctl(change.after.key, change.after.value, previous))
    for change in plan.of_kind("address"):
        if change.action in (CREATE, REPLACE):
            if change.action == REPLACE:
                steps.append(delete_address(change.before))
            steps.append(add_address(change.after))

    for td in plan.tables:
        commands = batch_for(td)
        inverse = batch_for(diff_table(td.observed, td.desired, []))
        ident = f"{td.family} {td.name}"

        def run(commands=commands, ident=ident, create=td.desired is not None) -> None:
            kernel.nft_apply(commands)
            (state.tables.add if create else state.tables.discard)(ident)
            save()

        def undo(inverse=inverse) -> None:
            kernel.nft_apply(inverse)

        steps.append(Step(f"nftables transaction on table {ident} ({len(commands)} commands)", run, undo))

    for change in plan.of_kind("address"):
        if change.action == DELETE:
            steps.append(delete_address(change.before, write=change.reason != "forget"))
    for change in plan.of_kind("sysctl"):
        if change.action == DELETE:
            current = change.before.value if change.before is not None else None
            steps.append(restore_sysctl(change.after.key, change.after.value, current, change.reason == "restore"))
    return steps


def apply_plan(plan: Plan, desired: Desired, kernel: Kernel, store: StateStore, state: NodeState) -> ApplyResult:
    result = ApplyResult()
    if plan.empty:
        return result
    # Check every nftables batch before anything is written: a transaction the
    # kernel would refuse must not leave addresses or sysctls half done.
    for td in plan.tables:
        try:
            kernel.nft_apply(batch_for(td), check_only=True)
        except KernelError as exc:
            raise ApplyError(f"nothing was changed: {exc}", rolled_back=True) from exc

    writes_before = kernel.writes
    journal = Journal(state, store)
    for step in _steps(plan, kernel, store, state):
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
    result.writes = kernel.writes - writes_before

    # Read back: the kernel must now hold exactly what we asked for.
    leftover = diff(desired, observe(kernel, desired, state))
    if not leftover.empty:
        lines = ", ".join(f"{c.action} {c.kind} {c.ident}" for c in leftover.changes[:5])
        raise ApplyError(f"read-back after apply does not match the intent: {lines}", rolled_back=False)
    return result
