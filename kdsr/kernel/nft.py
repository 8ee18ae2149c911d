"""nftables: kdsr's tables through libnftables, JSON to read them.

One transaction per table change (``Nftables.apply``), checked first where
apply asks (``check_only``: libnftables' dry run).  Reads are kept while
the kernel's ruleset generation says they are current (nft_generation.py),
in this process and, with a state directory, across processes
(nft_cache.py); ``token`` lets a receipt vouch for a table without listing
it (kdsr/receipt.py).
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import functools
import hashlib
import json
import os
import re
import socket
import sys
import tempfile

from kdsr import naming
from kdsr.kernel import KernelError, nft_text
from kdsr.kernel.nft_cache import TableCache, boot_id, netns_cookie
from kdsr.kernel.nft_generation import read_generation
from kdsr.kernel.nft_json import (
    decode_elements,
    decode_table,
    devices_from_text,
    is_dynamic,
    share_verdicts,
    table_items,
)
from kdsr.model import NftTable


def _nftables():
    try:
        import nftables  # libnftables' binding, from the distribution (python3-nftables)
    except ImportError as exc:  # pragma: no cover - depends on the host
        raise KernelError(
            "the Python binding of libnftables is missing: install the distribution package "
            "python3-nftables and use a venv made with --system-site-packages (scripts/setup.sh does)"
        ) from exc
    return nftables


# libnftables 1.0.6 lists a map statement (flow pinning) in JSON as its text
# and says so on the process's own stderr, past the binding's buffers.
NO_JSON_CALLBACK = re.compile(r"warning: stmt ops \w+ have no json callback\n?")


@contextlib.contextmanager
def _stderr_without(noise: re.Pattern):
    """Run the block with file descriptor 2 captured; pass on all but ``noise``."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            rest = noise.sub("", captured.read().decode(errors="replace"))
            if rest:
                sys.stderr.write(rest)


def _structure(table: NftTable) -> tuple:
    """A table without its map elements, in name order (a listing has the
    kernel's order), compared as the diff compares them."""
    chains = sorted((c.name, c.hook, c.rules) for c in table.chains)
    return tuple(chains), tuple(sorted((m.name, m.declaration()) for m in table.maps))


def _only_chains(before: NftTable, becomes: NftTable) -> NftTable:
    """``before`` without the chains ``becomes`` no longer has."""
    keep = {c.name for c in becomes.chains}
    return dataclasses.replace(before, chains=tuple(c for c in before.chains if c.name in keep))


# A batch with this many map elements or more goes to libnftables as text:
# on a full apply's batch (nft 1.0.6) its JSON parser holds far more memory
# while it builds the transaction than its text parser, for about the same
# time (bench/control_plane.py's peak RSS).  Below this, JSON (the path
# every other change takes).
TEXT_BATCH_ELEMENTS = 20_000


# Text batches this long (characters) or longer are large: before and after
# one, freed memory is handed back (``_release_freed``).
LARGE_TEXT = 1 << 20


def _in_memory_file(text: str):
    """``text`` in an anonymous file that lives in memory (memfd), written
    and flushed, for libnftables to open by its /proc/self/fd path."""
    out = open(os.memfd_create("kdsr-nft-batch", os.MFD_CLOEXEC), "w", encoding="utf-8")  # noqa: SIM115 - the caller closes it
    try:
        out.write(text)
        out.flush()
    except OSError:
        out.close()
        raise
    return out


def _as_text(commands: list[dict]) -> str | None:
    """The batch as nft text when it has to be or is better sent so, else None (JSON)."""
    if nft_text.needs_text(commands):
        # libnftables < 1.0.9 has no JSON for the map statement (flow
        # pinning): the same batch as text, still one transaction.
        return nft_text.render(commands)
    if nft_text.element_count(commands) < TEXT_BATCH_ELEMENTS:
        return None
    try:
        return nft_text.render(commands)
    except KernelError:
        return None  # something text cannot say: JSON says it, at JSON's cost


# Reads of a table in pieces (Nftables._list_table) made while the
# ruleset generation moved under them, before the table is listed whole.
PIECES_TRIES = 3


def _reader():
    """A libnftables context of its own for a read: libnftables keeps what a
    listing fetched until the context's next command, and freeing that takes
    time in proportion to the elements; a throw-away context keeps that cost
    with the read, off the next transaction."""
    ctx = _nftables().Nftables()
    ctx.set_json_output(True)
    ctx.set_handle_output(False)
    return ctx


def _listed(ctx, command: str, what: str, rules: bool = True) -> list[dict] | None:
    """The JSON listing ``command`` (nft text, or a JSON document) prints;
    None when what it lists does not exist.  ``what`` names it in an error;
    ``rules``: the listing may hold rules (see NO_JSON_CALLBACK)."""
    with _stderr_without(NO_JSON_CALLBACK) if rules else contextlib.nullcontext():
        rc, out, err = ctx.cmd(command)
    if rc != 0:
        if "No such file or directory" in err:
            return None
        raise KernelError(f"nft list {what}: {err.strip()}")
    return json.loads(out)["nftables"]


def _list_structure(ctx, family: str, name: str) -> list[dict] | None:
    """The table's chains, rules and map declarations (no map elements),
    from a terse listing of its family; None when there is no such table."""
    ctx.set_terse_output(True)
    try:
        items = table_items(_listed(ctx, f"list ruleset {family}", f"ruleset {family}") or [], name)
    finally:
        ctx.set_terse_output(False)
    _release_freed()
    if items is not None:
        _add_devices(ctx, family, name, items)
    return items


def _map_elements(ctx, family: str, name: str, map_name: str) -> list:
    """One map's listed elements ([] if the map is gone: the generation says
    the read was of two states).  The command is JSON, so a map named by
    hand in kdsr's table needs no quoting."""
    command = {"nftables": [{"list": {"map": {"family": family, "table": name, "name": map_name}}}]}
    listing = _listed(ctx, json.dumps(command), f"map {family} {name} {map_name}", rules=False) or []
    return next((item["map"].get("elem", []) for item in listing if "map" in item), [])


def _whole(family: str, name: str) -> list[dict] | None:
    """The table in one listing: every element of every map, fetched and
    printed at once (the dearest read; see Nftables._list_table)."""
    ctx = _reader()
    listing = _listed(ctx, f"list table {family} {name}", f"table {family} {name}")
    _release_freed()
    if listing is not None:
        _add_devices(ctx, family, name, listing)
    return listing


def _add_devices(ctx, family: str, name: str, items: list[dict]) -> None:
    """nft 1.0.6's JSON listing omits a netdev base chain's device: put the
    one the text listing of the family's chains names (no set elements are
    fetched for it) into the chain objects of ``items``."""
    hooked = [i["chain"] for i in items if "hook" in i.get("chain", {}) and "dev" not in i["chain"]]
    if family != "netdev" or not hooked:
        return
    ctx.set_json_output(False)
    try:
        rc, text, _err = ctx.cmd(f"list chains {family}")
    finally:
        ctx.set_json_output(True)
    devices = devices_from_text(text, name) if rc == 0 else {}
    for chain in hooked:
        if chain["name"] in devices:
            chain["dev"] = devices[chain["name"]]


def _release_freed() -> None:
    """Hand the memory a large libnftables call freed back to the system
    (glibc keeps freed heap memory for reuse, but Python's own allocator
    takes new memory from the system rather than from that heap, so what a
    listing or a transaction freed would add to whatever comes after it)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim():
    try:
        return ctypes.CDLL(None).malloc_trim  # glibc; other C libraries have none
    except (OSError, AttributeError):
        return None


class Nftables:
    """kdsr's nftables tables in the kernel (libnftables)."""

    def __init__(self, cache_dir: str | os.PathLike | None = None) -> None:
        """``cache_dir``: the state directory, where table reads are kept
        across processes while the nftables generation allows (nft_cache.py)."""
        self._disk = TableCache(cache_dir) if cache_dir is not None else None
        self.writes = 0
        self._nft = None
        # (family, name) -> (ruleset generation, table) of the last read
        self._tables_read: dict[tuple[str, str], tuple[int, NftTable | None]] = {}

    @property
    def _context(self):
        """This process's libnftables context (listings take throw-away ones)."""
        if self._nft is None:
            self._nft = _nftables().Nftables()
            self._nft.set_json_output(True)
            self._nft.set_handle_output(False)
        return self._nft

    def _cmd(self, text: str) -> tuple[int, str, str]:
        return self._context.cmd(text)

    def list_tables(self) -> list[tuple[str, str]]:
        rc, out, err = self._cmd("list tables")
        if rc != 0:
            raise KernelError(f"nft list tables: {err.strip()}")
        items = json.loads(out or '{"nftables": []}')["nftables"]
        return [(i["table"]["family"], i["table"]["name"]) for i in items if "table" in i]

    def read_table(self, family: str, name: str, reuse: bool = False) -> NftTable | None:
        """The table as the kernel has it.  ``reuse``: the last read of it if no
        nftables transaction committed since."""
        generation = read_generation()  # before the listing: a change in between only forces a re-read
        if reuse and generation is not None and (family, name) in self._tables_read:
            seen, table = self._tables_read[(family, name)]
            if seen == generation:
                return table
        chains = self._chain_fingerprint(family) if self._disk is not None and generation is not None else None
        if reuse and chains is not None:
            table = self._disk.load(family, name, generation, chains)
            if table is not None:
                self._tables_read[(family, name)] = (generation, table)
                return table
        listed_at, table = self._list_table(family, name)
        if generation is not None:
            # Kept at the generation read first: if the listing is of a later
            # one, the next read lists again.
            self._tables_read[(family, name)] = (generation, table)
            if chains is not None and listed_at == generation:
                self._record(family, name, generation, chains, table, remember=False)
        return table

    def adopt(self, read: NftTable, same: NftTable) -> None:
        """Keep ``same`` as the last read of its table, in place of ``read``,
        which the caller found equal to it.  Only while ``read`` is still the
        read kept (a later read would be of another generation), and the
        generation stays the one ``read`` was made at: a change since still
        forces a listing."""
        key = (same.family, same.name)
        kept = self._tables_read.get(key)
        if kept is not None and kept[1] is read:
            self._tables_read[key] = (kept[0], same)
            if self._disk is not None:
                self._disk.adopt(read, same)

    def token(self, family: str, name: str) -> tuple[str, bool] | None:
        """A token for the family's nftables state now (namespace, boot,
        ruleset generation, chain listing), and whether this process read or
        proved the table at that very generation (so its verdict on the table
        still holds).  None when the kernel cannot say (no generation)."""
        generation = read_generation()
        chains = self._chain_fingerprint(family) if generation is not None else None
        if chains is None:
            return None
        digest = hashlib.sha256(chains.encode()).hexdigest()
        token = f"{netns_cookie()}:{boot_id()}:{generation}:{digest}"
        known = self._tables_read.get((family, name))
        return token, known is not None and known[0] == generation

    def _chain_fingerprint(self, family: str) -> str | None:
        """The family's chains with their hooks, devices and handles (cheap:
        no set elements are fetched), and for netdev the indexes of kdsr's
        tunnel links; None when they cannot be listed."""
        self._context.set_json_output(False)
        self._context.set_handle_output(True)
        try:
            rc, text, _err = self._cmd(f"list chains {family}")
        finally:
            self._context.set_json_output(True)
            self._context.set_handle_output(False)
        if rc != 0:
            return None
        if family == "netdev":
            # kdsr's L3 tunnel-link map holds links by index: a tunnel made
            # again under its old name (which bumps no nftables generation)
            # must not pass for the one recorded.
            links = (f"{i}:{n}" for i, n in socket.if_nameindex() if naming.is_kdsr_link_name(n))
            text += "\n" + " ".join(links)
        return text

    def _record(
        self, family: str, name: str, generation: int, chains: str, table: NftTable | None, remember: bool = True
    ) -> None:
        """``remember``: False for a table just listed (nft_cache.encode_table_text)."""
        if table is None:
            self._disk.forget(family, name)
        else:
            self._disk.save(generation, chains, table, remember)

    # ---------------------------------------------------------------- reading a table
    # A table is read in pieces: its structure (chains, rules, map
    # declarations) from one terse listing of its family, then each map's
    # elements from a listing of that map alone.  nft 1.0.6 fetches every
    # element of every set of the table into its cache for a listing of the
    # table or of one of its chains, terse or not, and builds a JSON listing
    # as one tree before printing it; a terse listing of the ruleset fetches
    # no named set's elements (its cache flag NFT_CACHE_TERSE), and a listing
    # of one map fetches that map's elements only.  So the largest piece is
    # the largest map, not the table.  The pieces are of one table only if no
    # transaction committed between them: the ruleset generation is read
    # before and after, and pieces read across a commit are read again, up to
    # PIECES_TRIES times; then the table is listed whole, in one command.

    def listing(self, family: str, name: str) -> list[dict] | None:
        """The table's JSON listing now (counters are never cached), in
        pieces as ``_list_table`` reads it; the elements of a map the packet
        path fills (flow pins) are left out, and the verdicts of each map's
        elements are shared (``share_verdicts``)."""
        ctx = _reader()
        for _ in range(PIECES_TRIES):
            start = read_generation()
            if start is None:
                break
            items = _list_structure(ctx, family, name)
            for item in items or ():
                obj = item.get("map")
                if obj is not None and not is_dynamic(obj):
                    elements = _map_elements(ctx, family, name, obj["name"])
                    if elements:  # as a listing of the table has it: no "elem" for an empty map
                        obj["elem"] = share_verdicts(elements)
            if read_generation() == start:
                return items
        return _whole(family, name)

    def _list_table(self, family: str, name: str, terse: bool = False) -> tuple[int | None, NftTable | None]:
        """The table, and the ruleset generation it was read at (None: not
        known).  ``terse``: without map elements (the structure only)."""
        ctx = _reader()
        if terse:
            items = _list_structure(ctx, family, name)
            return None, decode_table(items) if items is not None else None
        for _ in range(PIECES_TRIES):
            start = read_generation()
            if start is None:
                break
            items = _list_structure(ctx, family, name)
            table = decode_table(items) if items is not None else None
            del items
            if table is not None:
                maps = tuple(
                    m
                    if "timeout" in m.flags
                    else dataclasses.replace(m, elements=decode_elements(_map_elements(ctx, family, name, m.name)))
                    for m in table.maps
                )
                table = dataclasses.replace(table, maps=maps)
            if read_generation() == start:
                return start, table
        listing = _whole(family, name)
        return None, decode_table(listing) if listing is not None else None

    def _after_commit(self, becomes: NftTable) -> NftTable | None:
        """The table the commit made, given the one read before it: the same
        structure (chains, rules, map declarations) needs no listing; a new
        structure is listed without elements (the kernel's own normal form,
        for the read-back to compare) and takes its elements from ``becomes``."""
        _gen, before = self._tables_read[(becomes.family, becomes.name)]
        if before is not None and _structure(before) == _structure(becomes):
            return becomes
        if before is not None and _structure(_only_chains(before, becomes)) == _structure(becomes):
            # Chains deleted and nothing else changed in the structure (a
            # server left a pool: its counting chain goes): what stays was
            # read before the commit, so no listing is needed either.
            return becomes
        _at, listed = self._list_table(becomes.family, becomes.name, terse=True)
        if listed is None:
            return None
        elements = {m.name: m.elements for m in becomes.maps}
        maps = tuple(
            dataclasses.replace(m, elements=elements.get(m.name, ())) if "timeout" not in m.flags else m
            for m in listed.maps
        )
        return dataclasses.replace(listed, maps=maps)

    def apply(self, commands: list[dict], check_only: bool = False, becomes: NftTable | None = None) -> bool:
        """One transaction.  ``becomes``: the table the batch turns the last
        read into.  True when the generation proves it did: the read was
        current right before the commit and the commit was the only one
        (the generation moved by exactly one), so the table is now
        ``becomes`` and the next read needs no listing.

        A large batch (or flow pinning's) goes to libnftables as text in an
        anonymous in-memory file, which it reads in pieces (a text buffer it
        copies whole first); a caller that keeps no reference to
        ``commands`` (apply passes the batch it has just built) lets the
        batch go before libnftables parses that text."""
        if not commands:
            return False
        before = read_generation() if becomes is not None and not check_only else None
        text = _as_text(commands)
        batch_file, large = None, False
        if text is not None:
            del commands
            batch_file, large = _in_memory_file(text), len(text) >= LARGE_TEXT
            del text
            if large:
                _release_freed()  # what the batch and its text held
        self._context.set_dry_run(check_only)
        try:
            if batch_file is not None:
                with batch_file:
                    path = f"/proc/self/fd/{batch_file.fileno()}"
                    rc, _out, err = self._context.cmd_from_file(path)
                err = err.replace(path, "batch")
            else:
                batch = {"nftables": [{"metainfo": {"json_schema_version": 1}}] + commands}
                rc, _out, err = self._context.json_cmd(batch)
        finally:
            self._context.set_dry_run(False)
            if large:  # what libnftables took to parse it is free now
                _release_freed()
        if rc != 0:
            raise KernelError(f"nftables rejected the transaction: {err.strip()}")
        if check_only:
            return False
        self.writes += 1
        if becomes is None or before is None:
            return False
        key = (becomes.family, becomes.name)
        after = read_generation()
        if key not in self._tables_read or self._tables_read[key][0] != before or after != before + 1:
            return False
        now = self._after_commit(becomes)
        if now is None or read_generation() != after:
            self._tables_read.pop(key, None)
            return False
        self._tables_read[key] = (after, now)
        if self._disk is not None:
            chains = self._chain_fingerprint(becomes.family)
            if chains is not None:
                self._record(becomes.family, becomes.name, after, chains, now)
        return True

    def available(self) -> bool:
        """nf_tables answers.  Often built in (no /sys/module entry), so
        nftables itself is asked.  The generation request answers in
        microseconds; `list tables` (the fallback) makes nft 1.0.6 fetch
        every set element."""
        if read_generation() is not None:
            return True
        try:
            self.list_tables()
        except KernelError:
            return False
        return True
