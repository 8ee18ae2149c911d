"""A kdsr table as last read or written, kept on disk while nothing has
committed an nftables transaction since.

Listing a table is the dearest thing kdsr does: a listing of each map
(Nftables._list_table, kdsr/kernel/nft.py), so a large table takes seconds to list and
decode (bench/control_plane.py).  The kernel bumps
its ruleset generation on every committed transaction, whoever sends it
(nft_generation.py).  A table recorded together with the generation it was
read at is therefore still the kernel's table while the generation is the
same: the no-op re-apply that config management runs every few minutes, and
`kdsr plan`, need not list it again; an `nft` command by anyone (a flush, a
hand-added element) bumps the generation and forces a fresh listing.

A record names its network namespace (the kernel's never-reused netns
cookie), the boot, and the kdsr version that decoded it; any mismatch, or a
file that does not decode, is simply a miss.  Elements the packet path adds
(flow pins, in maps with timeouts) do not bump the generation and are never
compared, so they are never recorded either.

Two cases where the generation stays while a table changes are the
kernel's own: a netdev base chain loses its hook when its device goes away,
and an element of L3's tunnel-link map (an interface index) points at
nothing once its link is deleted, or at the wrong index once the link is
made again.  The first shows in the table's chain listing (no elements), the
second in the indexes of kdsr's tunnel links; both are compared on every
use (``chain_fingerprint``).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kdsr.kernel.statefiles import StateFileError, ensure_dir, read_text, write_atomic
from kdsr.memo import BoundedMemo
from kdsr.model import ChainHook, NftChain, NftMap, NftRule, NftTable, element

FORMAT = 2  # 2: one line per map, so a load keeps each map's text
SO_NETNS_COOKIE = 71  # <asm-generic/socket.h>, Linux >= 5.14
BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


def netns_cookie() -> int | None:
    """This network namespace's cookie (unique within a boot), or None."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            return int.from_bytes(sock.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8), "little")
    except OSError:
        return None


def boot_id() -> str:
    try:
        return BOOT_ID.read_text().strip()
    except OSError:
        return ""


# The code that decodes and compares tables, by file (read, not imported:
# the kernel layer imports nothing above it).
_CODE = ("model.py", "kernel/nft_json.py", "diff.py", "kernel/nft_cache.py")


@functools.cache
def _code_identity() -> str:
    """The code that decodes and compares tables: a record made by other code
    (an upgrade, or a checkout between two commits) is a miss."""
    package = Path(__file__).resolve().parent.parent
    digest = hashlib.sha256()
    for name in _CODE:
        digest.update((package / name).read_bytes())
    return digest.hexdigest()[:16]


# ---------------------------------------------------------------- codec
def _tuples(value):
    """JSON has no tuples: keys and values of map elements come back as lists."""
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    return value


def encode_table_text(table: NftTable, texts: EncodedTexts | None = None, remember: bool = True) -> str:
    """The table as JSON lines: the table without its maps, then one line
    per map.  ``texts``: the encodings already made, by map and element
    tuple (see ``EncodedTexts``), so recording a table after a change
    re-encodes only the changed maps, not every element.  ``remember``:
    keep the texts of maps not seen before (compiled maps, which the next
    compile hands back); a table just listed from the kernel is made of new
    objects no later record meets, and keeping them would keep every
    listing's elements alive."""
    texts = texts if texts is not None else EncodedTexts()
    chains = []
    for chain in table.chains:
        hook = None
        if chain.hook is not None:
            h = chain.hook
            hook = [h.type, h.hook, h.device, h.priority, h.policy]
        rules = [[r.comment, r.expr_json] for r in chain.rules]
        chains.append({"name": chain.name, "hook": hook, "rules": rules, "pointer": chain.pointer})
    head = _dumps({"family": table.family, "name": table.name, "pointer": table.pointer, "chains": chains})
    return "\n".join([head, *(texts.map_text(m, remember) for m in table.maps)])


def _by_identity(
    known: BoundedMemo[int, tuple[object, str]], obj: object, make: Callable[[Any], str], remember: bool
) -> str:
    """``obj``'s text from ``known``, by identity, else made (and kept when
    ``remember``).  The object is kept alive with its text, so its id cannot
    be reused while remembered."""
    found = known.get(id(obj))
    if found is not None and found[0] is obj:
        return found[1]
    made = make(obj)
    if remember:
        known.put(id(obj), (obj, made))
    return made


class EncodedTexts:
    """The encodings of maps and of element tuples, by identity, kept by a
    TableCache for the life of its kernel handle: the daemon records its
    table after every change, and compile (with its CompileCache) hands
    back the very map objects and element tuples of every unchanged pool."""

    def __init__(self) -> None:
        self._maps: BoundedMemo[int, tuple[object, str]] = BoundedMemo(4096)
        self._elements: BoundedMemo[int, tuple[object, str]] = BoundedMemo(4096)

    def map_text(self, nmap: NftMap, remember: bool = True) -> str:
        return _by_identity(
            self._maps,
            nmap,
            lambda m: f"{_dumps(_encode_declaration(m))[:-1]},{self._elements_text(m.elements, remember)}}}",
            remember,
        )

    def keep(self, nmap: NftMap, text: str) -> None:
        """``text`` is ``nmap``'s encoding (a record's line, or an equal map's)."""
        self._maps.put(id(nmap), (nmap, text))

    def known(self, nmap: NftMap) -> str | None:
        found = self._maps.get(id(nmap))
        return found[1] if found is not None and found[0] is nmap else None

    def _elements_text(self, elements: tuple, remember: bool) -> str:
        """The ``"keys":…,"values":…,"index":…`` members of a map's JSON object."""
        return _by_identity(self._elements, elements, _encode_elements, remember)


def _dumps(data) -> str:
    return json.dumps(data, separators=(",", ":"))


def _encode_declaration(nmap: NftMap) -> dict:
    return {
        "name": nmap.name,
        "key_type": list(nmap.key_type),
        "data_type": nmap.data_type,
        "flags": list(nmap.flags),
        "counter": nmap.counter,
        "size": nmap.size,
        "timeout": nmap.timeout,
        "pointer": nmap.pointer,
    }


def _encode_elements(elements: tuple) -> str:
    # Parallel lists, each distinct value once: a map of 16,381 slots over 16
    # servers stores 16 values and a list of indexes.
    values: dict[tuple, int] = {}
    index = [values.setdefault((elem.value, elem.comment), len(values)) for _key, elem in elements]
    keys = [key for key, _elem in elements]
    encoded = {
        "keys": None if keys == list(range(len(keys))) else keys,  # slot maps: 0..M-1
        "values": [[value, comment] for value, comment in values],
        "index": index,
    }
    return _dumps(encoded)[1:-1]


def decode_table(text: str) -> tuple[NftTable, list[tuple[NftMap, str]]]:
    """A table from its JSON lines, with each map and the line it came from."""
    head, *lines = text.split("\n")
    doc = json.loads(head)
    chains = []
    for c in doc["chains"]:
        hook = ChainHook(*c["hook"]) if c["hook"] is not None else None
        rules = tuple(NftRule(comment=comment, expr_json=expr) for comment, expr in c["rules"])
        chains.append(NftChain(name=c["name"], hook=hook, rules=rules, pointer=c["pointer"]))
    maps = [(_decode_map(json.loads(line)), line) for line in lines]
    table = NftTable(
        family=doc["family"],
        name=doc["name"],
        chains=tuple(chains),
        maps=tuple(m for m, _line in maps),
        pointer=doc["pointer"],
    )
    return table, maps


def _decode_map(m: dict) -> NftMap:
    values = [element(_tuples(value), comment) for value, comment in m["values"]]
    if m["keys"] is None:
        keys = range(len(m["index"]))
    elif all(isinstance(k, int | str) for k in m["keys"]):
        keys = m["keys"]
    else:
        keys = [_tuples(k) for k in m["keys"]]
    elements = tuple(zip(keys, map(values.__getitem__, m["index"]), strict=True))
    return NftMap(
        name=m["name"],
        key_type=tuple(m["key_type"]),
        data_type=m["data_type"],
        flags=tuple(m["flags"]),
        counter=m["counter"],
        elements=elements,
        pointer=m["pointer"],
        size=m["size"],
        timeout=m["timeout"],
    )


# ---------------------------------------------------------------- the store
class TableCache:
    """One file per (netns, table) under ``<state dir>/cache/``."""

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory) / "cache"
        self._cookie = netns_cookie()
        self._texts = EncodedTexts()
        # The maps of the last load, by name, with their record lines.
        self._loaded: dict[str, tuple[NftMap, str]] = {}

    def _path(self, family: str, name: str) -> Path | None:
        if self._cookie is None:
            return None
        return self.directory / f"nft-{self._cookie}-{family}-{name}"

    def _identity(self) -> dict:
        return {"format": FORMAT, "code": _code_identity(), "boot": boot_id(), "netns": self._cookie}

    def load(self, family: str, name: str, generation: int, chains: str) -> NftTable | None:
        """The table recorded at ``generation`` with this chain fingerprint, or None."""
        path = self._path(family, name)
        if path is None:
            return None
        try:
            head, _, rest = read_text(path).partition("\n")
            doc = json.loads(head)
            if doc["identity"] != self._identity() or doc["generation"] != generation or doc["chains"] != chains:
                return None
            table, maps = decode_table(rest)
        except (OSError, ValueError, KeyError, TypeError, StateFileError):
            return None
        # Each map's line is its text: recording the table again (after a
        # change, or from the compiled twin of a map that did not change)
        # re-encodes only what changed.
        self._loaded = {m.name: (m, line) for m, line in maps}
        return table

    def adopt(self, read: NftTable, same: NftTable) -> None:
        """``same`` equals ``read`` (the caller compared them): its maps take
        the texts of ``read``'s, so the next record encodes neither.  A
        map's intent pointer does not take part (a table listed from the
        kernel has none, and the record of a read is only ever compared)."""
        by_name = {m.name: m for m in read.maps}
        for nmap in same.maps:
            twin = by_name.get(nmap.name)
            text = self._text_of(twin)
            if text is not None:
                self._texts.keep(nmap, text)

    def _text_of(self, nmap: NftMap | None) -> str | None:
        if nmap is None:
            return None
        loaded = self._loaded.get(nmap.name)
        if loaded is not None and loaded[0] is nmap:
            return loaded[1]
        return self._texts.known(nmap)

    def save(self, generation: int, chains: str, table: NftTable, remember: bool = True) -> None:
        """``remember``: as for ``encode_table_text`` (False for a table just listed)."""
        path = self._path(table.family, table.name)
        if path is None:
            return
        for nmap in table.maps:
            # A map equal to the one last loaded (a new process's apply of
            # one change: every other map) keeps the loaded map's text.
            loaded = self._loaded.get(nmap.name)
            if loaded is None or loaded[0] is nmap or self._texts.known(nmap) is not None:
                continue
            if loaded[0] == nmap:
                self._texts.keep(nmap, loaded[1])
        head = _dumps({"identity": self._identity(), "generation": generation, "chains": chains})
        text = f"{head}\n{encode_table_text(table, self._texts, remember)}"
        try:
            ensure_dir(self.directory.parent)  # the state directory's own checks (0700, ours) first
            write_atomic(path, text, sync=False)
        except (OSError, StateFileError):
            pass  # a cache that cannot be written is a miss next time, not an error

    def forget(self, family: str, name: str) -> None:
        path = self._path(family, name)
        if path is not None:
            path.unlink(missing_ok=True)
