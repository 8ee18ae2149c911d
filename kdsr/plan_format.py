"""Render a Plan for people (Terraform-style text) and for programs (JSON).

Text: one line per object, ``+`` create, ``~`` update, ``-/+`` replace (with
the field that forces it), ``-`` delete, each ending with the intent path it
comes from, then one summary line.  Map elements are listed up to a limit per
map (a Maglev table has thousands of slots) and summarised beyond it; the
JSON form always has every change.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from typing import Any

from kdsr import model_xdp, naming
from kdsr.diff import BIRD_NOT_RUNNING, CREATE, DELETE, REPLACE, UPDATE, Change, Plan, format_key, format_value
from kdsr.model import (
    Address,
    AnnounceRoute,
    BgpRoute,
    BgpSession,
    BirdConfig,
    IpvsDest,
    IpvsService,
    KeepalivedConfig,
    Link,
    NftChain,
    NftElement,
    NftMap,
    NftTable,
    Route,
    Rule,
    Sysctl,
    VrrpGate,
    VrrpInstance,
)
from kdsr.service_view import summary_lines
from kdsr.wording import counted

SYMBOL = {CREATE: "+", UPDATE: "~", REPLACE: "-/+", DELETE: "-"}
ELEMENTS_SHOWN_PER_MAP = 12
PLAN_FORMAT_VERSION = 1


def _describe(obj: Any, servers: dict | None = None) -> str:
    """``servers``: server id -> address (``server_names``), for slot maps."""
    if isinstance(obj, model_xdp.XDP_TYPES):
        return model_xdp.describe(obj)
    if isinstance(obj, NftTable):
        return f"{counted(len(obj.chains), 'chain')}, {counted(len(obj.maps), 'map')}"
    if isinstance(obj, NftChain):
        if obj.hook:
            hook = f"hook {obj.hook.hook} device {obj.hook.device} priority {obj.hook.priority}"
            return f"{hook}, {counted(len(obj.rules), 'rule')}"
        return counted(len(obj.rules), "rule")
    if isinstance(obj, NftMap):
        named = servers if servers is not None and _names_servers(obj.name) else {}
        values = Counter(named.get(e.value) or format_value(e.value) for _k, e in obj.elements)
        top = ", ".join(f"{v} x{n}" for v, n in sorted(values.items())[:4])
        more = f", +{len(values) - 4} more" if len(values) > 4 else ""
        return f"{' . '.join(obj.key_type)} : {obj.data_type}, {counted(len(obj.elements), 'element')}" + (
            f" ({top}{more})" if top else ""
        )
    if isinstance(obj, NftElement):
        return (servers or {}).get(obj.value) or format_value(obj.value)
    if isinstance(obj, Address):
        return f"label {obj.label}" if obj.label else ""
    if isinstance(obj, Sysctl):
        return obj.value
    if isinstance(obj, Link):
        return f"{obj.kind} local {obj.local} remote {obj.remote or 'any'} ttl {obj.ttl}"
    if isinstance(obj, IpvsService):
        flags = f" ({','.join(obj.flags)})" if obj.flags else ""
        return f"{obj.scheduler}{flags}, {len(obj.dests)} destinations"
    if isinstance(obj, tuple) and len(obj) == 2 and isinstance(obj[1], IpvsDest):
        dest = obj[1]
        how = f"tunnel {dest.tun_type}" if dest.method == "tunnel" else "direct routing"
        return f"{how}, weight {dest.weight}"
    if isinstance(obj, BgpRoute):
        extra = [f"AS path +{obj.prepend}"] if obj.prepend else []
        extra += [f"MED {obj.med}"] if obj.med is not None else []
        extra += [" ".join(f"{a}:{b}" for a, b in obj.communities)] if obj.communities else []
        return f"announce as {obj.role}" + (f" ({', '.join(extra)})" if extra else "")
    if isinstance(obj, AnnounceRoute):
        return f"{obj.kind} in table {naming.ANNOUNCE_TABLE:#x}, BIRD announces the VIP while it is there"
    if isinstance(obj, BgpSession):
        options = [f"hold {obj.hold_time}s"] + (["bfd"] if obj.bfd else []) + (["password"] if obj.password else [])
        options += [f"multihop {obj.multihop}"] if obj.multihop else []
        return f"AS {obj.asn} from {obj.local} AS {obj.local_asn}, {', '.join(options)}"
    if isinstance(obj, VrrpInstance):
        how = f"unicast to {', '.join(obj.unicast_peers) or 'nobody'}" if obj.unicast_source else "multicast"
        preempt = "" if obj.preempt else ", no preempt"
        return (
            f"{obj.vip} on {obj.interface}, virtual router {obj.virtual_router_id}, priority {obj.priority}, "
            f"advert {obj.advert_interval:g} s, {how}{preempt}"
        )
    if isinstance(obj, VrrpGate):
        return (
            f"{obj.value} (keepalived may own {obj.vip})" if obj.open else f"{obj.value} (keepalived gives the VIP up)"
        )
    if isinstance(obj, KeepalivedConfig):
        return f"{len(obj.text.splitlines())} lines, checked by keepalived -t, then SIGHUP"
    if isinstance(obj, BirdConfig):
        lines = len(obj.text.splitlines())
        return (
            f"{lines} lines, then birdc configure"
            if obj.router_id
            else "empty (declares nothing), then birdc configure"
        )
    return ""


def _names_servers(map_name: str) -> bool:
    """A selector's slot map: its values are server ids."""
    return map_name.startswith("pool-")


def server_names(plan: Plan) -> dict:
    """server id -> member address, from the servers maps of the plan's
    tables (desired and observed), so a slot reads as its server."""
    maps = (
        m
        for td in plan.tables
        for table in (td.observed, td.desired)
        if table is not None
        for m in table.maps
        if m.name.startswith("servers-")
    )
    return {key: elem.comment for nmap in maps for key, elem in nmap.elements if elem.comment}


def _line(change: Change, servers: dict | None = None) -> str:
    symbol = SYMBOL[change.action]
    text = f"  {symbol} {change.kind} {change.ident}"
    if change.kind == "nft element" and not _names_servers(change.ident.partition("/")[2]):
        servers = None
    if change.kind == "nft element" and change.action == UPDATE:
        text += f": {_describe(change.before, servers)} -> {_describe(change.after, servers)}"
    elif change.kind == "sysctl":
        before = change.before.value if change.before and change.before.value is not None else "(absent)"
        text += f": {before} -> {change.after.value}"
        if change.reason == "restore":
            text += " (restore the value found before kdsr)"
        elif change.reason == "forget":
            text += " (not ours to restore, or already restored: forget the record)"
    elif change.kind == "announce route" and change.action == DELETE:
        text += f" (withdraw: {change.reason})" if change.reason else " (withdraw)"
    elif change.action == DELETE and change.reason == "forget":
        text += " (already gone; forget the record)"
    elif change.action == DELETE:
        detail = _describe(change.before, servers)
        text += f" ({detail})" if detail else ""
    else:
        detail = _describe(change.after, servers)
        text += f": {detail}" if detail and change.kind != "nft element" else (f" : {detail}" if detail else "")
    if change.kind == "vrrp gate" and change.action == UPDATE and change.reason:
        text += f" (give up: {change.reason})"
    if change.kind == "bird config" and change.reason == BIRD_NOT_RUNNING:
        text = text.replace(", then birdc configure", ", no reload (BIRD is not running)")
    elif change.kind == "bird config" and change.reason:
        text += f"  [{change.reason}]"
    if change.action == REPLACE and change.reason:
        text += f"  [{change.reason} forces replacement]"
    elif change.action == UPDATE and change.kind == "nft chain":
        text += "  [rules changed]"
    if change.pointer:
        text += f"  # {change.pointer}"
    return text


def summary(plan: Plan) -> dict[str, int]:
    counts = {
        "add": 0,
        "change": 0,
        "replace": 0,
        "destroy": 0,
        "elements_add": 0,
        "elements_change": 0,
        "elements_destroy": 0,
    }
    for change in plan.changes:
        prefix = "elements_" if change.kind == "nft element" else ""
        key = {CREATE: "add", UPDATE: "change", REPLACE: "replace", DELETE: "destroy"}[change.action]
        counts[prefix + key if prefix else key] += 1
    return counts


def render_text(plan: Plan, source: str = "") -> str:
    header = f"kdsr plan for node {plan.node} ({plan.role})" + (f" from {source}" if source else "")
    if plan.warnings:
        header += "\n\n" + "\n".join(f"Warning: {w}." for w in plan.warnings)
    if plan.notes:
        header += "\n\n" + "\n".join(plan.notes)
    if plan.service_changes and (plan.service_changes["services"] or plan.service_changes["pools"]):
        header += "\n\n" + "\n".join(summary_lines(plan.service_changes))
    if plan.empty:
        return f"{header}\n\nNo changes. The kernel matches the intent.\n"
    lines = [header, ""]
    per_map: Counter = Counter()
    hidden: Counter = Counter()
    servers = server_names(plan)
    for change in plan.changes:
        if change.kind == "nft element":
            map_id = change.ident.split("[", 1)[0]
            per_map[map_id] += 1
            if per_map[map_id] > ELEMENTS_SHOWN_PER_MAP:
                hidden[map_id] += 1
                continue
        lines.append(_line(change, servers))
    for map_id, count in sorted(hidden.items()):
        lines.append(f"    ... and {count} more element changes in {map_id} (see --json)")
    s = summary(plan)
    lines.append("")
    text = f"Plan: {s['add']} to add, {s['change']} to change, {s['replace']} to replace, {s['destroy']} to destroy."
    if s["elements_add"] or s["elements_change"] or s["elements_destroy"]:
        text += (
            f" Map elements: {s['elements_add']} to add, {s['elements_change']} to change,"
            f" {s['elements_destroy']} to destroy."
        )
    lines.append(text)
    return "\n".join(lines) + "\n"


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, model_xdp.XDP_TYPES):
        return model_xdp.as_json(obj)
    if obj is None:
        return None
    if isinstance(obj, NftTable):
        return {
            "family": obj.family,
            "name": obj.name,
            "chains": [c.name for c in obj.chains],
            "maps": [m.name for m in obj.maps],
        }
    if isinstance(obj, NftChain):
        hook = None
        if obj.hook:
            hook = {
                "type": obj.hook.type,
                "hook": obj.hook.hook,
                "device": obj.hook.device,
                "priority": obj.hook.priority,
                "policy": obj.hook.policy,
            }
        return {"name": obj.name, "hook": hook, "rules": [r.comment for r in obj.rules]}
    if isinstance(obj, NftMap):
        return {
            "name": obj.name,
            "key_type": list(obj.key_type),
            "data_type": obj.data_type,
            "flags": list(obj.flags),
            "counter": obj.counter,
            "elements": len(obj.elements),
        }
    if isinstance(obj, NftElement):
        return {"value": format_value(obj.value), "comment": obj.comment}
    if isinstance(obj, Address):
        return {"interface": obj.ifname, "address": obj.cidr, "label": obj.label}
    if isinstance(obj, Sysctl):
        return {"key": obj.dotted, "value": obj.value}
    if isinstance(obj, Link):
        return {"name": obj.name, "kind": obj.kind, "local": obj.local, "remote": obj.remote, "ttl": obj.ttl}
    if isinstance(obj, Route):
        return {"family": obj.family, "table": obj.table, "dev": obj.dev}
    if isinstance(obj, Rule):
        return {"family": obj.family, "fwmark": obj.fwmark, "table": obj.table, "priority": obj.priority}
    if isinstance(obj, IpvsService):
        return {
            "service": obj.ident,
            "scheduler": obj.scheduler,
            "flags": list(obj.flags),
            "destinations": [_jsonable((obj, d)) for d in obj.dests],
        }
    if isinstance(obj, tuple) and len(obj) == 2 and isinstance(obj[1], IpvsDest):
        d = obj[1]
        return {"address": d.address, "port": d.port, "weight": d.weight, "method": d.method, "tun_type": d.tun_type}
    if isinstance(obj, BgpRoute):
        return {
            "prefix": obj.prefix,
            "role": obj.role,
            "prepend": obj.prepend,
            "med": obj.med,
            "communities": [f"{a}:{b}" for a, b in obj.communities],
        }
    if isinstance(obj, AnnounceRoute):
        return {"prefix": obj.prefix, "type": obj.kind, "table": naming.ANNOUNCE_TABLE}
    if isinstance(obj, BgpSession):
        return {k: v for k, v in obj.__dict__.items() if k != "pointer"}
    if isinstance(obj, VrrpInstance):
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in obj.__dict__.items() if k != "pointer"}
    if isinstance(obj, VrrpGate):
        return {"path": obj.path, "value": obj.value, "vip": obj.vip}
    if isinstance(obj, KeepalivedConfig):
        return _fragment_json(obj, pid_file=obj.pid_file)
    if isinstance(obj, BirdConfig):
        return _fragment_json(obj, socket=obj.socket)
    return str(obj)


def _fragment_json(obj: BirdConfig | KeepalivedConfig, **files: str) -> dict:
    """A daemon's config fragment in a plan: its files, and the digest and
    line count of its text (BIRD's holds BGP passwords: never the text)."""
    return {
        "fragment": obj.fragment,
        "config": obj.config,
        **files,
        "sha256": hashlib.sha256(obj.text.encode()).hexdigest(),
        "lines": len(obj.text.splitlines()),
    }


def applied_json(result: Any) -> dict | None:
    """What an apply did (kdsr.apply.ApplyResult), for --json outputs; None: nothing was applied."""
    if result is None:
        return None
    return {"steps": list(result.steps), "writes": result.writes, "notes": list(result.notes)}


def render_json(plan: Plan, source: str = "", outcome: dict | None = None) -> str:
    """The plan as data; ``outcome``: what a command did with it (``applied``,
    and the command's own fields), merged into the same document."""
    doc = {
        "format_version": PLAN_FORMAT_VERSION,
        "node": plan.node,
        "role": plan.role,
        "intent": source,
        "changes": [
            {
                "action": c.action,
                "kind": c.kind,
                "id": c.ident,
                "before": _jsonable(c.before),
                "after": _jsonable(c.after),
                "reason": c.reason,
                "pointer": c.pointer,
            }
            for c in plan.changes
        ],
        "summary": summary(plan),
        "warnings": list(plan.warnings),
        "service_changes": plan.service_changes or {"services": [], "pools": []},
        **(outcome or {}),
    }
    return json.dumps(doc, indent=2, sort_keys=True) + "\n"


__all__ = ["applied_json", "render_text", "render_json", "summary", "format_key"]
