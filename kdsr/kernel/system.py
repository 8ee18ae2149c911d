"""The real kernel: nftables through libnftables' JSON API; addresses, and
the reads of links, routes and rules, through kdsr's own rtnetlink socket
(rtnl_socket.py); writes of links, routes and rules through pyroute2;
sysctls through /proc/sys."""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import errno
import functools
import hashlib
import ipaddress
import itertools
import json
import os
import re
import socket
import sys
import tempfile
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

from kdsr import naming
from kdsr.kernel import KernelError, bird, ipvs, keepalived, nft_text, rtnl_addr, rtnl_routing
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
from kdsr.kernel.rtnl_socket import NetlinkError, RtnlSocket
from kdsr.model import Address, AnnounceRoute, Link, NftTable, Route, Rule

PROC_SYS = Path("/proc/sys")


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


# ---------------------------------------------------------------- L3 and IPVS
# A base class of SystemKernel, so the L2 path below reads on its own.

# IP6_TNL_F_IGN_ENCAP_LIMIT: no 8-byte encapsulation-limit option, so the
# overhead is the 40-byte outer header only (what the MSS clamp assumes).
_IP6TNL_IGN_ENCAP_LIMIT = 0x1
IPPROTO_IPV6 = 41
_AF = {4: 2, 6: 10}


def _netlink_error(what: str, exc: Exception) -> KernelError:
    code = getattr(exc, "code", None)
    name = errno.errorcode.get(code, "") if code else ""
    return KernelError(f"{what}: {name} {exc}".strip())


class _L3Mixin:
    """Links, routes, rules (read by rtnl_routing.py, written by pyroute2),
    IPVS (ipvsadm), modules."""

    def modules_missing(self, names: tuple[str, ...]) -> list[str]:
        import subprocess

        missing = []
        for name in names:
            if name == "nf_tables":
                # Often built in (no /sys/module entry): ask nftables itself,
                # once per process (it does not go away).  The generation
                # request answers in microseconds; `list tables` (the
                # fallback) makes nft 1.0.6 fetch every set element.
                try:
                    if not self._nf_tables_ok and read_generation() is None:  # type: ignore[has-type]
                        self.nft_tables()  # type: ignore[attr-defined]
                    self._nf_tables_ok = True
                except KernelError:
                    missing.append(name)
                continue
            if Path("/sys/module", name).is_dir():
                continue
            result = subprocess.run(["modprobe", "-q", name], capture_output=True, text=True, check=False)
            if result.returncode != 0 or not Path("/sys/module", name).is_dir():
                missing.append(name)
        return missing

    def link_list(self, prefix: str) -> list:
        found = []
        for _index, name, kind, ends in self._read(rtnl_routing.links, "read links"):
            if not name.startswith(prefix):
                continue
            if ends is not None:
                found.append(Link(name, kind, *ends))
            else:  # not a tunnel kdsr makes: read as such, so a plan refuses it as foreign
                found.append(Link(name, kind or "unknown", "", ""))
        return found

    def link_add(self, link) -> None:
        prefix = "ip6tnl" if link.kind == "ip6tnl" else link.kind
        kwargs = {"ifname": link.name, "kind": link.kind, f"{prefix}_local": link.local, f"{prefix}_ttl": link.ttl}
        if link.remote:
            kwargs[f"{prefix}_remote"] = link.remote
        if link.kind == "ip6tnl":
            kwargs["ip6tnl_proto"] = IPPROTO_IPV6
            kwargs["ip6tnl_flags"] = _IP6TNL_IGN_ENCAP_LIMIT
        try:
            self.ipr.link("add", **kwargs)  # type: ignore[attr-defined]
            self.ipr.link("set", index=self._index(link.name), state="up")  # type: ignore[attr-defined]
        except Exception as exc:
            raise _netlink_error(f"add {link.kind} link {link.name}", exc) from exc
        self.writes += 1  # type: ignore[attr-defined]

    def link_del(self, name: str) -> None:
        try:
            self.ipr.link("del", index=self._index(name))  # type: ignore[attr-defined]
        except KernelError:
            raise
        except Exception as exc:
            raise _netlink_error(f"delete link {name}", exc) from exc
        self.writes += 1  # type: ignore[attr-defined]

    def route_list(self) -> list:
        routes = []
        for family in (4, 6):
            for table, oif, gateway in self._read(partial(rtnl_routing.default_routes, family=family), "read routes"):
                # kdsr's routes are unicast defaults out of a tunnel; anything
                # else in its table range (unreachable, blackhole) is not its own.
                if naming.is_kdsr_mark(table):
                    routes.append(Route(family, table, self._name_of(oif), gateway=gateway))
        return routes

    @staticmethod
    def _name_of(index: int) -> str:
        try:
            return socket.if_indextoname(index)
        except OSError:
            return "?"

    def _route(self, op: str, route) -> None:
        dst = "0.0.0.0/0" if route.family == 4 else "::/0"
        try:
            args = {"dst": dst, "oif": self._index(route.dev), "table": route.table, "family": _AF[route.family]}
            if route.gateway:
                args["gateway"] = route.gateway
            self.ipr.route(op, **args)  # type: ignore[attr-defined]
        except KernelError:
            raise
        except Exception as exc:
            raise _netlink_error(f"{op} route {route.ident}", exc) from exc
        self.writes += 1  # type: ignore[attr-defined]

    def route_add(self, route) -> None:
        self._route("add", route)

    def route_del(self, route) -> None:
        self._route("del", route)

    def announce_list(self) -> list:
        """Every route in kdsr's announce table (naming.ANNOUNCE_TABLE)."""
        found = []
        for family in (4, 6):
            dump = partial(rtnl_routing.table_routes, family=family, table=naming.ANNOUNCE_TABLE)
            found += [AnnounceRoute(prefix, kind) for prefix, kind in self._read(dump, "read routes")]
        return found

    def _announce(self, op: str, route) -> None:
        # The type goes with a delete too: the kernel deletes a route only
        # of the type asked for, and pyroute2 asks for unicast by default.
        args = {"dst": route.prefix, "table": naming.ANNOUNCE_TABLE, "type": route.kind, "family": _AF[route.family]}
        if op == "add":
            args["proto"] = "static"
        try:
            self.ipr.route(op, **args)  # type: ignore[attr-defined]
        except Exception as exc:
            raise _netlink_error(f"{op} announce route {route.prefix} (table {naming.ANNOUNCE_TABLE:#x})", exc) from exc
        self.writes += 1  # type: ignore[attr-defined]

    def announce_add(self, route) -> None:
        self._announce("add", route)

    def announce_del(self, route) -> None:
        self._announce("del", route)

    def rule_list(self, priority: int) -> list:
        rules = []
        for family in (4, 6):
            for prio, mark, table in self._read(partial(rtnl_routing.fwmark_rules, family=family), "read rules"):
                if prio == priority and naming.is_kdsr_mark(mark):
                    rules.append(Rule(family, mark, table, priority))
        return rules

    def _rule(self, op: str, rule) -> None:
        try:
            self.ipr.rule(  # type: ignore[attr-defined]
                op,
                family=_AF[rule.family],
                fwmark=rule.fwmark,
                fwmask=0xFFFFFFFF,
                table=rule.table,
                priority=rule.priority,
            )
        except Exception as exc:
            raise _netlink_error(f"{op} rule {rule.ident}", exc) from exc
        self.writes += 1  # type: ignore[attr-defined]

    def rule_add(self, rule) -> None:
        self._rule("add", rule)

    def rule_del(self, rule) -> None:
        self._rule("del", rule)

    # ---------------------------------------------------------------- IPVS
    def _ipvsadm(self, args: list[str], write: bool = True) -> str:
        import shutil
        import subprocess

        if shutil.which("ipvsadm") is None:
            raise KernelError("ipvsadm is not installed (Debian package ipvsadm); the ipvs engine needs it")
        result = subprocess.run(["ipvsadm", *args], capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise KernelError(f"ipvsadm {' '.join(args)}: {result.stderr.strip() or result.stdout.strip()}")
        if write:
            self.writes += 1  # type: ignore[attr-defined]
        return result.stdout

    def _ipvsadm_restore(self, text: str):
        """``ipvsadm -R`` with ``text`` on stdin; the caller judges the result."""
        import shutil
        import subprocess

        if shutil.which("ipvsadm") is None:
            raise KernelError("ipvsadm is not installed (Debian package ipvsadm); the ipvs engine needs it")
        return subprocess.run(["ipvsadm", "-R"], input=text, capture_output=True, text=True, check=False)

    def ipvs_list(self) -> list:
        if not Path("/proc/net/ip_vs").exists():
            return []
        return ipvs.parse_list(self._ipvsadm(list(ipvs.LIST_ARGS), write=False))

    def ipvs_stats(self) -> list:
        if not Path("/proc/net/ip_vs").exists():
            return []
        try:
            return ipvs.read_stats(self._ipvsadm_restore)
        except ValueError as exc:
            raise KernelError(f"{exc}") from None

    def ipvs_list_some(self, services: list) -> list:
        """Those of ``services`` the kernel holds: ``-L`` lines through ONE
        ``ipvsadm -R``, which runs listing commands too (one process, not one
        per service).  A service
        that is not there ends the run ("No such service", exit 1) after
        those before it were listed; the run starts again after it."""
        if not Path("/proc/net/ip_vs").exists():
            return []
        found, left = [], list(services)
        while left:
            result = self._ipvsadm_restore(ipvs.list_text(left))
            listed = ipvs.parse_list(result.stdout)
            if [s.ident for s in listed] != [s.ident for s in left[: len(listed)]]:
                raise KernelError(f"ipvsadm -R listed other services than it was asked for: {listed[:3]}")
            found += listed
            if result.returncode == 0 and not result.stderr.strip():
                break
            if len(listed) == len(left) or result.stderr.strip() != "No such service":
                raise KernelError(f"ipvsadm -R (listing {len(left)} services): {result.stderr.strip() or 'no message'}")
            left = left[len(listed) + 1 :]  # the one after the service that is not there
        return found

    def ipvs_service(self, verb: str, svc) -> None:
        self._ipvsadm(ipvs.service_args(verb, svc))

    def ipvs_dest(self, verb: str, svc, dest) -> None:
        self._ipvsadm(ipvs.dest_args(verb, svc, dest))

    def ipvs_batch(self, commands: list) -> None:
        """Many writes through ONE ``ipvsadm -R`` (restore lines on stdin).

        ipvsadm 1.31 runs every line it reads: a line the kernel refuses
        prints its error on stderr and the next line runs anyway; the exit
        status is that of the LAST line only; a line it cannot parse ends
        the process there (status 2).  So: any stderr or a non-zero status
        is a failure, and since ipvsadm says neither which line failed nor
        which ran, the kernel is listed again and the first command whose
        effect is missing is named.  Callers must re-read, not assume.
        """
        if not commands:
            return
        result = self._ipvsadm_restore(ipvs.restore_text(commands))
        self.writes += len(commands)  # type: ignore[attr-defined]
        said = " / ".join(line for line in (result.stderr + result.stdout).splitlines() if line.strip())
        if result.returncode == 0 and not result.stderr.strip():
            return
        now = {s.ident: s for s in self.ipvs_list()}
        culprit = ipvs.first_not_landed(commands, now)
        where = f"{culprit}" if culprit else "(every command's effect shows on re-reading the kernel)"
        raise KernelError(
            f"ipvsadm -R ({len(commands)} commands, exit {result.returncode}) failed at {where}: {said or 'no message'}"
        )


class _BirdMixin:
    """BIRD through its own tools (kdsr/kernel/bird.py)."""

    def bird_read(self, fragment: str) -> str | None:
        return bird.read_fragment(fragment)

    def bird_ready(self, config: str, fragment: str, socket: str) -> None:
        bird.require_installed()
        bird.require_running(config, socket)
        bird.main_config(config, fragment)

    def bird_check(self, config: str, fragment: str, text: str) -> None:
        bird.check(config, fragment, text)

    def bird_running(self, socket: str) -> bool:
        try:
            return bird.running(socket)
        except bird.BirdError:  # birdc missing, or no answer in time
            return False

    def bird_install(self, config: str, fragment: str, socket: str, text: str, reload: bool = True) -> None:
        """Check, write, reload; on a reload BIRD refuses, put the old fragment back.

        Without ``reload`` (BIRD is not running): check and write.  Where
        BIRD is not even installed, nothing can check the file, and nothing
        reads it either."""
        try:
            bird.check(config, fragment, text)
        except bird.BirdError as exc:
            if reload or not exc.missing:
                raise
        previous = bird.read_fragment(fragment)
        bird.write_fragment(config, fragment, text)
        self.writes += 1  # type: ignore[attr-defined]
        if not reload:
            return
        try:
            bird.configure(socket)
        except bird.BirdError:
            if previous is not None:
                bird.write_fragment(config, fragment, previous)
                bird.configure(socket)
            raise


class _KeepalivedMixin:
    """keepalived through its own config test and SIGHUP (kdsr/kernel/keepalived.py)."""

    def keepalived_read(self, fragment: str) -> str | None:
        return keepalived.read_file(fragment)

    def keepalived_ready(self, config: str, fragment: str, pid_file: str, track_dirs: tuple[str, ...] = ()) -> None:
        keepalived.require_installed()
        keepalived.require_running(config, pid_file)
        keepalived.main_config(config, fragment)
        for track_dir in track_dirs:
            keepalived.require_track_dir(track_dir)

    def keepalived_check(self, config: str, fragment: str, text: str) -> None:
        keepalived.check(config, fragment, text)

    def keepalived_running(self, pid_file: str) -> bool:
        return keepalived.running_pid(pid_file) is not None

    def keepalived_install(
        self, config: str, fragment: str, pid_file: str, text: str | None, reload: bool = True
    ) -> None:
        """Check, write (``text`` None: remove the fragment), reload; on a
        reload keepalived does not survive, put the old fragment back.

        Without ``reload`` (keepalived is not running): only a removal, which
        needs no check: a stopped keepalived owns nothing, and ignores the
        missing include when it starts."""
        if text is not None:
            keepalived.check(config, fragment, text)
        previous = keepalived.read_file(fragment)
        if text is None:
            keepalived.remove_file(fragment)
        else:
            keepalived.write_file(fragment, text)
        self.writes += 1  # type: ignore[attr-defined]
        if not reload:
            return
        try:
            keepalived.reload(pid_file)
        except keepalived.KeepalivedError:
            if previous is not None:
                keepalived.write_file(fragment, previous)
            else:
                keepalived.remove_file(fragment)
            raise

    def gate_read(self, path: str) -> str | None:
        text = keepalived.read_file(path, limit=64)
        return None if text is None else text.strip()

    def gate_write(self, path: str, value: str) -> None:
        keepalived.write_file(path, value + "\n", keepalived.GATE_MODE)
        self.writes += 1  # type: ignore[attr-defined]

    def gate_remove(self, path: str) -> None:
        keepalived.remove_file(path)
        self.writes += 1  # type: ignore[attr-defined]


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


# Reads of a table in pieces (SystemKernel._list_table) made while the
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
    printed at once (the dearest read; see SystemKernel._list_table)."""
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


class SystemKernel(_L3Mixin, _BirdMixin, _KeepalivedMixin):
    def __init__(self, cache_dir: str | os.PathLike | None = None) -> None:
        """``cache_dir``: the state directory, where table reads are kept
        across processes while the nftables generation allows (nft_cache.py)."""
        self._disk = TableCache(cache_dir) if cache_dir is not None else None
        self.writes = 0
        self._nft = None
        self._ipr = None
        self._rtnl: RtnlSocket | None = None
        self._nf_tables_ok = False
        # (family, name) -> (ruleset generation, table) of the last read
        self._tables_read: dict[tuple[str, str], tuple[int, NftTable | None]] = {}
        self._xdp = None

    @property
    def xdp(self):
        """kdsr's XDP program and maps (kdsr/kernel/xdp.py), through libbpf."""
        if self._xdp is None:
            from kdsr.kernel.xdp import LibbpfIO, XdpBackend

            self._xdp = XdpBackend(LibbpfIO())
        return self._xdp

    # ------------------------------------------------------------ nftables
    @property
    def nft(self):
        if self._nft is None:
            self._nft = _nftables().Nftables()
            self._nft.set_json_output(True)
            self._nft.set_handle_output(False)
        return self._nft

    def _cmd(self, text: str) -> tuple[int, str, str]:
        return self.nft.cmd(text)

    def nft_tables(self) -> list[tuple[str, str]]:
        rc, out, err = self._cmd("list tables")
        if rc != 0:
            raise KernelError(f"nft list tables: {err.strip()}")
        items = json.loads(out or '{"nftables": []}')["nftables"]
        return [(i["table"]["family"], i["table"]["name"]) for i in items if "table" in i]

    def nft_read_table(self, family: str, name: str, reuse: bool = False) -> NftTable | None:
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

    def nft_adopt(self, read: NftTable, same: NftTable) -> None:
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

    def nft_token(self, family: str, name: str) -> tuple[str, bool] | None:
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
        self.nft.set_json_output(False)
        self.nft.set_handle_output(True)
        try:
            rc, text, _err = self._cmd(f"list chains {family}")
        finally:
            self.nft.set_json_output(True)
            self.nft.set_handle_output(False)
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

    def nft_listing(self, family: str, name: str) -> list[dict] | None:
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

    def nft_apply(self, commands: list[dict], check_only: bool = False, becomes: NftTable | None = None) -> bool:
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
        self.nft.set_dry_run(check_only)
        try:
            if batch_file is not None:
                with batch_file:
                    path = f"/proc/self/fd/{batch_file.fileno()}"
                    rc, _out, err = self.nft.cmd_from_file(path)
                err = err.replace(path, "batch")
            else:
                batch = {"nftables": [{"metainfo": {"json_schema_version": 1}}] + commands}
                rc, _out, err = self.nft.json_cmd(batch)
        finally:
            self.nft.set_dry_run(False)
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

    # ------------------------------------------------------------ addresses
    @property
    def ipr(self):
        if self._ipr is None:
            from pyroute2 import IPRoute

            self._ipr = IPRoute()
        return self._ipr

    @staticmethod
    def _index_or_none(ifname: str) -> int | None:
        # One ioctl in this process's namespace; pyroute2's link_lookup
        # dumped every link for it.
        try:
            return socket.if_nametoindex(ifname)
        except OSError:
            return None

    def _index(self, ifname: str) -> int:
        index = self._index_or_none(ifname)
        if index is None:
            raise KernelError(f"interface {ifname} does not exist")
        return index

    def link_exists(self, ifname: str) -> bool:
        return self._index_or_none(ifname) is not None

    @property
    def rtnl(self) -> RtnlSocket:
        if self._rtnl is None:
            self._rtnl = RtnlSocket()
        return self._rtnl

    def _read(self, dump: Callable[[RtnlSocket], list], what: str) -> list:
        try:
            return dump(self.rtnl)
        except (NetlinkError, OSError) as exc:
            raise KernelError(f"{what}: {exc}") from exc

    def addr_list(self, ifname: str) -> list[Address]:
        index = self._index_or_none(ifname)
        if index is None:
            return []
        result = []
        for _family, prefixlen, ip, label in rtnl_addr.addresses(self.rtnl, index):
            if label == ifname:
                label = ""  # the kernel's default label is the interface name
            result.append(Address(ifname=ifname, cidr=f"{ip}/{prefixlen}", label=label))
        return result

    def addr_write(self, add: bool, addrs: Sequence[Address], done: list[Address]) -> None:
        op = "add" if add else "del"
        first_error = None
        for ifname, group in itertools.groupby(addrs, key=lambda a: a.ifname):
            group = list(group)
            try:
                index = self._index(ifname)
            except KernelError as exc:
                first_error = first_error or exc
                continue
            entries = []
            for addr in group:
                iface = ipaddress.ip_interface(addr.cidr)
                entries.append((str(iface.ip), iface.network.prefixlen, addr.label))
            for addr, error in zip(group, rtnl_addr.write_addresses(self.rtnl, add, index, entries), strict=True):
                if error is None:
                    done.append(addr)
                    self.writes += 1
                elif first_error is None:
                    first_error = KernelError(f"{op} address {addr.cidr} on {addr.ifname}: {error}")
        if first_error is not None:
            raise first_error

    def local_addresses(self) -> set[str]:
        return {str(ipaddress.ip_address(ip)) for _f, _p, ip, _l in rtnl_addr.addresses(self.rtnl, 0)}

    # ------------------------------------------------------------ sysctls
    def sysctl_read(self, key: str) -> str | None:
        try:
            return (PROC_SYS / key).read_text().strip()
        except FileNotFoundError:
            return None

    def sysctl_write(self, key: str, value: str) -> None:
        path = PROC_SYS / key
        try:
            with open(path, "w") as fh:
                fh.write(value)
        except OSError as exc:
            raise KernelError(f"sysctl {key.replace('/', '.')}={value}: {os.strerror(exc.errno or 0)}") from exc
        self.writes += 1

    def close(self) -> None:
        if self._ipr is not None:
            self._ipr.close()
            self._ipr = None
        if self._rtnl is not None:
            self._rtnl.close()
            self._rtnl = None
