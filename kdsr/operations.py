"""What each CLI command does, without the CLI: plan, apply, destroy, show.

Kept apart from cli.py so tests (and the health daemon later) can drive the
same paths with a fake kernel.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

from kdsr import collector, naming, service_view
from kdsr.apply import ApplyResult, apply_plan, check_modules
from kdsr.compile import CompileCache, compile_node, lb_ipvs
from kdsr.compile.announce import assignments
from kdsr.compile.effective import Effective, effective_intent, unserved_services, unserved_vips
from kdsr.compile.keepalived import group_of, vrrp_services
from kdsr.compile.lb_nft_l2 import TABLE_FAMILY, TABLE_NAME
from kdsr.compile.targets import targets_for
from kdsr.diff import BIRD_NOT_RUNNING, Plan, diff
from kdsr.errors import BirdUnavailableError, ForeignObjectError, KeepalivedUnavailableError, UsageError
from kdsr.health import status as health_status
from kdsr.intent.model import MONITOR_DSR, Intent, address_text
from kdsr.keepalived_text import parse_model as parse_keepalived
from kdsr.kernel import Kernel
from kdsr.kernel.bird import BirdError
from kdsr.kernel.keepalived import KeepalivedError
from kdsr.kernel.observe import keep_unchanged, observe
from kdsr.kernel.state import NodeState, StateStore
from kdsr.model import Desired, Observed


@dataclass
class Prepared:
    intent: Intent | None
    node: str
    desired: Desired
    state: NodeState
    plan: Plan
    down: frozenset[tuple[str, str]] = frozenset()  # the servers health reported down, as planned with


def select_node(intent: Intent, node: str | None, kernel: Kernel) -> str:
    """The node given, or the one node whose addresses are local here."""
    if node is not None:
        if node not in intent.node_names():
            known = ", ".join(intent.node_names())
            raise UsageError(f"{intent.source}: node {node!r} is not in the intent. Nodes: {known}.")
        return node
    local = kernel.links.local_addresses()
    candidates = []
    for lb in intent.load_balancers:
        if any(str(a.ip) in local for a in lb.addresses):
            candidates.append(lb.name)
    for server in intent.servers:
        if any(str(a.ip) in local for a in server.addresses):
            candidates.append(server.name)
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise UsageError(
            f"{intent.source}: no node of the intent has an address on this host; pass --node "
            f"({', '.join(intent.node_names())})"
        )
    raise UsageError(f"{intent.source}: several nodes match this host ({', '.join(candidates)}); pass --node")


def prepare(
    intent: Intent,
    node: str | None,
    kernel: Kernel,
    store: StateStore,
    adopt: bool = False,
    down: frozenset[tuple[str, str]] | None = None,
    drained: frozenset[str] | None = None,
    cache: CompileCache | None = None,
) -> Prepared:
    """Plan the node's changes.  Drains recorded with `kdsr drain` (or
    ``drained``, to plan a drain before recording it) and the servers health
    took out (``down``; by default those a running `kdsr run` reports) are
    applied as weight 0 (kdsr/compile/effective.py).  ``cache``: the
    caller's CompileCache, kept from one plan to the next (kdsr run)."""
    name = select_node(intent, node, kernel)
    state = store.load(name)
    if down is None:
        down = health_status.down_servers(health_status.live_view(store, name))
    if drained is None:
        drained = frozenset(state.drained)
    with collector.paused():  # builds the large, acyclic state (kdsr/collector.py)
        effective = effective_intent(intent, down, drained)
        desired = compile_node(effective.intent, name, withdraw=unserved_vips(effective, cache), cache=cache)
        _check_interfaces(intent, name, kernel)
        # Before reading the kernel: a plan for a kernel that cannot carry it
        # says so (exit 7) instead of listing what apply would then refuse.
        check_modules(desired, kernel)
        observed = observe(kernel, desired, state)
        observed = _check_foreign(intent, desired, observed, state, adopt)
        plan = diff(desired, observed)
        keep_unchanged(kernel, desired, observed, plan.tables)
        plan.notes = (
            announcement_notes(effective.intent, desired)
            + vrrp_notes(effective.intent, desired)
            + probe_notes(effective.intent, name)
        )
        if intent.load_balancer(name) is not None:
            plan.service_changes = service_changes(plan, effective, down, drained)
            plan.warnings = [f"service {name} {why}" for name, why in sorted(unserved_services(effective).items())]
    _check_bird_ready(plan, kernel)
    _mark_bird_stopped(plan, kernel)
    _check_keepalived_ready(plan, kernel)
    _mark_keepalived_stopped(plan, kernel)
    return Prepared(intent=intent, node=name, desired=desired, state=state, plan=plan, down=down)


def service_changes(
    plan: Plan, effective: Effective, down: frozenset[tuple[str, str]], drained: frozenset[str]
) -> dict:
    """The plan in the operator's terms (kdsr/service_view.py): services added,
    removed or moved, and each server's share of its pool's table before and
    after, with its state in the intent."""
    table = next((t for t in plan.tables if (t.family, t.name) == (TABLE_FAMILY, TABLE_NAME)), None)
    if table is None:
        return {"services": [], "pools": []}
    members: dict[tuple[str, int], dict[str, str]] = {}
    for pool in effective.intent.pools:
        for member in pool.members:
            address = address_text(member.address)
            if (pool.name, address) in down and address in effective.out.get(pool.name, ()):
                state = "down"
            elif address in drained or (member.node is not None and member.node in drained):
                state = "drained"
            else:
                state = f"weight {member.weight}"
            if member.node:
                state = f"{state} ({member.node})"
            per_family = members.setdefault((pool.name, member.address.version), {})
            per_family[address] = state
            if member.mac:
                per_family[member.mac] = state
    return service_view.summarise(table.observed, table.desired, members)


def announcement_notes(intent: Intent, desired: Desired) -> list[str]:
    """For a BGP load balancer: every VIP's HA assignment (the same on every
    node) and what this node announces of it."""
    if desired.bird is None:
        return []
    mine = {r.prefix: r for r in desired.bird.routes}
    withdrawn = dict(desired.bird.withdrawn)
    lines = ["BGP announcements (every load balancer computes the same assignment):"]
    for service, assignment in assignments(intent):
        prefix = f"{service.vip}/{service.vip.max_prefixlen}"
        role = assignment.role_of(desired.node)
        if prefix in withdrawn:
            here = f"withdrawn here ({withdrawn[prefix]})"
        elif role is None:
            here = "not announced here"
        else:
            here = f"announced here as {role}" + (f", AS path +{mine[prefix].prepend}" if mine[prefix].prepend else "")
        lines.append(f"  {prefix}  {assignment.describe()}  -> {here}  # {assignment.pointer}")
    return lines


def vrrp_notes(intent: Intent, desired: Desired) -> list[str]:
    """For a VRRP load balancer: every VIP it may own, its priority among
    the VIP's group (the same order on every node), and its gate."""
    if desired.keepalived is None:
        return []
    withdrawn = dict(desired.keepalived.withdrawn)
    mine = {i.vip.split("/")[0]: i for i in desired.keepalived.instances}
    lines = ["VRRP (keepalived elects each VIP's owner; the first listed has the highest priority):"]
    for service in vrrp_services(intent):
        vip = address_text(service.vip)
        instance = mine.get(vip)
        if instance is None:
            continue
        group = " > ".join(group_of(intent, service))
        state = f"given up here ({withdrawn[vip]})" if vip in withdrawn else f"priority {instance.priority} here"
        lines.append(
            f"  {instance.vip}  {instance.name} (virtual router {instance.virtual_router_id}): {group}"
            f"  -> {state}  # {instance.pointer}"
        )
    return lines


def probe_notes(intent: Intent, node: str) -> list[str]:
    """For a load balancer with health monitors: what each monitor probes
    (`kdsr run` sends these), so a reviewer sees the port and path before a
    server is judged by them."""
    if intent.load_balancer(node) is None:
        return []
    per_monitor: dict[str, list] = {}
    for target in targets_for(intent):
        per_monitor.setdefault(target.monitor.pointer, []).append(target)
    if not per_monitor:
        return []
    lines = ["Health checks (kdsr run probes each server this way):"]
    for pointer, targets in sorted(per_monitor.items()):
        first = targets[0]
        if first.monitor.mode == MONITOR_DSR:
            how = f"{first.address}:{first.port} (service {first.service}) through each server's DSR path"
        else:
            how = f"each server's own address, port {first.port}"
        servers = len({t.server for t in targets})
        lines.append(
            f"  {first.monitor.type} {how}, {servers} server{'' if servers == 1 else 's'}"
            f" of pool {first.pool}  # {pointer}"
        )
    return lines


def _check_bird_ready(plan: Plan, kernel: Kernel) -> None:
    """A plan that changes BIRD's fragment needs BIRD, running, including it;
    one that empties it (the node no longer announces) does not: a stopped
    BIRD announces nothing (apply writes the file without a reload)."""
    for change in plan.of_kind("bird config"):
        want = change.after
        if not (want.routes or want.sessions or want.router_id):
            continue
        try:
            kernel.bird.ready(want.config, want.fragment, want.socket)
        except BirdError as exc:
            raise BirdUnavailableError(f"{exc}") from exc


def _check_keepalived_ready(plan: Plan, kernel: Kernel) -> None:
    """A plan that writes keepalived's fragment needs keepalived installed,
    running and including it; one that removes it (the node no longer owns
    a VIP by VRRP) does not: a stopped keepalived owns nothing."""
    for change in plan.of_kind("keepalived config"):
        want = change.after
        if want is None:
            continue
        try:
            track_dirs = tuple(sorted({i.track_file.rsplit("/", 1)[0] or "/" for i in want.instances}))
            kernel.keepalived.ready(want.config, want.fragment, want.pid_file, track_dirs)
        except KeepalivedError as exc:
            raise KeepalivedUnavailableError(f"{exc}") from exc


def _mark_keepalived_stopped(plan: Plan, kernel: Kernel) -> None:
    """A plan that removes the fragment while keepalived is not running
    removes it without a reload (kdsr/vrrp_apply.py): say so before it happens."""
    for change in plan.of_kind("keepalived config"):
        have = change.before
        if change.after is None and have is not None and not kernel.keepalived.running(have.pid_file):
            plan.notes.append(
                f"keepalived is not running (no live pid in {have.pid_file}): {have.fragment} will be removed "
                "without a reload; a stopped keepalived owns no VIP."
            )


def _check_foreign(intent: Intent, desired: Desired, observed: Observed, state: NodeState, adopt: bool) -> Observed:
    """Objects kdsr wants that already exist without kdsr's record of making
    them (a link with a kdsr name, an IPVS service on a kdsr VIP) are someone
    else's until the user says otherwise with --adopt."""
    wanted_links = {link.name: link for link in desired.links}
    links = sorted(observed.foreign_links & set(wanted_links))
    services = sorted(observed.foreign_ipvs)
    if not (links or services or observed.foreign_xdp):
        return observed
    if adopt:
        state.links.update(links)
        state.ipvs.update(services)
        if observed.foreign_xdp and desired.xdp is not None:
            state.xdp.add(desired.xdp.interface)  # apply replaces that program with kdsr's
        return dataclasses.replace(
            observed, foreign_links=observed.foreign_links - set(links), foreign_ipvs=frozenset(), foreign_xdp=""
        )
    lines = [f"link {n} ({wanted_links[n].pointer})" for n in links]
    lines += [f"IPVS service {i}" for i in services]
    lines += [observed.foreign_xdp] if observed.foreign_xdp else []
    raise ForeignObjectError(
        f"{intent.source}: these exist already, but kdsr has no record of creating them: "
        + "; ".join(lines)
        + ". kdsr changes only what it made. If they are left over from kdsr (e.g. its state directory was lost), "
        "run again with --adopt; otherwise remove them or change the intent."
    )


def _check_interfaces(intent: Intent, node: str, kernel: Kernel) -> None:
    lb = intent.load_balancer(node)
    if lb is not None and not kernel.links.link_exists(lb.interface):
        raise UsageError(
            f"{intent.source}: {lb.pointer}/interface: interface {lb.interface!r} does not exist on this host. "
            "Name the load balancer's front interface here."
        )
    server = intent.server(node)
    if server is not None and not kernel.links.link_exists(server.interface):
        raise UsageError(
            f"{intent.source}: {server.pointer}/interface: interface {server.interface!r} does not exist on this "
            "host. Name the server's uplink interface here."
        )


def apply(prepared: Prepared, kernel: Kernel, store: StateStore) -> ApplyResult:
    with collector.paused():  # batches of up to 271,000 elements (kdsr/collector.py)
        return apply_plan(prepared.plan, prepared.desired, kernel, store, prepared.state)


def prepare_destroy(node: str, kernel: Kernel, store: StateStore) -> Prepared:
    state = store.load(node)
    # Nothing is desired; the observed side comes from what the state file
    # and the kdsr-owned table say is ours.
    desired = Desired(node=node, role="destroy")
    # A kdsr table no node claims (state directory lost) is this node's to
    # remove; one that another node's record claims never is.
    claimed_elsewhere = any(store.load(other).tables for other in store.nodes() if other != node)
    plan = diff(desired, observe(kernel, desired, state, orphans=not claimed_elsewhere))
    _mark_bird_stopped(plan, kernel)
    _mark_keepalived_stopped(plan, kernel)
    return Prepared(intent=None, node=node, desired=desired, state=state, plan=plan)


def _mark_bird_stopped(plan: Plan, kernel: Kernel) -> None:
    """A plan that empties the fragment while BIRD is not running writes it
    without a reload (apply.py): say so in the plan, before it happens."""
    for i, change in enumerate(plan.changes):
        want = change.after
        if change.kind != "bird config" or want.routes or want.sessions or want.router_id:
            continue
        if not kernel.bird.running(want.socket):
            plan.changes[i] = dataclasses.replace(change, reason=BIRD_NOT_RUNNING)
            plan.notes.append(
                f"BIRD is not running (no answer on {want.socket}): {want.fragment} will be emptied without a "
                "reload; a stopped BIRD announces nothing."
            )


def destroy_node_name(node: str | None, store: StateStore) -> str:
    if node:
        return node
    nodes = store.nodes()
    if len(nodes) == 1:
        return nodes[0]
    if not nodes:
        raise UsageError(f"no kdsr state in {store.directory}; pass --node to destroy by name")
    raise UsageError(f"state for several nodes in {store.directory} ({', '.join(nodes)}); pass --node")


def show(
    kernel: Kernel,
    store: StateStore,
    node: str | None,
    intent: Intent | None = None,
    ipvs_labels: dict[str, dict[str, str]] | None = None,
) -> dict:
    """What kdsr owns on this host now, with packet counters where the kernel
    has them (the "kernel" part of `kdsr show --json`; see
    service_view.read_listing for the nft rows, read_ipvs for IPVS's).
    ``intent``: the one applied (the daemon's, or the one `kdsr show INTENT`
    names), for each member's weight and node in "pools", and the names of
    kdsr's IPVS services (their services and pools), unless ``ipvs_labels``
    (lb_ipvs.service_labels of the intent) gives those."""
    listing = kernel.nft.listing(TABLE_FAMILY, TABLE_NAME)
    report: dict = {"nodes": store.nodes(), "tables": [], "services": [], "servers": [], "addresses": [], "sysctls": []}
    report["selectors"] = {}
    if listing is not None:
        report["tables"].append(f"{TABLE_FAMILY} {TABLE_NAME}")
        report.update(service_view.read_listing(listing))
    report["pools"] = show_pools(intent) if intent is not None else None
    report["read_at"] = time.time()
    nodes = [node] if node else store.nodes()
    if ipvs_labels is None and intent is not None:
        ipvs_labels = lb_ipvs.service_labels(intent)
    report["ipvs"] = _ipvs_show(kernel, store, nodes, report, ipvs_labels)
    report["xdp"] = _xdp_show(kernel, store, nodes, report)
    report["health"] = []
    report["drained"] = []
    for name in nodes:
        view = health_status.read(store, name)
        if view:
            alive = health_status.live_view(store, name) is not None
            for server in view.get("servers", []):
                report["health"].append({**server, "node": name, "server_node": server.get("node"), "daemon": alive})
        report["drained"] += [{"node": name, "server": s} for s in sorted(store.load(name).drained)]
    # kdsr's announce table: the VIPs BIRD may announce from this host now.
    bgp = any(store.load(name).bird_files for name in nodes)
    report["announce"] = sorted(r.prefix for r in kernel.links.announce_list()) if bgp else []
    report["vrrp"] = _vrrp_view(kernel, store, nodes)
    for name in nodes:
        state = store.load(name)
        for ident in sorted(state.owned_addresses):
            ifname, cidr = ident.split(" ", 1)
            present = any(a.cidr == cidr for a in kernel.links.addr_list(ifname))
            report["addresses"].append({"node": name, "interface": ifname, "address": cidr, "present": present})
        for key, previous in sorted(state.sysctl_previous.items()):
            report["sysctls"].append(
                {"node": name, "key": key.replace("/", "."), "value": kernel.sysctl.read(key), "previous": previous}
            )
    return report


def _ipvs_show(
    kernel: Kernel, store: StateStore, nodes: list[str], report: dict, labels: dict[str, dict[str, str]] | None
) -> dict | None:
    """kdsr's IPVS services (those its state records), read once with their
    counters, as rows beside the nft ones (service_view.read_ipvs); None when
    kdsr owns no IPVS service here (ipvsadm is not run).  Returns how many
    were read and those recorded but missing from the kernel."""
    owned = {ident for name in nodes for ident in store.load(name).ipvs}
    if not owned:
        return None
    stats = [s for s in kernel.ipvs.stats() if s.service.ident in owned]
    labels = dict(labels or {})
    if any(s.service.protocol == "fwmark" and s.service.ident not in labels for s in stats):
        # A port range's fwmark names no port: the mark maps' elements do.
        marks = kernel.nft.listing(lb_ipvs.TABLE_FAMILY, lb_ipvs.TABLE_NAME) or []
        labels = {**service_view.mark_labels(marks), **labels}
    rows = service_view.read_ipvs(stats, labels)
    report["services"] += rows["services"]
    report["servers"] += rows["servers"]
    report["selectors"].update(rows["selectors"])
    listed = {s.service.ident for s in stats}
    named = all(labels.get(s.service.ident, {}).get("pool") for s in stats)
    return {"services": len(stats), "missing": sorted(owned - listed), "named": named}


def _xdp_show(kernel: Kernel, store: StateStore, nodes: list[str], report: dict) -> list[dict]:
    """kdsr's XDP programs (xdp engine): service, selector and pool-member rows
    in the shape service_view.read_listing gives for nft (the program's per-CPU
    counters summed), and the program's own events.

    The program's tables name the servers that hold slots; its counters are
    per server.  A server that holds none (drained, down, weight 0) keeps
    its counters, and a row with them, as the nft engine's pool members keep
    theirs: under the pools the intent puts it in (``report["pools"]``: `kdsr
    show INTENT`, the daemon), else with no pool (the metrics name it from
    the intent they run: kdsr/health/metrics.py Names.pool)."""
    programs = []
    for ifname in sorted({i for name in nodes for i in store.load(name).xdp}):
        if not kernel.links.link_exists(ifname):
            continue
        state, _foreign = kernel.xdp.read(ifname)
        if state is None:
            continue
        counts = kernel.xdp.counters(ifname)
        for svc in state.services:
            host = f"[{svc.vip}]" if svc.family == 6 else svc.vip
            packets, nbytes = counts["services"].get(f"{svc.protocol} {host}:{svc.first}", (0, 0))
            port = str(svc.first) if svc.first == svc.last else f"{svc.first}-{svc.last}"
            report["services"].append(
                {
                    "vip": svc.vip,
                    "protocol": svc.protocol,
                    "port": port,
                    "service": service_view.service_name(svc.pointer),
                    "pool": service_view.selector_pool(svc.selector),
                    "selector": svc.selector,
                    "packets": packets,
                    "bytes": nbytes,
                    "source": svc.pointer or f"xdp on {ifname}",
                    "engine": "xdp",
                }
            )
        for sel in state.selectors:
            slots: dict[str, int] = {}
            for address in sel.table:
                slots[address] = slots.get(address, 0) + 1
            pool = service_view.selector_pool(sel.name)
            report.setdefault("selectors", {})[sel.name] = {
                "pool": pool,
                "family": sel.family,
                "size": len(sel.table),
                "slots": dict(slots),
            }
            for member in (report.get("pools") or {}).get(pool, []):
                server = member["server"]
                if server in counts["servers"] and (":" in server) == (sel.family == 6):
                    slots.setdefault(server, 0)
            for server, share in sorted(slots.items()):
                packets, nbytes = counts["servers"].get(server, (0, 0))
                report["servers"].append(
                    {
                        "pool": pool,
                        "family": sel.family,
                        "server": server,
                        "selector": sel.name,
                        "slots": share,
                        "packets": packets,
                        "bytes": nbytes,
                        "counted_in": f"xdp on {ifname}",
                        "engine": "xdp",
                    }
                )
        rowed = {row["server"] for row in report["servers"] if row.get("counted_in") == f"xdp on {ifname}"}
        for server, (packets, nbytes) in sorted(counts["servers"].items()):
            if server not in rowed:
                report["servers"].append(
                    {
                        "pool": "",
                        "family": 6 if ":" in server else 4,
                        "server": server,
                        "selector": "",
                        "slots": 0,
                        "packets": packets,
                        "bytes": nbytes,
                        "counted_in": f"xdp on {ifname}",
                        "engine": "xdp",
                    }
                )
        programs.append({"interface": ifname, "mode": counts.get("mode", ""), "events": counts.get("events", {})})
    return programs


def show_pools(intent: Intent) -> dict:
    """pool -> its members' address, node and weight, as the intent has them."""
    return {
        pool.name: [{"server": address_text(m.address), "node": m.node, "weight": m.weight} for m in pool.members]
        for pool in intent.pools
    }


def _vrrp_view(kernel: Kernel, store: StateStore, nodes: list[str]) -> list[dict]:
    """Per VRRP instance of kdsr's keepalived fragment: its gate, and whether
    keepalived has the VIP on this host's interface now (this host owns it)."""
    rows = []
    for name in nodes:
        files = store.load(name).keepalived_files
        text = kernel.keepalived.read(files[1]) if files else None
        found = parse_keepalived(text, *files) if text else None
        for instance in found.instances if found else ():
            here = {a.cidr for a in kernel.links.addr_list(instance.interface)}
            rows.append(
                {
                    "node": name,
                    "instance": instance.name,
                    "vip": instance.vip,
                    "priority": instance.priority,
                    "gate": kernel.keepalived.gate_read(instance.track_file),
                    "owned_here": instance.vip in here,
                }
            )
    return rows


def show_document(
    report: dict,
    which: service_view.ShowFilter | None = None,
    before: dict | None = None,
    elapsed: float | None = None,
) -> dict:
    """`kdsr show --json` (README "kdsr show"): {"format", "interval",
    "services": [the operator's view, filtered], "kernel": the report}."""
    services = service_view.services_view(report, before, elapsed)
    if which is not None and which.any:
        services = service_view.filtered(services, which)
    return {"format": service_view.SHOW_FORMAT, "interval": elapsed, "services": services, "kernel": report}


def format_show(report: dict, document: dict | None = None, which: service_view.ShowFilter | None = None) -> str:
    """`kdsr show`'s text: a line per service (servers under each when
    filtered or when there are few), then what else kdsr owns."""
    which = which or service_view.ShowFilter()
    document = document or show_document(report, which)
    lines = []
    owned = ("tables", "addresses", "sysctls", "health", "announce", "vrrp", "xdp", "ipvs")
    if not any(report.get(key) for key in owned):
        return "kdsr owns nothing on this host.\n"
    for table in report["tables"]:
        lines.append(f"nft table {table}")
    ipvs = report.get("ipvs")
    if ipvs:
        count = ipvs["services"]
        lines.append(f"IPVS: {count} service{'' if count == 1 else 's'} of kdsr's, with IPVS's own counters")
        if ipvs["missing"]:
            shown = ", ".join(ipvs["missing"][:5]) + (
                f" and {len(ipvs['missing']) - 5} more" if len(ipvs["missing"]) > 5 else ""
            )
            lines.append(f"  MISSING from the kernel: {shown} (`kdsr plan` shows the repair)")
    for prog in report.get("xdp", []):
        events = ", ".join(f"{k} {v}" for k, v in prog["events"].items())
        lines.append(f"xdp program kdsr_xdp on {prog['interface']} ({prog['mode']}): {events}")
    services = document["services"]
    if report["services"]:
        detail = which.any or len(services) <= service_view.DETAIL_MAX_SERVICES
        rates = document.get("interval") is not None
        lines.append("")
        if services:
            lines += service_view.show_lines(services, detail, rates)
        else:
            lines.append("no service matches the filter")
        if not detail:
            lines.append(f"({len(services)} services: --service, --vip or --server show their servers)")
        elif not report.get("pools"):
            lines.append("(weights: from the running kdsr run, or pass the intent: kdsr show INTENT)")
        if ipvs and ipvs["services"] and not ipvs["named"]:
            lines.append("(IPVS holds no names: for its services' names and pools, pass the intent: kdsr show INTENT)")
        if any(s["no_server"] for s in services):
            unserved = [s["service"] for s in services if s["no_server"]]
            lines.append(f"Warning: no server takes the flows of {', '.join(unserved)}.")
    if report.get("health"):
        down = [h for h in report["health"] if h["state"] != "up"]
        up = len(report["health"]) - len(down)
        lines.append(f"\nhealth (kdsr run): {up} up, {len(down)} down" + (":" if down else ""))
        for h in down:
            since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(h["since"])) if h.get("since") else "start"
            note = "" if h["daemon"] else "  (daemon not running: last known)"
            error = f", last error: {h['last_error']}" if h.get("last_error") else ""
            table = "" if h.get("in_table", True) else ", out of the table"
            lines.append(f"  [{h['node']}] {h['pool']}: {h['server']} {h['state']} since {since}{error}{table}{note}")
    if report.get("drained"):
        lines.append("\ndrained (kdsr drain):")
        for d in report["drained"]:
            lines.append(f"  [{d['node']}] {d['server']}")
    if report.get("announce"):
        lines.append(f"\nannounce routes (table {naming.ANNOUNCE_TABLE:#x}; BIRD announces these VIPs):")
        lines += [f"  {prefix}" for prefix in report["announce"]]
    if report.get("vrrp"):
        lines.append("\nVRRP (kdsr's keepalived fragment; gate 0: keepalived may own the VIP, 1: it gives it up):")
        for v in report["vrrp"]:
            owner = "owned here" if v["owned_here"] else "not here"
            lines.append(
                f"  [{v['node']}] {v['vip']} {v['instance']} priority {v['priority']}, gate {v['gate'] or 'missing'}, "
                f"{owner}"
            )
    if report["addresses"]:
        lines.append("\naddresses owned:")
        for a in report["addresses"]:
            lines.append(f"  [{a['node']}] {a['interface']} {a['address']}" + ("" if a["present"] else "  (MISSING)"))
    if report["sysctls"]:
        lines.append("\nsysctls set (value now / value before kdsr):")
        for s in report["sysctls"]:
            lines.append(f"  [{s['node']}] {s['key']} = {s['value']} (was {s['previous']})")
    return "\n".join(lines) + "\n"
