"""libnftables JSON <-> kdsr model, and the one-transaction batch for a TableDiff.

Pure: no kernel access, so the fake kernel and the real one share it.

Quirks of nft 1.0.6 (Debian bookworm) handled here:
- the JSON listing omits a netdev base chain's ``dev`` and every table and
  chain comment; the device is read from the text listing instead (see
  ``devices_from_text``), and kdsr does not rely on table/chain comments;
- a single port inside an interval concatenation lists as a plain number,
  a range as ``{"range": [a, b]}``; both decode to a ``(first, last)`` tuple.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from kdsr.model import ChainHook, NftChain, NftElement, NftMap, NftRule, NftTable, TableDiff, canonical_json, element

# ---------------------------------------------------------------- encoding


def _encode_key_part(part: Any) -> Any:
    if isinstance(part, tuple):
        first, last = part
        return first if first == last else {"range": [first, last]}
    return part


def encode_key(key: Any) -> Any:
    if isinstance(key, tuple):
        return {"concat": [_encode_key_part(p) for p in key]}
    return key


def encode_value(value: Any) -> Any:
    if isinstance(value, tuple) and value[0] in ("jump", "goto"):
        return {value[0]: {"target": value[1]}}
    return value


def encode_element(key: Any, elem: NftElement | None, verdicts: dict | None = None) -> Any:
    """One element as listed in an ``elem`` array (value omitted when None).
    ``verdicts``: the verdicts encoded so far in this batch, by value; a slot
    map's elements name the same few chains over and over, and one shared
    object per chain keeps a full apply's batch from holding two dicts per
    slot (libnftables reads the batch as text or as one JSON document, where
    sharing makes no difference)."""
    if type(key) is int and elem is not None and not elem.comment:  # a slot: most elements of a large table
        value = elem.value
        if type(value) is int or type(value) is str:
            return [key, value]
        if verdicts is not None and type(value) is tuple:
            encoded = verdicts.get(value)
            if encoded is None:
                encoded = verdicts[value] = encode_value(value)
            return [key, encoded]
    val = encode_key(key)
    if elem is not None and elem.comment:
        val = {"elem": {"val": val, "comment": elem.comment}}
    if elem is None:
        return val
    return [val, encode_value(elem.value)]


def _obj(kind: str, table: NftTable | TableDiff, **fields: Any) -> dict:
    return {kind: {"family": table.family, "table": table.name, **fields}}


def chain_object(table: NftTable | TableDiff, chain: NftChain) -> dict:
    fields: dict[str, Any] = {"name": chain.name}
    if chain.hook is not None:
        fields.update(type=chain.hook.type, hook=chain.hook.hook, prio=chain.hook.priority, policy=chain.hook.policy)
        if chain.hook.device:
            fields["dev"] = chain.hook.device
    return _obj("chain", table, **fields)


def map_object(table: NftTable | TableDiff, nmap: NftMap, with_elements: bool = False) -> dict:
    key_type: Any = list(nmap.key_type) if len(nmap.key_type) > 1 else nmap.key_type[0]
    fields: dict[str, Any] = {"name": nmap.name, "type": key_type, "map": nmap.data_type}
    if nmap.flags:
        fields["flags"] = list(nmap.flags)
    if nmap.counter:
        fields["stmt"] = [{"counter": None}]
    if nmap.size is not None:
        fields["size"] = nmap.size
    if nmap.timeout is not None:
        fields["timeout"] = nmap.timeout
    if with_elements and nmap.elements:
        fields["elem"] = [encode_element(k, e) for k, e in nmap.elements]
    return _obj("map", table, **fields)


def rule_objects(table: NftTable | TableDiff, chain: NftChain) -> list[dict]:
    return [
        {"add": _obj("rule", table, chain=chain.name, expr=rule.expr, comment=rule.comment)} for rule in chain.rules
    ]


def _elements_cmd(verb: str, table: TableDiff, map_name: str, elems: list) -> dict:
    return {verb: {"element": {"family": table.family, "table": table.name, "name": map_name, "elem": elems}}}


# Element batches are split so no single netlink message gets huge; they are
# still one transaction (one json_cmd).
ELEMENT_CHUNK = 4096


def _chunks(items: list, size: int = ELEMENT_CHUNK) -> Iterable[list]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def batch_for(td: TableDiff) -> list[dict]:
    """libnftables commands turning ``td.observed`` into ``td.desired``, in an
    order the kernel accepts inside one transaction:

    flush chains that lose rules or references -> delete elements -> delete
    maps -> delete chains -> add table/maps/chains -> add elements -> add
    rules.  A map can only go once no rule names it, a chain once no verdict
    element jumps to it; a new element can only jump to a chain that exists.
    """
    cmds: list[dict] = []
    verdicts: dict = {}  # shared by the batch's elements (encode_element)
    table_ref = {"table": {"family": td.family, "name": td.name}}
    if td.desired is None:
        return [{"delete": table_ref}]
    if td.observed is None:
        cmds.append({"add": table_ref})

    replaced_maps = [new for _old, new in td.maps_replace]
    # When a map goes away, any surviving chain might name it: rebuild them all.
    rebuild = {c.name: c for c in td.chains_rebuild}
    if td.maps_delete or td.maps_replace:
        replaced = {old.name for old, _new in td.chains_replace}
        survivors = {c.name for c in (td.observed.chains if td.observed else ())} - replaced
        for chain in td.desired.chains:
            if chain.name in survivors:
                rebuild.setdefault(chain.name, chain)
    for name in sorted(rebuild):
        cmds.append({"flush": _obj("chain", td, name=name)})
    for old in td.chains_delete:
        cmds.append({"flush": _obj("chain", td, name=old.name)})
    for old, _new in td.chains_replace:
        cmds.append({"flush": _obj("chain", td, name=old.name)})

    for map_name, keys in sorted(td.elements_delete.items()):
        for part in _chunks([encode_element(k, None) for k in keys]):
            cmds.append(_elements_cmd("delete", td, map_name, part))
    for old in td.maps_delete + [old for old, _new in td.maps_replace]:
        cmds.append({"delete": _obj("map", td, name=old.name)})
    for old in td.chains_delete + [old for old, _new in td.chains_replace]:
        cmds.append({"delete": _obj("chain", td, name=old.name)})

    for nmap in td.maps_add + replaced_maps:
        cmds.append({"add": map_object(td, nmap)})
    new_chains = td.chains_add + [new for _old, new in td.chains_replace]
    for chain in new_chains:
        cmds.append({"add": chain_object(td, chain)})

    for nmap in td.maps_add + replaced_maps:
        for part in _chunks([encode_element(k, e, verdicts) for k, e in nmap.elements]):
            cmds.append(_elements_cmd("add", td, nmap.name, part))
    for map_name, items in sorted(td.elements_add.items()):
        for part in _chunks([encode_element(k, e, verdicts) for k, e in items]):
            cmds.append(_elements_cmd("add", td, map_name, part))

    for chain in new_chains + [rebuild[n] for n in sorted(rebuild)]:
        cmds.extend(rule_objects(td, chain))
    return cmds


def with_stand_in_links(commands: list[dict], maps: set[str], links: set[str], stand_in: str = "lo") -> list[dict]:
    """``commands`` with ``stand_in`` for every element value in ``maps``
    that names one of ``links``.

    nft resolves an ``iface_index`` element's name when it parses the
    batch, so a dry run before the plan has made its tunnel links fails on
    them; the rehearsal checks this copy instead (the real transaction runs
    after the links exist)."""

    def swap(elems: list) -> list:
        return [[e[0], stand_in] if isinstance(e, list) and len(e) == 2 and e[1] in links else e for e in elems]

    out = []
    for cmd in commands:
        ((verb, body),) = cmd.items() if len(cmd) == 1 else (("", None),)
        obj = (body.get("map") or body.get("element")) if isinstance(body, dict) else None
        if isinstance(obj, dict) and obj.get("name") in maps and obj.get("elem"):
            cmd = {verb: {kind: {**obj, "elem": swap(obj["elem"])} for kind in body}}
        out.append(cmd)
    return out


# ---------------------------------------------------------------- decoding


def _decode_key_part(part: Any) -> Any:
    if isinstance(part, dict) and "range" in part:
        first, last = part["range"]
        return (first, last)
    if isinstance(part, int):
        return (part, part)
    return part


def decode_key(val: Any) -> Any:
    if isinstance(val, dict) and "concat" in val:
        return tuple(_decode_key_part(p) for p in val["concat"])
    if isinstance(val, dict) and "range" in val:
        return tuple(val["range"])
    return val


def decode_value(value: Any) -> Any:
    if isinstance(value, dict):
        for verdict in ("jump", "goto"):
            if verdict in value:
                return (verdict, value[verdict]["target"])
    return value


def decode_element(item: Any) -> tuple[Any, NftElement]:
    key_part, value = item if isinstance(item, list) else (item, None)
    comment = ""
    if isinstance(key_part, dict) and "elem" in key_part:
        comment = key_part["elem"].get("comment", "")
        key_part = key_part["elem"]["val"]
    return decode_key(key_part), element(decode_value(value), comment)


def is_dynamic(obj: dict) -> bool:
    """A listed map the packet path fills (flags "timeout": flow pinning):
    its elements are traffic state, not configuration, so they are not read."""
    return "timeout" in obj.get("flags", ())


def decode_elements(items: Iterable) -> tuple:
    """A map's listed elements, in key order (keys of one map share a shape)."""
    return tuple(sorted((decode_element(item) for item in items), key=lambda kv: kv[0]))


def decode_map(obj: dict) -> NftMap:
    key_type = obj["type"]
    key_type = tuple(key_type) if isinstance(key_type, list) else (key_type,)
    counter = any("counter" in stmt for stmt in obj.get("stmt", []))
    dynamic = is_dynamic(obj)
    return NftMap(
        name=obj["name"],
        key_type=key_type,
        data_type=obj.get("map", ""),
        flags=tuple(obj.get("flags", [])),
        counter=counter,
        elements=() if dynamic else decode_elements(obj.get("elem", [])),
        size=obj.get("size") if dynamic else None,
        timeout=obj.get("timeout") if dynamic else None,
    )


def share_verdicts(items: list) -> list:
    """A map's listed elements (``items``, changed in place) with one object
    per distinct verdict: JSON decodes two dicts for each of a slot map's
    elements, which name the same few chains over and over."""
    seen: dict[tuple, Any] = {}
    for item in items:
        if type(item) is list and len(item) == 2 and type(item[1]) is dict:
            value = decode_value(item[1])
            if type(value) is tuple:
                item[1] = seen.setdefault(value, item[1])
    return items


def table_items(listing: list[dict], name: str) -> list[dict] | None:
    """The items of table ``name`` in a listing of a whole family (``list
    ruleset FAMILY``: every table of it); None when the family has no such table."""
    items, found = [], False
    for item in listing:
        for kind, obj in item.items():
            if kind == "table" and obj.get("name") == name:
                found = True
                items.append(item)
            elif kind != "table" and isinstance(obj, dict) and obj.get("table") == name:
                items.append(item)
    return items if found else None


DEVICE_RE = re.compile(r'^table \S+ (\S+) \{\s*$|^\s*chain (\S+) \{\s*$|type \w+ hook \w+ device "([^"]+)"', re.M)


def devices_from_text(text: str, table: str | None = None) -> dict[str, str]:
    """Base chain -> device, from ``nft list table`` or ``nft list chains``
    text (JSON lacks it in 1.0.6).  ``table``: only the chains of that table
    (``list chains FAMILY`` lists every table of the family)."""
    devices: dict[str, str] = {}
    current = None
    inside = table is None
    for match in DEVICE_RE.finditer(text):
        if match.group(1):
            inside = table is None or match.group(1) == table
            current = None
        elif match.group(2):
            current = match.group(2) if inside else None
        elif current:
            devices[current] = match.group(3)
    return devices


def decode_table(listing: list[dict], devices: dict[str, str] | None = None) -> NftTable | None:
    """Build the model from ``nft -j list table`` output (the list under "nftables")."""
    devices = devices or {}
    table = None
    chains: dict[str, dict] = {}
    rules: dict[str, list[NftRule]] = {}
    maps: list[NftMap] = []
    for item in listing:
        if "table" in item:
            table = item["table"]
        elif "chain" in item:
            chains[item["chain"]["name"]] = item["chain"]
            rules.setdefault(item["chain"]["name"], [])
        elif "rule" in item:
            rule = item["rule"]
            # A rule without kdsr's comment (hand-added) gets a comment that
            # cannot equal any desired rule, so diff reports drift.
            comment = rule.get("comment") or f"foreign handle {rule.get('handle')}"
            # Keep the kernel's own expression: a rollback re-adds exactly it.
            expr = canonical_json(rule.get("expr", []))
            rules.setdefault(rule["chain"], []).append(NftRule(comment=comment, expr_json=expr))
        elif "map" in item:
            maps.append(decode_map(item["map"]))
    if table is None:
        return None
    decoded_chains = []
    for name, obj in chains.items():
        hook = None
        if "hook" in obj:
            hook = ChainHook(
                type=obj.get("type", "filter"),
                hook=obj["hook"],
                device=obj.get("dev") or devices.get(name),
                priority=obj.get("prio", 0),
                policy=obj.get("policy", "accept"),
            )
        decoded_chains.append(NftChain(name=name, hook=hook, rules=tuple(rules.get(name, ()))))
    return NftTable(
        family=table["family"],
        name=table["name"],
        chains=tuple(sorted(decoded_chains, key=lambda c: c.name)),
        maps=tuple(sorted(maps, key=lambda m: m.name)),
    )
