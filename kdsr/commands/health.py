"""`kdsr run`, `kdsr drain` and `kdsr undrain`: the CLI's health commands."""

from __future__ import annotations

import click

from kdsr import operations
from kdsr.errors import UsageError
from kdsr.health import CHECK_INTERVAL, metrics
from kdsr.health.daemon import Runner
from kdsr.intent.model import Intent
from kdsr.kernel.state import StateStore


def run_daemon(
    load,
    node: str | None,
    kernel,
    store: StateStore,
    wait: float,
    adopt: bool,
    listen: str | None,
    verified=None,
    check_interval: float = CHECK_INTERVAL,
) -> int:
    runner = Runner(load, node, kernel, store, wait=wait, adopt=adopt, verified=verified, check_interval=check_interval)
    runner.install_signals()
    runner.start()  # a bad intent raises here, before any kernel write
    if listen:

        def text() -> str:
            try:
                report = operations.show(kernel, store, runner.node)
            except Exception:  # counters are a bonus; health metrics still render
                report = None
            return metrics.render(runner.view(), runner.counters, report)

        server = metrics.serve(listen, text)
        runner.log("metrics", listen=f"{server.server_address[0]}:{server.server_address[1]}")
    return runner.run_forever()


def resolve_server(intent: Intent, server: str) -> str:
    """A pool member's address, or a server node's name, exactly as drains record it."""
    for pool in intent.pools:
        for member in pool.members:
            if server in (str(member.address), member.node):
                return server
    members = sorted({m.node or str(m.address) for p in intent.pools for m in p.members})
    raise UsageError(f"{intent.source}: {server!r} is no pool member's address or node. Members: {', '.join(members)}.")


def set_drain(
    intent: Intent, node: str | None, server: str, drained: bool, kernel, store: StateStore, wait: float, verified=None
):
    """``verified``: called with the plan, under the lock, once the kernel
    matches it (the CLI records its receipt there, as `kdsr apply` does)."""
    server = resolve_server(intent, server)
    with store.lock(wait):
        name = operations.select_node(intent, node, kernel)
        if intent.load_balancer(name) is None:
            raise UsageError(f"{intent.source}: drain on a load balancer; {name} is a server")
        state = store.load(name)
        (state.drained.add if drained else state.drained.discard)(server)
        store.save(state)
        prepared = operations.prepare(intent, name, kernel, store)
        click.echo(operations_plan_text(prepared), nl=False)
        if not prepared.plan.empty:
            operations.apply(prepared, kernel, store)
        if verified is not None:
            verified(prepared)
    return prepared


def operations_plan_text(prepared) -> str:
    from kdsr.plan_format import render_text

    return render_text(prepared.plan, prepared.intent.source if prepared.intent else "")
