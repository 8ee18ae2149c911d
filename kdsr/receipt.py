"""The receipt of the last verified apply: an unchanged re-apply without
validating or compiling again.

Config management re-applies the same intent every few minutes.  On a large
intent, validating and compiling take most of a no-op's time, to learn
that nothing changed (bench/control_plane.py).  After kdsr has verified that the
kernel matches an intent, it writes a receipt holding:

- ``inputs``: a digest of everything compile reads: kdsr's own code, the
  intent's path and bytes, the node asked for (and, when none was, this
  host's local addresses, which pick it), the servers drained with `kdsr
  drain` and the servers a running health daemon reports down;
- per nftables table kdsr wants or owns, the kernel's token
  (``NftBackend.token``: namespace, boot, ruleset generation and chain
  listing) at which kdsr read or proved the table equal to the intent.  Any
  nftables commit by anyone moves the generation (nft_cache.py);
- everything else the intent wants (addresses, sysctls, links, routes, rules,
  IPVS, BIRD): these have no generation, so they are read and diffed again on
  every use, as a normal plan does, only without the nftables tables;
- the plan's notes and the intent's warnings, shown again.

``unchanged`` answers with an empty plan only when the inputs digest and
every token match and that diff is empty; in every other case it returns
None and the caller plans in full.  A receipt is a cache: any doubt (a file
that does not decode, a kernel that gives no token) is a miss, never an
error.

`kdsr run`'s drift check asks the same question of the kernel, with the
tokens and desired state it keeps in memory after each apply
(``verified_tokens``, ``still_verified``).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from kdsr import model, model_xdp
from kdsr.diff import Plan, diff
from kdsr.health import status as health_status
from kdsr.kernel import Kernel
from kdsr.kernel.nft_cache import netns_cookie
from kdsr.kernel.observe import observe
from kdsr.kernel.state import NodeState, StateStore
from kdsr.kernel.statefiles import StateFileError, ensure_dir, read_text, write_atomic
from kdsr.model import Desired

FORMAT = "kdsr-receipt-1"
PACKAGE = Path(__file__).resolve().parent


@functools.cache
def code_digest() -> str:
    """kdsr's own source and schema: another version compiles differently."""
    digest = hashlib.sha256()
    for path in sorted(PACKAGE.rglob("*")):
        if path.suffix in (".py", ".json") and path.is_file():
            digest.update(str(path.relative_to(PACKAGE)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def inputs_digest(
    source: str,
    text: bytes,
    node_arg: str | None,
    node: str,
    kernel: Kernel,
    store: StateStore,
    down: frozenset[tuple[str, str]] | None = None,
) -> str:
    """Everything the plan for ``node`` depends on besides the kernel;
    ``down``: the servers health reports down (default: as a running daemon
    reports them now)."""
    state = store.load(node)
    if down is None:
        down = health_status.down_servers(health_status.live_view(store, node))
    parts: list[Any] = [
        code_digest(),
        source,
        hashlib.sha256(text).hexdigest(),
        node_arg,
        node,
        sorted(state.drained),
        sorted(map(list, down)),
    ]
    if node_arg is None:
        parts.append(sorted(kernel.links.local_addresses()))
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


# ---------------------------------------------------------------- the file
def _path(store: StateStore, node_arg: str | None) -> Path | None:
    cookie = netns_cookie()
    if cookie is None:
        return None
    which = hashlib.sha256(repr(node_arg).encode()).hexdigest()[:16]
    return store.directory / "cache" / f"receipt-{cookie}-{which}"


def _tables_of(desired: Desired, recorded: Iterable[str]) -> list[tuple[str, str]]:
    idents = {t.ident for t in desired.tables} | set(recorded)
    return sorted(tuple(ident.split(" ", 1)) for ident in idents)  # type: ignore[misc]


def verified_tokens(kernel: Kernel, desired: Desired, state: NodeState) -> dict[str, str] | None:
    """Per nftables table kdsr wants or owns (``"family name"``), the token
    at which this process read or proved it, right after kdsr verified the
    kernel against ``desired``; None when a token cannot vouch for that (a
    commit came in between, or the kernel has no generation)."""
    tokens = {}
    for family, name in _tables_of(desired, state.tables):
        token = kernel.nft.token(family, name)
        if token is None or not token[1]:
            return None
        tokens[f"{family} {name}"] = token[0]
    return tokens


def still_verified(kernel: Kernel, tokens: dict[str, str], rest: Desired, state: NodeState) -> Plan | None:
    """The empty plan when the kernel is still as kdsr verified it: every
    table's token is the one recorded (no nftables commit since, by anyone),
    and ``rest`` (the desired state without its tables: what has no
    generation) diffs empty against a fresh read.  None when anything may
    differ; the caller then plans in full."""
    if set(tokens) != {f"{f} {n}" for f, n in _tables_of(rest, state.tables)}:
        return None  # the record of owned tables changed since
    for ident, token in tokens.items():
        now = kernel.nft.token(*ident.split(" ", 1))
        if now is None or now[0] != token:
            return None
    # The tables are vouched for: diff the rest as a plan would.
    observed = observe(kernel, rest, dataclasses.replace(state, tables=set()))
    if observed.foreign_links or observed.foreign_ipvs:
        return None  # the full plan explains what to do about those
    plan = diff(rest, observed)
    return plan if plan.empty else None


def record(
    store: StateStore,
    kernel: Kernel,
    node_arg: str | None,
    inputs: str,
    desired: Desired,
    notes: list[str],
    warnings: list[str],
    parts: Parts | None = None,
) -> None:
    """Write the receipt right after kdsr verified the kernel against ``desired``
    (an apply's read-back, or an empty plan).  Nothing is written when a
    table's token cannot vouch for that verification: another commit came in
    between, or the kernel has no generation.  ``parts``: the caller's memo
    of encoded parts (``kdsr run`` keeps one), which changes nothing written."""
    path = _path(store, node_arg)
    if path is None:
        return
    tokens = verified_tokens(kernel, desired, store.load(desired.node))
    if tokens is None:
        forget(store, node_arg)
        return
    doc = {
        "format": FORMAT,
        "inputs": inputs,
        "tables": tokens,
        "desired": dataclasses.replace(desired, tables=()),
        "notes": notes,
        "warnings": warnings,
    }
    try:
        ensure_dir(store.directory)
        ensure_dir(path.parent)
        write_atomic(path, (parts or Parts()).dumps(doc, "desired"), sync=False)
    except (OSError, StateFileError):
        pass  # a receipt that cannot be written is a full plan next time


def forget(store: StateStore, node_arg: str | None) -> None:
    path = _path(store, node_arg)
    if path is not None:
        path.unlink(missing_ok=True)


@dataclasses.dataclass(frozen=True)
class Unchanged:
    node: str
    plan: Plan
    warnings: list[str]


def unchanged(store: StateStore, kernel: Kernel, source: str, text: bytes, node_arg: str | None) -> Unchanged | None:
    """An empty plan when the receipt proves nothing changed; else None."""
    path = _path(store, node_arg)
    if path is None:
        return None
    try:
        doc = json.loads(read_text(path))
        if doc["format"] != FORMAT:
            return None
        rest: Desired = decode(doc["desired"])
        tokens: dict[str, str] = doc["tables"]
    except (OSError, ValueError, KeyError, TypeError, StateFileError):
        return None
    if doc["inputs"] != inputs_digest(source, text, node_arg, rest.node, kernel, store):
        return None
    plan = still_verified(kernel, tokens, rest, store.load(rest.node))
    if plan is None:
        return None
    plan.notes = list(doc["notes"])
    return Unchanged(node=rest.node, plan=plan, warnings=list(doc["warnings"]))


# ---------------------------------------------------------------- codec
# The model's frozen dataclasses as JSON: {"$": class name, field: value},
# tuples as {"t": [...]}, sets as {"s": [...]}.  Only the model's classes
# (kdsr.model, and kdsr.model_xdp for the xdp engine's state) decode.
_CLASSES = {
    name: cls
    for module in (model, model_xdp)
    for name, cls in vars(module).items()
    if dataclasses.is_dataclass(cls) and cls.__module__ == module.__name__
}


_PLAIN = (str, int, float, bool, type(None))


def encode(value: Any, memo: Any = None) -> Any:
    """``memo(value)``: a stand-in for ``value``'s encoding, or None to encode it here."""
    if memo is not None and (stand_in := memo(value)) is not None:
        return stand_in
    # The xdp engine's tables hold hundreds of thousands of address strings:
    # plain values, and tuples of nothing else, leave without the checks below.
    if type(value) in _PLAIN:
        return value
    if type(value) is tuple and all(type(v) is str for v in value):
        return {"t": list(value)}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = {f.name: encode(getattr(value, f.name), memo) for f in dataclasses.fields(value)}
        return {"$": type(value).__name__, **fields}
    if isinstance(value, tuple):
        return {"t": [encode(v, memo) for v in value]}
    if isinstance(value, (set, frozenset)):
        return {"s": [encode(v, memo) for v in sorted(value, key=repr)]}
    if isinstance(value, list):
        return [encode(v, memo) for v in value]
    if isinstance(value, dict):
        return {"d": [[encode(k, memo), encode(v, memo)] for k, v in value.items()]}
    return value


class Parts:
    """The JSON text of the receipt's large parts (the xdp engine's tables,
    services and servers), by the identity of the frozen objects they encode.

    ``kdsr run`` writes a receipt after every health event and reload, where
    one pool changed; compile hands back the very objects of the last compile
    for the rest (kdsr/compile/cache.py), so their text is reused instead of
    encoded again.  The text is the one ``encode`` gives: a receipt written
    with parts reads back as one written without.  Holds the parts of the
    last receipt only."""

    # Where a part goes in the document before its text does: no JSON string
    # kdsr writes holds a NUL (the stand-ins are checked all the same).
    _MARK = "\0kdsr-receipt-part-"

    def __init__(self) -> None:
        self._texts: dict[int, tuple[Any, str]] = {}

    def dumps(self, doc: dict, model_key: str) -> str:
        """``doc`` as JSON, its ``model_key`` encoded (``encode``), the rest as it is."""
        used: dict[int, tuple[Any, str]] = {}
        order: list[str] = []

        def memo(value: Any) -> Any:
            if type(value) is model_xdp.XdpSelector or (
                type(value) is tuple and value and type(value[0]) in (model_xdp.XdpService, model_xdp.XdpServer)
            ):
                known = self._texts.get(id(value))
                if known is None or known[0] is not value:
                    known = (value, json.dumps(encode(value), separators=(",", ":")))
                used[id(value)] = known
                order.append(known[1])
                return f"{self._MARK}{len(order) - 1}"
            return None

        text = json.dumps({**doc, model_key: encode(doc[model_key], memo)}, separators=(",", ":"))
        self._texts = used
        pieces = text.split(json.dumps(self._MARK)[:-1])
        if len(pieces) != len(order) + 1:  # a stand-in's text elsewhere in the document
            return json.dumps({**doc, model_key: encode(doc[model_key])}, separators=(",", ":"))
        out = [pieces[0]]
        for piece in pieces[1:]:
            number, rest = piece.split('"', 1)
            out.append(order[int(number)])
            out.append(rest)
        return "".join(out)


def decode(value: Any) -> Any:
    if isinstance(value, list):
        return [decode(v) for v in value]
    if not isinstance(value, dict):
        return value
    if "$" in value:
        cls = _CLASSES[value["$"]]
        return cls(**{k: decode(v) for k, v in value.items() if k != "$"})
    if "t" in value:
        return tuple(decode(v) for v in value["t"])
    if "s" in value:
        return frozenset(decode(v) for v in value["s"])
    if "d" in value:
        return {decode(k): decode(v) for k, v in value["d"]}
    raise ValueError(f"not a receipt value: {sorted(value)}")
