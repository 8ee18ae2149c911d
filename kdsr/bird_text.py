"""BIRD 2 fragment text: kdsr's fragment written (``render``) and read back
(``parse_model``), and the line behind a BIRD error (``pointer_at``).
What goes in it is compile/bird.py's.

Everything kdsr declares is named ``kdsr_*`` (tables, protocols, the export
filter), so the fragment sits next to the user's own BIRD config without
touching it: the learned routes live in ``kdsr_t4``/``kdsr_t6``, never in
``master4``/``master6``, so no kernel protocol of the user's installs them
on the load balancer, and kdsr's kernel protocols export nothing.

Only values the schema and the rules have already validated reach the text:
addresses and numbers as Python renders them, names kdsr makes, and the
password (printable ASCII without quote or backslash, by the schema).  The
first line carries the model as JSON (never the password), so the file read
back is enough to diff against.
"""

from __future__ import annotations

import ipaddress
import json

from kdsr import fragment_text, naming
from kdsr.fragment_text import FragmentText
from kdsr.model import BgpRoute, BgpSession, BirdConfig

MODEL_MARK = "# kdsr-bird-model "
TABLE = {4: "kdsr_t4", 6: "kdsr_t6"}
KERNEL = {4: "kdsr_kernel4", 6: "kdsr_kernel6"}  # learn kdsr's announce table
EXPORT_FILTER = "kdsr_export"
BFD_PROTOCOL = "kdsr_bfd"


def session_name(index: int) -> str:
    return f"kdsr_peer{index + 1}"


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
    text = FragmentText(MODEL_MARK + model_json(router_id, sessions, routes), node, source)
    out, block = text.out, text.block
    if router_id is None:
        return text.done()
    bgp_pointer = sessions[0].pointer.rsplit("/neighbors/", 1)[0] if sessions else ""
    block(f"{bgp_pointer}/router_id", f"router id {router_id};")
    families = sorted({ipaddress.ip_address(s.neighbor).version for s in sessions})
    for family in families:
        out.append("")
        out.append(f"ipv{family} table {TABLE[family]};")
        out.append(f"# A VIP is announced while kdsr's route for it is in kernel table {naming.ANNOUNCE_TABLE:#x}:")
        out.append("# kdsr adds it once this boot's fast path is in, and deletes it to withdraw.")
        out.append(f"protocol kernel {KERNEL[family]} {{")
        out.append(f"  ipv{family} {{ table {TABLE[family]}; import all; export none; }};")
        out.append(f"  kernel table {naming.ANNOUNCE_TABLE};")
        out.append("  learn;")
        out.append("}")
    out.append("")
    out.append(f"filter {EXPORT_FILTER} {{")
    for route in routes:
        body = [f"bgp_path.prepend({s_asn});" for s_asn in [sessions[0].local_asn] * route.prepend]
        if route.med is not None:
            body.append(f"bgp_med = {route.med};")
        body += [f"bgp_community.add(({a},{b}));" for a, b in route.communities]
        block(route.pointer, f"  if net = {route.prefix} then {{ {' '.join(body + ['accept;'])} }}  # {route.role}")
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
    return text.done()


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
    return fragment_text.pointer_at(config.lines, line)
