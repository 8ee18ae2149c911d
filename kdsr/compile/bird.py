"""The BIRD 2 fragment a BGP load balancer runs: its VIPs as static routes in
kdsr's own routing tables, exported to its neighbours by kdsr's own sessions.

Everything kdsr declares is named ``kdsr_*`` (tables, protocols, the export
filter), so the fragment sits next to the user's own BIRD config without
touching it: the static routes live in ``kdsr_t4``/``kdsr_t6``, never in
``master4``/``master6``, so no kernel protocol of the user's installs them
on the load balancer.

Only values the schema and the rules have already validated reach the text:
addresses and numbers as Python renders them, names kdsr makes, and the
password (printable ASCII without quote or backslash, by the schema).  The
first line carries the model as JSON (never the password), so the file read
back is enough to diff against.
"""

from __future__ import annotations

import ipaddress
import json

from kdsr.compile.announce import STANDBY, assignments
from kdsr.intent.model import Intent, LoadBalancerNode
from kdsr.model import BgpRoute, BgpSession, BirdConfig

MODEL_MARK = "# kdsr-bird-model "
TABLE = {4: "kdsr_t4", 6: "kdsr_t6"}
STATIC = {4: "kdsr_vips4", 6: "kdsr_vips6"}
EXPORT_FILTER = "kdsr_export"
BFD_PROTOCOL = "kdsr_bfd"


def session_name(index: int) -> str:
    return f"kdsr_peer{index + 1}"


def _local_address(lb: LoadBalancerNode, neighbor: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    """The node's address on the neighbour's subnet, else its first of that family."""
    family = [a for a in lb.addresses if a.version == neighbor.version]
    on_link = [a for a in family if neighbor in a.network]
    return str((on_link or family)[0].ip)


def bird_config(intent: Intent, lb: LoadBalancerNode, withdraw: dict[str, str] | None = None) -> BirdConfig | None:
    """``withdraw``: VIP -> why it is not announced now (no healthy server)."""
    bgp = lb.bgp
    if bgp is None:
        return None
    withdraw = withdraw or {}
    sessions = tuple(
        BgpSession(
            neighbor=str(n.address),
            asn=n.asn,
            local=_local_address(lb, n.address),
            local_asn=bgp.asn,
            hold_time=bgp.hold_time,
            bfd=n.bfd,
            multihop=n.multihop,
            password=n.password is not None,
            pointer=n.pointer,
        )
        for n in bgp.neighbors
    )
    routes, withdrawn = [], []
    for service, assignment in assignments(intent):
        role = assignment.role_of(lb.name)
        if role is None:
            continue
        vip = service.vip
        prefix = f"{vip}/{vip.max_prefixlen}"
        if str(vip) in withdraw:
            withdrawn.append((prefix, withdraw[str(vip)]))
            continue
        announce = service.announce
        routes.append(
            BgpRoute(
                prefix=prefix,
                role=role,
                prepend=announce.prepend if role == STANDBY else 0,
                med=announce.standby_med if role == STANDBY else announce.med,
                communities=announce.communities,
                pointer=announce.pointer,
            )
        )
    routes.sort(key=lambda r: (ipaddress.ip_network(r.prefix).version, ipaddress.ip_network(r.prefix)))
    passwords = {session_name(i): n.password for i, n in enumerate(bgp.neighbors) if n.password is not None}
    text, lines = render(lb.name, intent.source, str(bgp.router_id), sessions, tuple(routes), passwords)
    return BirdConfig(
        config=bgp.bird.config,
        fragment=bgp.bird.fragment,
        socket=bgp.bird.socket,
        router_id=str(bgp.router_id),
        sessions=sessions,
        routes=tuple(routes),
        text=text,
        lines=tuple(lines),
        withdrawn=tuple(withdrawn),
    )


def empty_config(config: str, fragment: str, socket: str) -> BirdConfig:
    """What destroy leaves: a fragment that declares nothing (the user's
    main config still includes it, so it must stay a valid file)."""
    text, _ = render("", "", None, (), (), {})
    return BirdConfig(config, fragment, socket, None, (), (), text)


def model_json(router_id: str | None, sessions: tuple[BgpSession, ...], routes: tuple[BgpRoute, ...]) -> str:
    return json.dumps(
        {
            "router_id": router_id,
            "sessions": [{k: v for k, v in s.__dict__.items() if k != "pointer"} for s in sessions],
            "routes": [{k: v for k, v in r.__dict__.items() if k != "pointer"} for r in routes],
        },
        sort_keys=True,
        separators=(",", ":"),
    )


def render(
    node: str,
    source: str,
    router_id: str | None,
    sessions: tuple[BgpSession, ...],
    routes: tuple[BgpRoute, ...],
    passwords: dict[str, str],
) -> tuple[str, list[tuple[int, int, str]]]:
    out: list[str] = []
    where: list[tuple[int, int, str]] = []

    def block(pointer: str, *lines: str) -> None:
        first = len(out) + 1
        out.extend(lines)
        if pointer:
            where.append((first, len(out), pointer))

    out.append(MODEL_MARK + model_json(router_id, sessions, routes))
    out.append("# kdsr owns this file and rewrites it on every apply; edits here are undone.")
    if node:
        out.append(f"# Node {node}; intent {json.dumps(source)}.")
    if router_id is None:
        return "\n".join(out) + "\n", where
    bgp_pointer = sessions[0].pointer.rsplit("/neighbors/", 1)[0] if sessions else ""
    block(f"{bgp_pointer}/router_id", f"router id {router_id};")
    families = sorted({ipaddress.ip_address(s.neighbor).version for s in sessions})
    for family in families:
        out.append("")
        out.append(f"ipv{family} table {TABLE[family]};")
        out.append(f"protocol static {STATIC[family]} {{")
        out.append(f"  ipv{family} {{ table {TABLE[family]}; }};")
        for route in routes:
            if ipaddress.ip_network(route.prefix).version == family:
                block(route.pointer, f"  route {route.prefix} blackhole;  # {route.role}")
        out.append("}")
    out.append("")
    out.append(f"filter {EXPORT_FILTER} {{")
    for route in routes:
        body = [f"bgp_path.prepend({s_asn});" for s_asn in [sessions[0].local_asn] * route.prepend]
        if route.med is not None:
            body.append(f"bgp_med = {route.med};")
        body += [f"bgp_community.add(({a},{b}));" for a, b in route.communities]
        block(route.pointer, f"  if net = {route.prefix} then {{ {' '.join(body + ['accept;'])} }}")
    out.append("  reject;")
    out.append("}")
    if any(s.bfd for s in sessions):
        out.append("")
        out.append(f"protocol bfd {BFD_PROTOCOL} {{ }}")
    for i, session in enumerate(sessions):
        family = ipaddress.ip_address(session.neighbor).version
        keepalive = max(1, session.hold_time // 3)
        lines = [
            "",
            f"protocol bgp {session_name(i)} {{",
            f"  local {session.local} as {session.local_asn};",
            f"  neighbor {session.neighbor} as {session.asn};",
            f"  hold time {session.hold_time};",
            f"  keepalive time {keepalive};",
        ]
        if session.multihop is not None:
            lines.append(f"  multihop {session.multihop};")
        if session.bfd:
            lines.append("  bfd on;")
        if session_name(i) in passwords:
            lines.append(f'  password "{passwords[session_name(i)]}";')
        lines += [
            f"  ipv{family} {{ table {TABLE[family]}; import none; export filter {EXPORT_FILTER}; next hop self; }};",
            "}",
        ]
        block(session.pointer, *lines)
    return "\n".join(out) + "\n", where


def parse_model(text: str, config: str, fragment: str, socket: str) -> BirdConfig | None:
    """The BirdConfig a fragment file describes (its first line), or None if
    it is not one kdsr wrote."""
    first = text.split("\n", 1)[0]
    if not first.startswith(MODEL_MARK):
        return None
    try:
        data = json.loads(first[len(MODEL_MARK) :])
        sessions = tuple(BgpSession(**s) for s in data["sessions"])
        routes = tuple(
            BgpRoute(**{**r, "communities": tuple(tuple(c) for c in r.get("communities", ()))}) for r in data["routes"]
        )
    except (ValueError, KeyError, TypeError):
        return None
    return BirdConfig(config, fragment, socket, data.get("router_id"), sessions, routes, text)


def pointer_at(config: BirdConfig, line: int) -> str:
    """The intent path behind a line of the fragment (BIRD's error position)."""
    return next((p for first, last, p in config.lines if first <= line <= last), "")


__all__ = ["bird_config", "empty_config", "parse_model", "pointer_at", "render"]
