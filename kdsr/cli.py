"""The `kdsr` command line.  Commands only; the work is in kdsr.operations."""

from __future__ import annotations

import json
import sys
import time

import click

from kdsr import operations, receipt, service_view
from kdsr.commands import maglev as maglev_report
from kdsr.compile import CompileCache
from kdsr.compile.checks import warnings_for
from kdsr.errors import EXIT_CHANGES, EXIT_ERROR, EXIT_OK, EXIT_USAGE, IntentError, KdsrError, UsageError
from kdsr.health import CHECK_INTERVAL, control
from kdsr.health.drain import set_drain
from kdsr.kernel import KernelError
from kdsr.kernel.state import StateStore
from kdsr.plan_format import applied_json, render_json, render_text
from kdsr.privilege import require_net_admin
from kdsr.wording import counted

EPILOG_EXIT_CODES = (
    "Exit codes: 0 ok, 1 kernel or runtime error, 2 changes pending (plan --detailed-exitcode), "
    "3 invalid intent, 4 usage (unknown or ambiguous node), 5 locked, 6 apply failed and was rolled back, "
    "7 the kernel lacks a module the intent needs, 8 a kdsr-named object exists that kdsr did not create (--adopt), "
    "9 needs root (CAP_NET_ADMIN), 10 a saved plan is stale (apply --plan-file)."
)


def _kernel(store: StateStore | None = None):
    """The real kernel; with ``store``, table reads are kept in its directory
    while the nftables generation says they are current (kernel/nft_cache.py)."""
    from kdsr.kernel.system import SystemKernel

    return SystemKernel(store.directory if store is not None else None)


def _warnings(intent, cache: CompileCache | None = None) -> list[str]:
    return [str(problem) for problem in warnings_for(intent, cache)]


def _load(path: str, text: str | None = None, reloader=None, cache: CompileCache | None = None):
    """The intent at ``path``; ``text`` is its content when already read;
    ``reloader`` (kdsr/intent/reload.py) when the same file is loaded again and again;
    ``cache``: the CompileCache of the compiles that follow (the warnings size their selectors)."""
    from kdsr.intent import load_intent, parse_intent

    if reloader is not None:
        intent = reloader.load(path)
    else:
        intent = load_intent(path) if text is None else parse_intent(text, path)
    # Warnings go to stderr so that `plan --json` stays parseable.
    for warning in _warnings(intent, cache):
        click.echo(f"warning: {warning}", err=True)
    return intent


def _unchanged(obj: Context, kernel, intent_file: str, text: str, node: str | None):
    """The empty plan of an intent unchanged since kdsr last verified the
    kernel against it, without validating or compiling (kdsr/receipt.py);
    None when anything may differ."""
    found = receipt.unchanged(obj.store, kernel, intent_file, text.encode(), node)
    if found is not None:
        for warning in found.warnings:
            click.echo(f"warning: {warning}", err=True)
    return found


def _record_receipt(
    obj: Context, kernel, intent_file: str, text: str, node: str | None, prepared, warnings: list[str] | None = None
) -> None:
    """Under the lock, right after kdsr verified the kernel against ``prepared``;
    ``warnings``: the intent's, when the caller already has them."""
    inputs = receipt.inputs_digest(
        intent_file, text.encode(), node, prepared.node, kernel, obj.store, down=prepared.down
    )
    if warnings is None:
        warnings = _warnings(prepared.intent, obj.compile_cache)
    receipt.record(obj.store, kernel, node, inputs, prepared.desired, prepared.plan.notes, warnings, obj.receipt_parts)


def _fail(exc: Exception) -> None:
    if isinstance(exc, IntentError):
        for problem in exc.problems:
            click.echo(f"error: {problem}", err=True)
        click.echo(f"{counted(len(exc.problems), 'problem')}; nothing was changed.", err=True)
    else:
        click.echo(f"error: {exc}", err=True)
    code = getattr(exc, "exit_code", EXIT_ERROR)
    sys.exit(code)


class Context:
    def __init__(self, state_dir: str | None, wait: float) -> None:
        self.store = StateStore(state_dir)
        self.wait = wait
        # One per command: its warnings, plan and receipt size the same
        # selectors; `kdsr run` keeps it for the daemon's life.
        self.compile_cache = CompileCache()
        # The receipt's encoded parts, reused as compile's objects are.
        self.receipt_parts = receipt.Parts()


STATE_DIR_HELP = "Where kdsr records what it owns (default /var/lib/kdsr)."
WAIT_HELP = "Seconds to wait for another kdsr run's lock."


def _set_state_dir(ctx: click.Context, _param: click.Parameter, value: str | None) -> None:
    if value is not None:
        ctx.find_object(Context).store = StateStore(value)


def _set_wait(ctx: click.Context, _param: click.Parameter, value: float | None) -> None:
    if value is not None:
        ctx.find_object(Context).wait = value


def global_options(command):
    """``--state-dir`` and ``--wait`` after the subcommand too (``kdsr apply x.json
    --wait 5``), as well as before it; given after, they win."""
    command = click.option(
        "--state-dir", default=None, expose_value=False, callback=_set_state_dir, help=STATE_DIR_HELP
    )(command)
    return click.option("--wait", type=float, default=None, expose_value=False, callback=_set_wait, help=WAIT_HELP)(
        command
    )


@click.group(epilog=EPILOG_EXIT_CODES)
@click.option("--state-dir", envvar="KDSR_STATE_DIR", default=None, help=STATE_DIR_HELP)
@click.option("--wait", default=0.0, type=float, show_default=True, help=WAIT_HELP)
@click.version_option(package_name="kdsr")
@click.pass_context
def main(ctx: click.Context, state_dir: str | None, wait: float) -> None:
    """kdsr: Direct Server Return load balancing compiled into the Linux kernel.

    \b
    kdsr validate examples/l2-web.json
    kdsr plan examples/l2-web.json --node lb1
    kdsr apply examples/l2-web.json --node lb1
    """
    ctx.obj = Context(state_dir, wait)


@main.command(epilog="Example: kdsr validate examples/l2-web.json")
@click.argument("intent_file", type=click.Path())
def validate(intent_file: str) -> None:
    """Check an intent file (schema and cross-object rules); touches nothing."""
    try:
        intent = _load(intent_file)
    except KdsrError as exc:
        _fail(exc)
    click.echo(
        f"{intent_file}: valid ({counted(len(intent.services), 'service')}, {counted(len(intent.pools), 'pool')}, "
        f"{counted(len(intent.load_balancers), 'load balancer')}, {counted(len(intent.servers), 'server')})"
    )


DRY_RUN_HELP = "Print the plan and write nothing (not even kdsr's records)."
JSON_HELP = "Print the plan and what was done as JSON (schemas/plan.schema.json)."


ADOPT_HELP = "Take over kdsr-named links and IPVS services kdsr has no record of creating (e.g. a lost state dir)."


@main.command(epilog="Example: kdsr plan examples/l2-web.json --node lb1 --detailed-exitcode\n\n" + EPILOG_EXIT_CODES)
@click.argument("intent_file", type=click.Path())
@click.option("--node", help="Which node of the intent this host is (default: the one whose address is local).")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON (schemas/plan.schema.json).")
@click.option("--detailed-exitcode", is_flag=True, help="Exit 2 when changes are pending, 0 when none.")
@click.option(
    "--out",
    "out",
    type=click.Path(dir_okay=False),
    help="Also save the plan (with the intent) to this file, for `kdsr apply --plan-file`.",
)
@global_options
@click.pass_obj
def plan(
    obj: Context, intent_file: str, node: str | None, as_json: bool, detailed_exitcode: bool, out: str | None
) -> None:
    """Show what apply would change on this node (a dry run; writes nothing to the kernel)."""
    from kdsr import saved_plan
    from kdsr.intent.load import read_intent_text

    try:
        require_net_admin("plan", "reads this host's nftables, IPVS and link state")
        # Read once: the plan (and a saved plan) is of exactly this text.
        text = read_intent_text(intent_file)
        kernel = _kernel(obj.store)
        # A saved plan carries kdsr's full plan; otherwise an unchanged intent needs no compile.
        prepared = None if out else _unchanged(obj, kernel, intent_file, text, node)
        if prepared is None:
            prepared = operations.prepare(
                _load(intent_file, text, cache=obj.compile_cache), node, kernel, obj.store, cache=obj.compile_cache
            )
        if out:
            saved_plan.save(out, prepared, text, intent_file)
    except (KdsrError, KernelError, OSError) as exc:
        _fail(exc)
    click.echo((render_json if as_json else render_text)(prepared.plan, intent_file), nl=False)
    if out:
        click.echo(
            f"Saved to {out}: `kdsr apply --plan-file {out}` applies exactly this plan, or refuses it if the "
            "kernel changed meanwhile.",
            err=True,
        )
    if detailed_exitcode and not prepared.plan.empty:
        sys.exit(EXIT_CHANGES)
    sys.exit(EXIT_OK)


@main.command(
    epilog="Example: kdsr apply examples/l2-web.json --node lb1\n\n"
    "Reviewed first: kdsr plan examples/l2-web.json --node lb1 --out lb1.plan; kdsr apply --plan-file lb1.plan"
    "\n\n" + EPILOG_EXIT_CODES
)
@click.argument("intent_file", type=click.Path(), required=False)
@click.option("--node", help="Which node of the intent this host is (default: the one whose address is local).")
@click.option("--dry-run", is_flag=True, help="Print the plan and write nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
@click.option("--adopt", is_flag=True, help=ADOPT_HELP)
@click.option(
    "--plan-file",
    type=click.Path(dir_okay=False),
    help="Apply a plan saved by `kdsr plan --out` (instead of INTENT_FILE); refused if the kernel changed since.",
)
@global_options
@click.pass_obj
def apply(
    obj: Context,
    intent_file: str | None,
    node: str | None,
    dry_run: bool,
    as_json: bool,
    adopt: bool,
    plan_file: str | None,
) -> None:
    """Make this node's kernel state match the intent: plan, then apply atomically where the kernel allows."""
    from kdsr import saved_plan
    from kdsr.intent.load import read_intent_text

    def render(plan, result=None) -> None:
        """The plan, and (--json) what was done with it in the same document."""
        if as_json:
            fields = {"command": "apply", "dry_run": dry_run, "applied": applied_json(result)}
            click.echo(render_json(plan, intent_file, fields), nl=False)
        else:
            click.echo(render_text(plan, intent_file), nl=False)

    result = None
    try:
        if (intent_file is None) == (plan_file is None):
            raise UsageError("give either INTENT_FILE or --plan-file FILE (a plan saved by `kdsr plan --out`)")
        require_net_admin("apply", "changes this host's nftables, IPVS, links, addresses and sysctls")
        saved = None
        if plan_file is not None:
            saved = saved_plan.load(plan_file)
            if node is not None and node != saved.node:
                raise UsageError(f"{plan_file} was planned for node {saved.node}, not {node}")
            node, intent_file = saved.node, saved.source
            intent = _load(saved.source, saved.intent_text, cache=obj.compile_cache)
        else:
            text = read_intent_text(intent_file)
            intent = None
        # A saved plan is checked against the kernel in full; --adopt changes ownership.
        receipts = saved is None and not adopt
        kernel = _kernel(obj.store)
        if dry_run:
            if receipts and (same := _unchanged(obj, kernel, intent_file, text, node)):
                render(same.plan)
                return
            intent = intent or _load(intent_file, text, cache=obj.compile_cache)
            prepared = operations.prepare(intent, node, kernel, obj.store, adopt=adopt, cache=obj.compile_cache)
            if saved is not None:
                saved_plan.check_fresh(saved, prepared)
            render(prepared.plan)
            return
        with obj.store.lock(obj.wait):
            if receipts and (same := _unchanged(obj, kernel, intent_file, text, node)):
                render(same.plan)
                return
            intent = intent or _load(intent_file, text, cache=obj.compile_cache)
            prepared = operations.prepare(intent, node, kernel, obj.store, adopt=adopt, cache=obj.compile_cache)
            if saved is not None:
                saved_plan.check_fresh(saved, prepared)  # under the lock: no kdsr run can slip in between
            if not as_json:
                click.echo(render_text(prepared.plan, intent_file), nl=False)  # the plan first, then its apply
            if not prepared.plan.empty:
                receipt.forget(obj.store, node)
                result = operations.apply(prepared, kernel, obj.store)
            if receipts:
                _record_receipt(obj, kernel, intent_file, text, node, prepared)
    except (KdsrError, KernelError) as exc:
        _fail(exc)
    if as_json:
        render(prepared.plan, result)
    elif result is not None:
        if result.proved_by_generation:
            # kdsr/kernel/nft_cache.py: no other nftables commit came between the read and this one.
            how = "read back and verified (map elements as sent: the ruleset generation moved by this commit only)"
        elif result.ipvs_listed_again:
            # kdsr/apply.py _ipvs_read_back: IPVS has no generation; the steps wrote only these.
            how = (
                f"read back and verified (IPVS: the {result.ipvs_listed_again} services written, listed again; "
                "the others as the plan read them)"
            )
        else:
            how = "read back and verified"
        click.echo(f"{_applied_words(result)[:-1]}; {how}.")
        for note in result.notes:
            click.echo(f"Note: {note}")


@main.command(epilog="Example: kdsr show --service web --interval 2")
@click.argument("intent_file", required=False, type=click.Path())
@click.option("--node", help="Limit owned addresses and sysctls to this node's records.")
@click.option("--service", "services", multiple=True, metavar="NAME", help="Only this service (a pattern: 'web*').")
@click.option("--vip", "vips", multiple=True, metavar="ADDRESS", help="Only the services of this VIP.")
@click.option("--server", "servers", multiple=True, metavar="SERVER", help="Only this server (address or node).")
@click.option(
    "--interval",
    type=click.FloatRange(min=0.1, max=3600),
    help="Read the counters twice, SECONDS apart, and show packet and bit rates.",
)
@click.option("--json", "as_json", is_flag=True, help="The services, their servers and the kernel report as JSON.")
@global_options
@click.pass_obj
def show(
    obj: Context,
    intent_file: str | None,
    node: str | None,
    services: tuple[str, ...],
    vips: tuple[str, ...],
    servers: tuple[str, ...],
    interval: float | None,
    as_json: bool,
) -> None:
    """Each service's VIP, ports, pool and servers (up, down or drained, and
    why; weight; share of the table), with packet and byte counters, and
    what else kdsr owns on this host.

    Many services print a line each; --service, --vip or --server show their
    servers.  Weights come from the running `kdsr run`, or from INTENT."""
    try:
        require_net_admin("show", "reads this host's nftables, IPVS and link state")
        intent = None
        if intent_file is not None:
            from kdsr.intent.load import read_intent_text

            intent = _load(intent_file, read_intent_text(intent_file))
        which = service_view.ShowFilter(services=services, vips=vips, servers=servers)
        report = _show_report(obj, node, intent)
        before, elapsed = None, None
        if interval is not None:
            time.sleep(interval)
            before, report = report, _show_report(obj, node, intent)
            elapsed = max(report["read_at"] - before["read_at"], 1e-3)
    except (KdsrError, KernelError) as exc:
        _fail(exc)
    document = operations.show_document(report, which, before, elapsed)
    if as_json:
        _echo_json(document)
    else:
        click.echo(operations.format_show(report, document, which).rstrip("\n"))


def _echo_json(document: dict, pieces: int = 4096) -> None:
    """``document`` as indented JSON on stdout, written as it is encoded: at
    10,000 VIPs `kdsr show --json` is tens of MB, which json.dumps would
    hold whole, beside the pieces it joins (and click.echo copies it once
    more to strip colours)."""
    encoded: list[str] = []
    for piece in json.JSONEncoder(indent=2).iterencode(document):
        encoded.append(piece)
        if len(encoded) == pieces:
            click.echo("".join(encoded), nl=False)
            encoded.clear()
    click.echo("".join(encoded))


def _show_report(obj: Context, node: str | None, intent) -> dict:
    """A running `kdsr run` answers from its own loop: what it shows is what
    it has applied, never a view an apply has not reached yet."""
    for name in [node] if node else obj.store.nodes():
        answer = control.request(obj.store, name, {"command": "show"})
        if answer is not None:
            report = answer["report"]
            if intent is not None and not report.get("pools"):
                report["pools"] = operations.show_pools(intent)
            return report
    return operations.show(_kernel(), obj.store, node, intent)


@main.command(epilog="Example: kdsr reload --node lb1")
@click.option("--node", help="The node whose `kdsr run` to reload (default: the one running here).")
@global_options
@click.pass_obj
def reload(obj: Context, node: str | None) -> None:
    """Have the running `kdsr run` load its intent file again and apply it; says whether it took.

    Unlike SIGHUP, it waits for the result: an intent that fails validation
    is reported here (exit 3) and the daemon keeps the one it runs."""
    try:
        answer = None
        for name in [node] if node else obj.store.nodes():
            answer = control.request(obj.store, name, {"command": "reload"})
            if answer is not None:
                break
        if answer is None:
            raise UsageError(f"no kdsr run is running for {node or 'any node'} with state in {obj.store.directory}")
    except (KdsrError, KernelError) as exc:
        _fail(exc)
    click.echo(f"Reloaded: kdsr run for node {name} runs the intent file as it is now.")


@main.command(epilog="Example: kdsr destroy --node s1 --dry-run\n\n" + EPILOG_EXIT_CODES)
@click.argument("intent_file", type=click.Path(), required=False)
@click.option(
    "--node",
    help="The node whose kdsr state to remove (default: with INTENT_FILE, the node whose address is local, "
    "as apply picks it; without, the one node recorded here).",
)
@click.option("--dry-run", is_flag=True, help="Print what would be removed and write nothing.")
@click.option("--auto-approve", is_flag=True, help="Do not ask for confirmation on a terminal (for scripts).")
@click.option("--json", "as_json", is_flag=True, help=JSON_HELP)
@global_options
@click.pass_obj
def destroy(
    obj: Context, intent_file: str | None, node: str | None, dry_run: bool, auto_approve: bool, as_json: bool
) -> None:
    """Remove exactly what kdsr owns on this node and restore the sysctls it changed.

    On a terminal it shows the plan and asks before it writes (--auto-approve
    skips that); from a script it goes ahead, as before."""
    from kdsr.intent.load import read_intent_text

    result = None
    try:
        require_net_admin("destroy", "changes this host's nftables, IPVS, links, addresses and sysctls")
        kernel = _kernel(obj.store)
        if intent_file is not None:
            name = operations.select_node(_load(intent_file, read_intent_text(intent_file)), node, kernel)
        else:
            name = operations.destroy_node_name(node, obj.store)
        prepared = operations.prepare_destroy(name, kernel, obj.store)
        ask = not (dry_run or auto_approve or as_json or prepared.plan.empty) and _on_terminal()
        if not as_json and (dry_run or ask):
            click.echo(render_text(prepared.plan), nl=False)
        if ask and not _confirmed(f"Remove everything kdsr owns for node {name} on this host?"):
            click.echo("Destroy cancelled; nothing was changed.", err=True)
            sys.exit(EXIT_ERROR)
        if not dry_run:
            with obj.store.lock(obj.wait):
                confirmed = prepared.plan
                prepared = operations.prepare_destroy(name, kernel, obj.store)
                if ask and render_json(prepared.plan) != render_json(confirmed):
                    raise KdsrError(
                        "the kernel or kdsr's record changed while you were asked; nothing was changed. "
                        "Run `kdsr destroy` again to see the new plan."
                    )
                if not as_json and not ask:
                    click.echo(render_text(prepared.plan), nl=False)
                if not prepared.plan.empty:
                    result = operations.apply(prepared, kernel, obj.store)
    except (KdsrError, KernelError) as exc:
        _fail(exc)
    if as_json:
        fields = {"command": "destroy", "dry_run": dry_run, "applied": applied_json(result)}
        click.echo(render_json(prepared.plan, intent_file or "", fields), nl=False)
    elif result is not None:
        click.echo(f"Destroyed what kdsr owned for node {name}. {_applied_words(result)}")
        for note in result.notes:
            click.echo(f"Note: {note}")


def _on_terminal() -> bool:
    return sys.stdin.isatty()


def _confirmed(question: str) -> bool:
    """Terraform's habit: only the word "yes" goes ahead."""
    answer = click.prompt(f"{question}\n  Only 'yes' will be accepted", default="", show_default=False)
    return answer.strip() == "yes"


@main.command(
    name="maglev",
    epilog="Example: kdsr maglev examples/l2-web.json --service web --without s3",
)
@click.argument("intent_file", type=click.Path())
@click.option("--service", "service_name", required=True, help="The service whose table to show.")
@click.option(
    "--without", "without", metavar="SERVER", help="Also show what removing this server (address or node) moves."
)
@click.option("--with", "with_", metavar="ADDRESS", help="Also show what adding a server (weight 1) moves.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def maglev_command(intent_file: str, service_name: str, without: str | None, with_: str | None, as_json: bool) -> None:
    """Per-server share of a service's Maglev table, and the flows a change would move (reads the intent only)."""
    try:
        data = maglev_report.report(_load(intent_file), service_name, without, with_)
    except KdsrError as exc:
        _fail(exc)
    click.echo(json.dumps(data, indent=2, sort_keys=True) if as_json else maglev_report.format_report(data), nl=False)


@main.command(
    name="run",
    epilog="Example: kdsr run examples/l2-web.json --node lb1 --metrics 127.0.0.1:9469\n\n"
    "SIGTERM stops it and leaves the kernel as the last apply made it; SIGHUP reloads the intent "
    "(an edit of the file takes effect only then).",
)
@click.argument("intent_file", type=click.Path())
@click.option(
    "--node", help="Which load balancer of the intent this host is (default: the one whose address is local)."
)
@click.option(
    "--metrics",
    "listen",
    metavar="ADDRESS:PORT",
    help="Serve Prometheus metrics on /metrics (off by default); :9469 listens on every address, "
    "127.0.0.1:9469 or [::1]:9469 on one.",
)
@click.option(
    "--check-interval",
    type=click.FloatRange(min=0),
    default=CHECK_INTERVAL,
    show_default=True,
    metavar="SECONDS",
    help="Check this often that kdsr's kernel objects are as it last applied them, and repair what drifted (0: never).",
)
@click.option("--adopt", is_flag=True, help=ADOPT_HELP)
@click.option(
    "--log-format",
    type=click.Choice(["text", "json"]),
    default="text",
    show_default=True,
    help="Log lines on stderr: key=value text, or one JSON object per line (with a level) for log shippers.",
)
@global_options
@click.pass_obj
def run_command(
    obj: Context,
    intent_file: str,
    node: str | None,
    listen: str | None,
    check_interval: float,
    adopt: bool,
    log_format: str,
) -> None:
    """Apply the intent, probe every server (health), apply what health changes and repair drift, until stopped."""
    from kdsr.commands.health import run_daemon
    from kdsr.intent.reload import Reloader

    # A reload (SIGHUP) validates and builds only the entries that changed.
    reloader = Reloader()

    warned: list = [None, []]  # the intent the warnings are of, and them

    def verified(prepared) -> None:
        # The file as the daemon last loaded it: after an edit not yet
        # reloaded, `kdsr apply` of the new text misses the receipt, as it must.
        if reloader.text is None:
            return
        if warned[0] is not prepared.intent:  # once per intent, not per health event
            warned[:] = [prepared.intent, _warnings(prepared.intent, obj.compile_cache)]
        _record_receipt(obj, kernel, intent_file, reloader.text, node, prepared, warned[1])

    try:
        require_net_admin("run", "changes this host's nftables, IPVS, links, addresses and sysctls")
        kernel = _kernel(obj.store)
        code = run_daemon(
            lambda: _load(intent_file, reloader=reloader, cache=obj.compile_cache),
            node,
            kernel,
            obj.store,
            max(obj.wait, 10.0),
            adopt,
            listen,
            # As `kdsr apply --adopt`, which records no receipt either.
            verified=None if adopt else verified,
            check_interval=check_interval,
            log_format=log_format,
            compile_cache=obj.compile_cache,
        )
    except (KdsrError, KernelError) as exc:
        _fail(exc)
    sys.exit(code)


def _drain(
    obj: Context,
    intent_file: str,
    server: str,
    node: str | None,
    drained: bool,
    force: bool = False,
    dry_run: bool = False,
    as_json: bool = False,
) -> None:
    from kdsr.intent.load import read_intent_text

    command = "drain" if drained else "undrain"
    fields = {"command": command, "server": server, "dry_run": dry_run}
    try:
        require_net_admin(command, "changes this host's nftables, IPVS, links, addresses and sysctls")
        text = read_intent_text(intent_file)
        kernel = _kernel(obj.store)
        intent = _load(intent_file, text)
        name = operations.select_node(intent, node, kernel)
        # A running `kdsr run` for the node does it in its own loop, so its
        # health view, metrics and the kernel change together.
        message = {"command": command, "server": server, "force": force, "dry_run": dry_run}
        answer = control.request(obj.store, name, message)
        if answer is not None:
            if as_json:
                click.echo(
                    json.dumps({**answer["plan"], **fields, "applied": answer["applied"]}, indent=2, sort_keys=True)
                )
            else:
                click.echo(answer["text"], nl=False)
                _said_drain(server, name, drained, dry_run, answer["applied"] and answer, via_daemon=True)
            return
        # The receipt of the drained state, as `kdsr apply` would leave it:
        # the next apply of the same file is answered from it.
        outcome = set_drain(
            intent,
            name,
            server,
            drained,
            kernel,
            obj.store,
            obj.wait,
            verified=lambda prepared: _record_receipt(obj, kernel, intent_file, text, node, prepared),
            force=force,
            dry_run=dry_run,
        )
    except (KdsrError, KernelError) as exc:
        _fail(exc)
    plan = outcome.prepared.plan
    if as_json:
        click.echo(render_json(plan, intent_file, {**fields, "applied": applied_json(outcome.result)}), nl=False)
        return
    click.echo(render_text(plan, intent_file), nl=False)
    result = outcome.result
    _said_drain(server, name, drained, dry_run, result and {"steps": len(result.steps), "writes": result.writes})


def _said_drain(server: str, node: str, drained: bool, dry_run: bool, applied, via_daemon: bool = False) -> None:
    """What drain or undrain did, in a sentence."""
    command = "drain" if drained else "undrain"
    if dry_run:
        click.echo(f"Dry run: {server} was not {command}ed on {node}; nothing was written.")
        return
    done = (
        f"Drained {server} on {node}: it takes no new flows (open ones go on where flow pinning or "
        "IPVS's connection table holds them); kdsr remembers the drain until `kdsr undrain`."
        if drained
        else f"Undrained {server} on {node}: it takes new flows again."
    )
    if via_daemon:
        done += " (Done by the running kdsr run, so its health view and metrics agree.)"
    if applied:
        steps, writes = applied["steps"], applied["writes"]
        steps = steps if isinstance(steps, int) else len(steps)
        done += f" Applied: {counted(steps, 'step')}, {counted(writes, 'kernel write')}."
    else:
        done += " No kernel change."
    click.echo(done)


def _applied_words(result) -> str:
    return f"Applied: {counted(len(result.steps), 'step')}, {counted(result.writes, 'kernel write')}."


@main.command(epilog="Example: kdsr drain examples/l2-web.json s3 --node lb1")
@click.argument("intent_file", type=click.Path())
@click.argument("server")
@click.option("--node", help="Which load balancer of the intent this host is.")
@click.option("--force", is_flag=True, help="Drain even if a service is left with no serving server.")
@click.option("--dry-run", is_flag=True, help=DRY_RUN_HELP)
@click.option("--json", "as_json", is_flag=True, help=JSON_HELP)
@global_options
@click.pass_obj
def drain(
    obj: Context, intent_file: str, server: str, node: str | None, force: bool, dry_run: bool, as_json: bool
) -> None:
    """Take SERVER (address or node) out of new-flow selection on this load balancer; remembered until undrain.

    Refused (exit 4, nothing changed) when it would leave a service with no
    serving server, unless --force."""
    _drain(obj, intent_file, server, node, True, force, dry_run, as_json)


@main.command(epilog="Example: kdsr undrain examples/l2-web.json s3 --node lb1")
@click.argument("intent_file", type=click.Path())
@click.argument("server")
@click.option("--node", help="Which load balancer of the intent this host is.")
@click.option("--dry-run", is_flag=True, help=DRY_RUN_HELP)
@click.option("--json", "as_json", is_flag=True, help=JSON_HELP)
@global_options
@click.pass_obj
def undrain(obj: Context, intent_file: str, server: str, node: str | None, dry_run: bool, as_json: bool) -> None:
    """Give a drained SERVER its slots back."""
    _drain(obj, intent_file, server, node, False, dry_run=dry_run, as_json=as_json)


def run() -> None:
    """Console entry point.

    Click exits 2 on a command-line mistake, and 2 means "changes pending" to
    a script using `plan --detailed-exitcode`; kdsr's usage code is 4.
    """
    try:
        main.main(standalone_mode=False)
    except click.UsageError as exc:
        exc.show()
        sys.exit(EXIT_USAGE)
    except click.Abort:
        click.echo("Aborted.", err=True)
        sys.exit(EXIT_ERROR)
