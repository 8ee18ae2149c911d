"""The apply steps for VRRP: kdsr's keepalived fragment and its gates.

Ordered as BGP's (kdsr/apply.py): a gate closes before everything else, so
keepalived gives a VIP up before its fast path changes; a gate opens only
after the read-back has verified the rest, so a VIP is owned once this
boot's fast path for it is in.  The fragment is written first when the plan
removes an instance or fast path (the owner releases the VIP first), else
last; a gate whose instance is gone is removed after the fragment.
"""

from __future__ import annotations

from collections.abc import Callable

from kdsr.diff import DELETE, Plan
from kdsr.errors import ApplyError
from kdsr.keepalived_text import pointer_at
from kdsr.kernel import KeepalivedBackend
from kdsr.kernel.keepalived import KeepalivedError
from kdsr.kernel.state import NodeState
from kdsr.model import KeepalivedConfig, VrrpGate
from kdsr.step import Phase, Step


def _step(description: str, run: Callable[[], None], undo: Callable[[], None] | None) -> Step:
    return Step(description, run, undo)


# A plan that deletes any of these rewrites the fragment before its other steps.
RELEASE_FIRST = ("vrrp instance", "nft table", "nft chain", "address")


def _releases(plan: Plan) -> bool:
    return any(c.action == DELETE and c.kind in RELEASE_FIRST for c in plan.changes)


def steps(
    plan: Plan, keepalived: KeepalivedBackend, state: NodeState, save: Callable[[], None], notes: list[str]
) -> list[tuple[Phase, Step]]:
    """RELEASE: the gates that close, and the fragment (with the gates it no
    longer names) when the plan releases; else those go in OPEN, with the
    gates that open, after the read-back."""
    out: list[tuple[Phase, Step]] = []
    for change in plan.of_kind("vrrp gate"):
        gate: VrrpGate | None = change.after
        if gate is not None and not gate.open:
            out.append((Phase.RELEASE, _gate_step(keepalived, state, save, gate, change.before, change.reason)))
        elif gate is not None:
            out.append((Phase.OPEN, _gate_step(keepalived, state, save, gate, change.before)))
    config = next(iter(plan.of_kind("keepalived config")), None)
    removed = [c.before for c in plan.of_kind("vrrp gate") if c.after is None]
    where = Phase.RELEASE if _releases(plan) or config is None else Phase.OPEN
    if config is not None:
        out.append((where, _config_step(keepalived, state, save, config, notes)))
    out.extend((where, _remove_gate_step(keepalived, state, save, gate)) for gate in removed)
    return out


def _gate_step(keepalived: KeepalivedBackend, state: NodeState, save, gate: VrrpGate, before, why: str = "") -> Step:
    def run() -> None:
        state.gates.add(gate.path)
        save()
        keepalived.gate_write(gate.path, gate.value)

    def undo() -> None:
        if before is None:
            keepalived.gate_remove(gate.path)
        else:
            keepalived.gate_write(gate.path, before.value)

    if gate.open:
        what = f"open VRRP gate {gate.path} (keepalived may own {gate.vip})"
    else:
        because = f": {why}" if why else ""
        what = f"close VRRP gate {gate.path} (keepalived gives {gate.vip or 'the VIP'} up{because})"
    return _step(what, run, undo)


def _remove_gate_step(keepalived: KeepalivedBackend, state: NodeState, save, gate: VrrpGate) -> Step:  # noqa: N803
    def run() -> None:
        keepalived.gate_remove(gate.path)
        state.gates.discard(gate.path)
        save()

    def undo() -> None:
        keepalived.gate_write(gate.path, gate.value)

    return _step(f"remove VRRP gate {gate.path}", run, undo)


def _config_step(keepalived: KeepalivedBackend, state: NodeState, save, change, notes: list[str]) -> Step:  # noqa: N803
    want: KeepalivedConfig | None = change.after
    have: KeepalivedConfig | None = change.before
    files = want or have
    # Removing the fragment needs no running keepalived: a stopped one owns
    # nothing, and ignores the missing include when it starts.
    reload = want is not None or keepalived.running(files.pid_file)

    def run() -> None:
        if want is not None:
            state.keepalived_files = [want.config, want.fragment, want.pid_file]
            save()
        keepalived.install(files.config, files.fragment, files.pid_file, want.text if want else None, reload)
        if not reload:
            notes.append(
                f"keepalived was not running (no live pid in {files.pid_file}): {files.fragment} was removed "
                "without a reload; a stopped keepalived owns no VIP."
            )
        if want is None:
            state.keepalived_files = []
            save()

    def undo() -> None:
        if have is not None:
            keepalived.install(have.config, have.fragment, have.pid_file, have.text, reload)
        else:
            keepalived.install(files.config, files.fragment, files.pid_file, None, reload)

    how = "and reload keepalived" if reload else "(keepalived is not running: no reload)"
    if want is None:
        return _step(f"remove keepalived fragment {files.fragment} {how}", run, undo)
    return _step(f"write keepalived fragment {want.fragment} ({len(want.instances)} VRRP instances) {how}", run, undo)


def check(plan: Plan, keepalived: KeepalivedBackend) -> None:
    """keepalived must accept the new fragment before anything is written."""
    for change in plan.of_kind("keepalived config"):
        want: KeepalivedConfig | None = change.after
        if want is None:
            continue
        try:
            keepalived.check(want.config, want.fragment, want.text)
        except KeepalivedError as exc:
            where = pointer_at(want, exc.line) if exc.line else ""
            at = f" (fragment line {exc.line}, from the intent's {where})" if where else ""
            raise ApplyError(f"nothing was changed: {exc}{at}", rolled_back=True) from exc


def before_announcing(desired, plan: Plan):
    """``desired`` as the kernel holds it before the last steps: the gates
    still to open as they are now, and the fragment as it was when its write
    is one of the last steps."""
    import dataclasses

    coming = {c.ident: c.before for c in plan.of_kind("vrrp gate") if c.after is not None and c.after.open}
    gates = []
    for gate in desired.gates:
        now = coming.get(gate.ident, gate) if gate.ident in coming else gate
        if now is not None:
            gates.append(now)
    keepalived = desired.keepalived
    change = next(iter(plan.of_kind("keepalived config")), None)
    if change is not None and not _releases(plan):
        keepalived = change.before
    return dataclasses.replace(desired, gates=tuple(gates), keepalived=keepalived)


__all__ = ["before_announcing", "check", "steps"]
