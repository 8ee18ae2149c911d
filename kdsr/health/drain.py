"""Drain and undrain: a server out of (or back into) new-flow selection on one load balancer.

Used by the CLI when no daemon runs for the node, and by `kdsr run` itself
when one does (kdsr/health/control.py), so both decide the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

from kdsr import operations
from kdsr.compile.effective import effective_intent, unserved_services
from kdsr.errors import UsageError
from kdsr.intent.model import Intent
from kdsr.kernel.state import StateStore
from kdsr.wording import counted


def resolve_server(intent: Intent, server: str) -> str:
    """A pool member's address, or a server node's name, exactly as drains record it."""
    for pool in intent.pools:
        for member in pool.members:
            if server in (str(member.address), member.node):
                return server
    members = sorted({m.node or str(m.address) for p in intent.pools for m in p.members})
    raise UsageError(f"{intent.source}: {server!r} is no pool member's address or node. Members: {', '.join(members)}.")


@dataclass
class DrainOutcome:
    node: str
    server: str
    drained: bool
    prepared: operations.Prepared
    result: object | None  # kdsr.apply.ApplyResult; None: nothing applied (no change, or a dry run)


def set_drain(
    intent: Intent,
    node: str | None,
    server: str,
    drained: bool,
    kernel,
    store: StateStore,
    wait: float,
    verified=None,
    force: bool = False,
    dry_run: bool = False,
) -> DrainOutcome:
    """Record the drain (or undrain) of ``server`` on this load balancer and apply it.

    A drain that would leave a service with no serving server (every other
    server drained or down) is refused unless ``force``: nothing is recorded
    or written.  ``dry_run`` plans it and changes nothing.  ``verified``:
    called with the plan, under the lock, once the kernel matches it (the
    CLI records its receipt there, as `kdsr apply` does)."""
    server = resolve_server(intent, server)
    with store.lock(wait):
        name = operations.select_node(intent, node, kernel)
        if intent.load_balancer(name) is None:
            raise UsageError(f"{intent.source}: drain on a load balancer; {name} is a server")
        state = store.load(name)
        before = frozenset(state.drained)
        after = before | {server} if drained else before - {server}
        prepared = operations.prepare(intent, name, kernel, store, drained=after)
        if drained and not force:
            refuse_unserving(intent, name, prepared.down, before, server)
        if dry_run:
            return DrainOutcome(name, server, drained, prepared, None)
        # The record apply saves is the one prepare loaded: the drain goes there.
        prepared.state.drained = set(after)
        store.save(prepared.state)
        result = None
        if not prepared.plan.empty:
            result = operations.apply(prepared, kernel, store)
        if verified is not None:
            verified(prepared)
    return DrainOutcome(name, server, drained, prepared, result)


def refuse_unserving(
    intent: Intent, node: str, down: frozenset[tuple[str, str]], before: frozenset[str], server: str
) -> None:
    """Leaving a service with no server is a decision (--force), not an accident."""
    now = unserved_services(effective_intent(intent, down, before))
    after = unserved_services(effective_intent(intent, down, before | {server}))
    newly = sorted(set(after) - set(now))
    if newly:
        raise UsageError(
            f"{intent.source}: draining {server} on {node} would leave {counted(len(newly), 'service')} with no "
            f"serving server ({', '.join(f'{name}: {after[name]}' for name in newly)}). Nothing was changed. "
            "Bring a server back first, or pass --force to drain anyway."
        )
