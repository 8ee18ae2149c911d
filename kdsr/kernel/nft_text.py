"""kdsr's libnftables JSON batch -> nft's text language, for what JSON cannot
say, and for large batches (kdsr/kernel/nft.py ``TEXT_BATCH_ELEMENTS``:
libnftables' text parser holds less memory than its JSON parser for a
full apply's elements).

libnftables before 1.0.9 (Debian bookworm ships 1.0.6) has no JSON form for
the map statement, ``update @map { key : data }``: its JSON parser rejects it
("Unknown statement object 'map'") and its JSON listing prints the rule as a
plain string.  Flow pinning needs exactly that statement, so a batch that
holds one is sent as text instead.  A text buffer given to libnftables is one
transaction, like a JSON batch: all or nothing, and ``nft -c`` checks it.

Only the objects kdsr writes are rendered (tables, chains, maps, elements,
rules with the expressions kdsr's compilers and the kernel's listings use);
anything else raises ``KernelError`` naming it, never a guess.  A rule read
back from the kernel keeps the listing's string for a statement JSON cannot
express; strings are passed through verbatim (they are nft's own text).

Pure: no kernel access.
"""

from __future__ import annotations

from typing import Any

from kdsr.kernel import KernelError

# Map key types nft 1.0.6 can only declare with ``typeof``: a 32-bit integer
# (a flow hash).  ``typeof jhash ...`` crashes nft 1.0.6's text listing;
# ``typeof symhash ...`` declares the same kind of value and lists back fine.
_TYPEOF_KEYS = {"integer": "symhash mod 2"}
_TYPEOF_DATA = {"mark": "meta mark"}
_RELATIONS = {"==": "==", "!=": "!=", "<": "<", ">": ">", "<=": "<=", ">=": ">=", "in": ""}


def needs_text(commands: list[dict]) -> bool:
    """True when the batch holds something libnftables 1.0.6 cannot read as JSON."""
    # Element commands hold only keys and values (no statement, no map
    # declaration): skipping them keeps this check off a 271,000-element
    # batch's critical path.
    return any(_needs_text(cmd) for cmd in commands if not _is_elements(cmd))


def _is_elements(cmd: dict) -> bool:
    body = next(iter(cmd.values())) if len(cmd) == 1 else None
    return isinstance(body, dict) and "element" in body


def element_count(commands: list[dict]) -> int:
    """Map elements the batch adds or deletes (element commands and map declarations)."""
    count = 0
    for cmd in commands:
        for body in cmd.values():
            if isinstance(body, dict):
                obj = body.get("element") or body.get("map")
                if isinstance(obj, dict):
                    count += len(obj.get("elem") or ())
    return count


def _needs_text(value: Any) -> bool:
    if isinstance(value, dict):
        if isinstance(value.get("map"), dict) and "op" in value["map"]:
            return True  # the map statement
        if value.get("type") == "integer" and "name" in value:
            return True  # a map declared with typeof
        if "chain" in value and any(isinstance(stmt, str) for stmt in value.get("expr", [])):
            return True  # a rule read back with a statement JSON printed as text
        return any(_needs_text(v) for v in value.values())
    if isinstance(value, list):
        return any(_needs_text(v) for v in value)
    return False


def render(commands: list[dict]) -> str:
    """The batch as nft text, one command per line (one transaction when given together)."""
    lines = []
    for cmd in commands:
        if "metainfo" in cmd:
            continue
        ((verb, body),) = cmd.items()
        ((kind, obj),) = body.items()
        try:
            lines.append(_command(verb, kind, obj))
        except (KeyError, TypeError, ValueError) as exc:  # a shape the renderer does not know
            raise KernelError(f"kdsr cannot write this '{verb} {kind}' as nft text ({exc!r})") from exc
    return "\n".join(lines) + "\n"


def _command(verb: str, kind: str, obj: dict) -> str:
    if verb not in ("add", "delete", "flush"):
        raise KernelError(f"kdsr cannot write '{verb}' as nft text")
    if kind == "table":
        return f"{verb} table {obj['family']} {obj['name']}"
    where = f"{obj['family']} {obj['table']}"
    if kind == "chain":
        text = f"{verb} chain {where} {obj['name']}"
        if verb == "add" and "hook" in obj:
            device = f' device "{_quoted(obj["dev"])}"' if obj.get("dev") else ""
            text += (
                f" {{ type {obj['type']} hook {obj['hook']}{device} priority {obj['prio']};"
                f" policy {obj.get('policy', 'accept')}; }}"
            )
        return text
    if kind == "map":
        if verb != "add":
            return f"{verb} map {where} {obj['name']}"
        return f"add map {where} {obj['name']} {{ {_map_body(obj)} }}"
    if kind == "element":
        items = ", ".join(_element(item) for item in obj["elem"])
        return f"{verb} element {where} {obj['name']} {{ {items} }}"
    if kind == "rule" and verb == "add":
        text = f"add rule {where} {obj['chain']} {' '.join(_statement(s) for s in obj['expr'])}"
        if obj.get("comment"):
            text += f' comment "{_quoted(obj["comment"])}"'
        return text
    raise KernelError(f"kdsr cannot write '{verb} {kind}' as nft text")


def _map_body(obj: dict) -> str:
    key, data = obj["type"], obj["map"]
    if isinstance(key, str) and key in _TYPEOF_KEYS:
        if data not in _TYPEOF_DATA:
            raise KernelError(f"kdsr cannot declare map {obj['name']} ({key} : {data}) in nft text")
        parts = [f"typeof {_TYPEOF_KEYS[key]} : {_TYPEOF_DATA[data]}"]
    else:
        keys = " . ".join(key) if isinstance(key, list) else key
        parts = [f"type {keys} : {data}"]
    if obj.get("flags"):
        parts.append(f"flags {', '.join(obj['flags'])}")
    if any("counter" in stmt for stmt in obj.get("stmt", [])):
        parts.append("counter")
    if obj.get("size") is not None:
        parts.append(f"size {obj['size']}")
    if obj.get("timeout") is not None:
        parts.append(f"timeout {obj['timeout']}s")
    if obj.get("elem"):
        parts.append(f"elements = {{ {', '.join(_element(item) for item in obj['elem'])} }}")
    return "; ".join(parts) + ";"


def _element(item: Any) -> str:
    if type(item) is list and type(item[0]) is int and type(item[1]) is str:
        return f"{item[0]} : {_value(item[1])}"  # a slot -> server element, the bulk of a large batch
    key, value = item if isinstance(item, list) else (item, None)
    text = _elem_key(key)
    return text if value is None else f"{text} : {_value(value)}"


def _elem_key(key: Any) -> str:
    if isinstance(key, dict) and "elem" in key:
        elem = key["elem"]
        text = _value(elem["val"])
        if elem.get("timeout") is not None:
            text += f" timeout {elem['timeout']}s"
        if elem.get("comment"):
            text += f' comment "{_quoted(elem["comment"])}"'
        return text
    return _value(key)


def _value(value: Any) -> str:
    """A constant: number, address, name, range, concatenation, verdict."""
    if isinstance(value, bool):
        raise KernelError(f"kdsr cannot write {value!r} as an nft value")
    if isinstance(value, (int, str)):
        return str(value)
    if isinstance(value, dict):
        if "concat" in value:
            return " . ".join(_value(part) for part in value["concat"])
        if "range" in value:
            first, last = value["range"]
            return f"{_value(first)}-{_value(last)}"
        for verdict in ("jump", "goto"):
            if verdict in value:
                return f"{verdict} {value[verdict]['target']}"
        return _expr(value)
    raise KernelError(f"kdsr cannot write {value!r} as an nft value")


def _expr(expr: Any) -> str:
    if not isinstance(expr, dict):
        return _value(expr)
    ((kind, body),) = expr.items()
    if kind == "payload":
        return f"{body['protocol']} {body['field']}"
    if kind == "meta":
        return f"meta {body['key']}"
    if kind == "concat":
        return " . ".join(_expr(part) for part in body)
    if kind == "jhash":
        text = f"jhash {_expr(body['expr'])} mod {body['mod']} seed {body.get('seed', 0):#x}"
        if body.get("offset"):
            text += f" offset {body['offset']}"
        return text
    if kind == "map":
        return f"{_expr(body['key'])} map {body['data']}"
    if kind in ("range", "jump", "goto"):
        return _value(expr)
    raise KernelError(f"kdsr cannot write the expression '{kind}' as nft text")


def _statement(stmt: Any) -> str:
    if isinstance(stmt, str):
        return stmt  # nft's own text, from a listing
    ((kind, body),) = stmt.items()
    if kind in ("accept", "drop", "return", "continue"):
        return kind
    if kind == "counter":
        return "counter"
    if kind in ("jump", "goto"):
        return f"{kind} {body['target']}"
    if kind == "match":
        op = _RELATIONS.get(body.get("op", "=="))
        if op is None:
            raise KernelError(f"kdsr cannot write the relation '{body.get('op')}' as nft text")
        right = body["right"]
        right_text = right if isinstance(right, str) and right.startswith("@") else _value(right)
        return " ".join(part for part in (_expr(body["left"]), op, right_text) if part)
    if kind == "mangle":
        return f"{_expr(body['key'])} set {_expr(body['value'])}"
    if kind == "vmap":
        return f"{_expr(body['key'])} vmap {body['data']}"
    if kind == "fwd":
        dev = body["dev"]
        device = _expr(dev) if isinstance(dev, dict) else f'"{_quoted(dev)}"'  # a map lookup, or a name
        if "addr" in body:
            return f"fwd {body['family']} to {_expr(body['addr'])} device {device}"
        return f"fwd to {device}"
    if kind == "map" and "op" in body:
        return f"{body['op']} {body['map']} {{ {_elem_key(body['elem'])} : {_expr(body['data'])} }}"
    raise KernelError(f"kdsr cannot write the statement '{kind}' as nft text")


def _quoted(text: str) -> str:
    """Text inside nft double quotes.  Only printable ASCII without quote or
    backslash gets through: the schema already keeps names to [a-z0-9-], so
    this is the second line of defence against rule text from intent data."""
    if not all(" " <= ch <= "~" and ch not in '"\\' for ch in text):
        raise KernelError(f"kdsr cannot quote {text!r} in nft text")
    return text
