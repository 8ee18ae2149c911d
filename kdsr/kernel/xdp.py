"""The xdp engine's kernel backend: kdsr's XDP program and its maps.

Finding kdsr's objects: nothing is pinned.  bpffs is not mounted on these
machines, and ``ip netns exec`` gives each namespace its own mounts, so a pin
made in one would not be seen from another shell.  The program is found
through the interface it is attached to, with libbpf itself (``bpf_xdp_query``:
the program id and mode; ``bpf_prog_get_fd_by_id`` and
``bpf_obj_get_info_by_fd``: its name and map ids; ``bpf_map_get_fd_by_id``
and ``bpf_obj_get_info_by_fd``: each map's name, type and sizes); a program
named ``kdsr_xdp`` with kdsr's maps is kdsr's, any other XDP program on the
interface is someone else's.  The
maps live as long as the program: detaching it frees them, so destroy leaves
nothing behind.

Loading: ``ip link set dev X xdpdrv obj build/kdsr_xdp.o sec xdp``
(iproute2's libbpf loader; no compiler at run time), native mode, falling
back to generic XDP (``xdpgeneric``) where the driver has none, with a
warning.  Map elements are read and written through libbpf itself
(``bpf_map_lookup_batch``, ``bpf_map_update_elem``, ...) via ctypes: a map
is read whole in a few batch calls (Linux 5.6 has them for hash and array
maps; the element loop stays for a kernel that refuses them).

Layout (bpf/kdsr_xdp.c): this module decides where things go; compile
only says what (kdsr/model_xdp.py).  Each server gets an index in
``servers`` (its counters are ``server_stats[index]``), each selector an
index in ``selectors`` and two regions of ``slots``; a new table is written
into the inactive region, then the selector's ``active`` flips.
"""

from __future__ import annotations

import array
import ctypes
import ctypes.util
import hashlib
import json
import mmap
import os
import socket
import struct
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from kdsr.kernel import KernelError
from kdsr.model_xdp import ENCAPS, HASH_FIELDS, PROGRAM_NAME, XdpSelector, XdpServer, XdpService, XdpState

MAP_NAMES = (
    "config",
    "services",
    "ranges",
    "selectors",
    "slots",
    "servers",
    "server_stats",
    "service_stats",
    "events",
)
MAX_SELECTORS = 4096
MAX_SERVERS = 4096
MAX_SLOTS = 4 * 262144 + 2 * 65537
RANGES_PER_KEY = 16
NO_SERVER = 0xFFFFFFFF
SERVER_HAS_MAC = 1
PROTOCOLS = {"tcp": 6, "udp": 17}
PROTOCOL_NAMES = {v: k for k, v in PROTOCOLS.items()}
FIELD_NAMES = {v: k for k, v in HASH_FIELDS.items()}
MODE_NAMES = {v: k for k, v in ENCAPS.items()}
# bpf/kdsr_xdp.c EV_*, by index
EVENTS = (
    "pass",
    "not_for_host",
    "no_server",
    "no_neighbour",
    "redirect",
    "too_big",
    "to_stack",
    "no_route",
    "icmp_error",
)

# struct layouts of bpf/kdsr_xdp.c (x86-64 and every little-endian target)
SVC_KEY = struct.Struct("<16sBBH")
SELECTOR = struct.Struct("<8I64s")  # active, size, seed, fields, base[0], base[1], encap, mtu, name
SERVER = struct.Struct("<6sBB16s")
CONFIG = struct.Struct("<6s2xI8s4s16s")  # mac, ifindex, object digest, tunnel source v4, v6
U32 = struct.Struct("<I")
COUNTER = struct.Struct("<QQ")
PORT_RANGE = struct.Struct("<HHI")


def default_object() -> Path:
    """build/kdsr_xdp.o of this checkout (`make bpf`), or $KDSR_XDP_OBJECT."""
    env = os.environ.get("KDSR_XDP_OBJECT")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "build" / "kdsr_xdp.o"


def _addr_bytes(address: str) -> tuple[int, bytes]:
    import ipaddress

    ip = ipaddress.ip_address(address)
    return ip.version, ip.packed.ljust(16, b"\0")


def _addr_text(family: int, raw: bytes) -> str:
    import ipaddress

    return str(ipaddress.ip_address(raw[:4] if family == 4 else raw[:16]))


def _source_bytes(address: str) -> bytes:
    """A tunnel source for the config element: 4 or 16 bytes, zeros when none."""
    import ipaddress

    return ipaddress.ip_address(address).packed if address else b""


def _source_text(family: int, raw: bytes) -> str:
    return "" if not any(raw) else _addr_text(family, raw.ljust(16, b"\0"))


def _mac_bytes(mac: str) -> bytes:
    return bytes.fromhex(mac.replace(":", "")) if mac else b"\0" * 6


def _mac_text(raw: bytes) -> str:
    return ":".join(f"{b:02x}" for b in raw)


def service_key(vip: str, protocol: str, port: int) -> bytes:
    family, addr = _addr_bytes(vip)
    return SVC_KEY.pack(addr, family, PROTOCOLS[protocol], port)


@dataclass
class ProgramInfo:
    prog_id: int
    name: str
    mode: str  # "driver" | "generic" | "offload"
    maps: dict[str, int] = field(default_factory=dict)  # name -> map id


class MapsIO(Protocol):
    """Where map elements and programs live: libbpf (``LibbpfIO``) or a dict (``FakeIO``)."""

    def program(self, ifname: str) -> ProgramInfo | None: ...

    def attach(self, ifname: str, obj: Path, force: bool) -> str: ...  # -> mode

    def detach(self, ifname: str) -> None: ...

    def lookup(self, map_id: int, key: bytes) -> bytes | None: ...

    def lookup_range(self, map_id: int, first: int, count: int) -> list[bytes]: ...  # array elements first..

    def array(self, map_id: int, count: int) -> bytes: ...  # values of elements 0 .. count-1, end to end

    def dump(self, map_id: int) -> tuple[bytes, bytes]: ...  # every (key, value) of a hash map: keys, values end to end

    def keys(self, map_id: int) -> list[bytes]: ...

    def update(self, map_id: int, key: bytes, value: bytes) -> None: ...

    def delete(self, map_id: int, key: bytes) -> None: ...

    def interface_mac(self, ifname: str) -> str: ...

    def cpus(self) -> int: ...

    def managed_neighbours(self, ifname: str) -> set[str]: ...

    def neighbour(self, ifname: str, address: str, add: bool) -> None: ...


# bpf_xdp_query's options (libbpf 0.7+; later libbpf versions append fields,
# and accept a shorter ``sz`` from an older caller)
class _XdpQueryOpts(ctypes.Structure):
    _fields_ = [
        ("sz", ctypes.c_size_t),
        ("prog_id", ctypes.c_uint32),
        ("drv_prog_id", ctypes.c_uint32),
        ("hw_prog_id", ctypes.c_uint32),
        ("skb_prog_id", ctypes.c_uint32),
        ("attach_mode", ctypes.c_uint8),
    ]


# The leading fields of struct bpf_prog_info and struct bpf_map_info
# (linux/bpf.h): the kernel fills as much of the struct as the caller gives.
class _ProgInfo(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("tag", ctypes.c_uint8 * 8),
        ("jited_prog_len", ctypes.c_uint32),
        ("xlated_prog_len", ctypes.c_uint32),
        ("jited_prog_insns", ctypes.c_uint64),
        ("xlated_prog_insns", ctypes.c_uint64),
        ("load_time", ctypes.c_uint64),
        ("created_by_uid", ctypes.c_uint32),
        ("nr_map_ids", ctypes.c_uint32),
        ("map_ids", ctypes.c_uint64),
        ("name", ctypes.c_char * 16),
    ]


class _MapInfo(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("key_size", ctypes.c_uint32),
        ("value_size", ctypes.c_uint32),
        ("max_entries", ctypes.c_uint32),
        ("map_flags", ctypes.c_uint32),
        ("name", ctypes.c_char * 16),
    ]


# linux/bpf.h: BPF_MAP_TYPE_PERCPU_HASH, _PERCPU_ARRAY, _LRU_PERCPU_HASH;
# BPF_MAP_TYPE_ARRAY; BPF_F_MMAPABLE
PER_CPU_TYPES = {5, 6, 10}
ARRAY_TYPE = 2
BPF_F_MMAPABLE = 1 << 10
# linux/if_link.h XDP_ATTACHED_*: where the program runs
ATTACH_MODES = ((1, "drv_prog_id", "driver"), (2, "skb_prog_id", "generic"), (3, "hw_prog_id", "offload"))
# errno values of a kernel without batch operations for a map type
NO_BATCH = {22, 95, 524}  # EINVAL, EOPNOTSUPP, ENOTSUPP (the kernel's own 524)


@dataclass(frozen=True)
class _MapMeta:
    name: str
    key_size: int
    value_size: int
    max_entries: int
    per_cpu: bool
    mmapable: bool


def _run(argv: list[str]) -> str:
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    except FileNotFoundError as exc:
        raise KernelError(f"{argv[0]} is not installed (the xdp engine needs iproute2)") from exc
    if result.returncode != 0:
        raise KernelError(f"{' '.join(argv)}: {result.stderr.strip() or result.stdout.strip()}")
    return result.stdout


class LibbpfIO:
    """The real kernel: iproute2 to attach and detach, libbpf (ctypes) to find
    the program and its maps and to read and write their elements."""

    def __init__(self) -> None:
        self._lib = None
        self._fds: dict[int, int] = {}
        self._meta: dict[int, _MapMeta] = {}  # by map id
        self._programs: dict[int, ProgramInfo] = {}  # by program id
        self._no_batch: set[int] = set()  # map ids whose kernel refused a batch lookup
        self._mapped: dict[int, mmap.mmap] = {}  # BPF_F_MMAPABLE arrays, by map id

    @property
    def lib(self):
        if self._lib is None:
            name = ctypes.util.find_library("bpf") or "libbpf.so.1"
            try:
                lib = ctypes.CDLL(name, use_errno=True)
            except OSError as exc:
                raise KernelError(f"libbpf is not installed ({exc}); the xdp engine needs libbpf1") from exc
            lib.bpf_map_lookup_elem.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
            lib.bpf_map_update_elem.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint64]
            lib.bpf_map_delete_elem.argtypes = [ctypes.c_int, ctypes.c_void_p]
            lib.bpf_map_get_next_key.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
            lib.bpf_map_get_fd_by_id.argtypes = [ctypes.c_uint32]
            lib.bpf_prog_get_fd_by_id.argtypes = [ctypes.c_uint32]
            lib.bpf_obj_get_info_by_fd.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.POINTER(ctypes.c_uint32)]
            lib.bpf_map_lookup_batch.argtypes = [ctypes.c_int] + [ctypes.c_void_p] * 6
            lib.bpf_xdp_query.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.POINTER(_XdpQueryOpts)]
            self._lib = lib
        return self._lib

    def _info(self, fd: int, info: ctypes.Structure, what: str) -> None:
        length = ctypes.c_uint32(ctypes.sizeof(info))
        if self.lib.bpf_obj_get_info_by_fd(fd, ctypes.byref(info), ctypes.byref(length)) != 0:
            raise KernelError(f"{what}: {os.strerror(ctypes.get_errno())}")

    def program(self, ifname: str) -> ProgramInfo | None:
        """The XDP program on ``ifname``: one netlink query (``bpf_xdp_query``)
        each time, the program's name and maps asked of the kernel once per
        program id (they never change, and the kernel does not hand out a
        program id again while the program lives)."""
        try:
            ifindex = socket.if_nametoindex(ifname)
        except OSError as exc:
            raise KernelError(f"{ifname}: no such interface") from exc
        opts = _XdpQueryOpts(sz=ctypes.sizeof(_XdpQueryOpts))
        rc = self.lib.bpf_xdp_query(ifindex, 0, ctypes.byref(opts))
        if rc != 0:
            raise KernelError(f"{ifname}: XDP query: {os.strerror(-rc)}")
        prog_id, mode = opts.prog_id, ""
        for attach_mode, field_name, name in ATTACH_MODES:
            # one program: prog_id and attach_mode; several (XDP_ATTACHED_MULTI):
            # one id per mode, prog_id 0
            if opts.attach_mode == attach_mode or (not prog_id and getattr(opts, field_name)):
                prog_id, mode = prog_id or getattr(opts, field_name), name
                break
        if not prog_id:
            return None
        known = self._programs.get(prog_id)
        if known is None:
            known = self._programs[prog_id] = self._program_info(prog_id)
            # The maps of a program replaced or detached meanwhile: let them go.
            self._programs = {prog_id: known}
            alive = set(known.maps.values())
            for map_id in [m for m in self._fds if m not in alive]:
                self._forget(map_id)
        return ProgramInfo(known.prog_id, known.name, mode, dict(known.maps))

    def _program_info(self, prog_id: int) -> ProgramInfo:
        fd = self.lib.bpf_prog_get_fd_by_id(prog_id)
        if fd < 0:
            raise KernelError(f"BPF program id {prog_id}: {os.strerror(ctypes.get_errno())}")
        try:
            info = _ProgInfo()
            self._info(fd, info, f"BPF program id {prog_id}")
            ids = (ctypes.c_uint32 * info.nr_map_ids)()
            info = _ProgInfo(nr_map_ids=len(ids), map_ids=ctypes.addressof(ids))
            self._info(fd, info, f"BPF program id {prog_id}")
        finally:
            os.close(fd)
        maps = {}
        for map_id in ids[: min(len(ids), info.nr_map_ids)]:
            maps[self._map_meta(map_id).name] = map_id
        return ProgramInfo(prog_id, info.name.decode(errors="replace"), "", maps)

    def _map_meta(self, map_id: int) -> _MapMeta:
        meta = self._meta.get(map_id)
        if meta is None:
            info = _MapInfo()
            self._info(self._fd(map_id), info, f"BPF map id {map_id}")
            meta = self._meta[map_id] = _MapMeta(
                info.name.decode(errors="replace"),
                info.key_size,
                info.value_size,
                info.max_entries,
                info.type in PER_CPU_TYPES,
                info.type == ARRAY_TYPE and bool(info.map_flags & BPF_F_MMAPABLE),
            )
        return meta

    def attach(self, ifname: str, obj: Path, force: bool) -> str:
        if not obj.exists():
            raise KernelError(f"{obj} does not exist: build the xdp engine's program with `make bpf`")
        force_flag = ["-force"] if force else []
        try:
            _run(["ip", *force_flag, "link", "set", "dev", ifname, "xdpdrv", "obj", str(obj), "sec", "xdp"])
            return "driver"
        except KernelError as native:
            try:
                _run(["ip", *force_flag, "link", "set", "dev", ifname, "xdpgeneric", "obj", str(obj), "sec", "xdp"])
            except KernelError:
                raise native from None
            return "generic"

    def detach(self, ifname: str) -> None:
        _run(["ip", "link", "set", "dev", ifname, "xdp", "off"])
        for map_id in list(self._fds):
            self._forget(map_id)
        self._programs.clear()

    def _forget(self, map_id: int) -> None:
        """Let a map go: its mapping and descriptor (the map lives while either does)."""
        mapped = self._mapped.pop(map_id, None)
        if mapped is not None:
            mapped.close()
        os.close(self._fds.pop(map_id))

    def _fd(self, map_id: int) -> int:
        fd = self._fds.get(map_id)
        if fd is None:
            fd = self.lib.bpf_map_get_fd_by_id(map_id)
            if fd < 0:
                raise KernelError(f"BPF map id {map_id}: {os.strerror(ctypes.get_errno())}")
            self._fds[map_id] = fd
        return fd

    def _stride(self, meta: _MapMeta) -> int:
        """Bytes of one value as the kernel copies it: a per-CPU value is one
        8-byte aligned copy per possible CPU."""
        return (meta.value_size + 7) // 8 * 8 * self.cpus() if meta.per_cpu else meta.value_size

    def lookup(self, map_id: int, key: bytes) -> bytes | None:
        meta = self._map_meta(map_id)
        buf = ctypes.create_string_buffer(self._stride(meta))
        rc = self.lib.bpf_map_lookup_elem(self._fd(map_id), key, buf)
        if rc != 0:
            return None
        return buf.raw

    def _batch(self, map_id: int, first: int | None, want: int) -> tuple[bytes, bytes, bool] | None:
        """Up to ``want`` elements in batch calls (BPF_MAP_LOOKUP_BATCH), from
        array index ``first`` (None: a hash map from its start): (keys,
        values, whether the map's end was reached), or None when the kernel
        has no batch operation for this map."""
        meta = self._map_meta(map_id)
        stride = self._stride(meta)
        keys_out, values_out = [], []
        got_total = 0
        # The batch token: the last key for an array (the batch starts after
        # it), a bucket number for a hash map; 8 bytes hold either.
        token_in = ctypes.create_string_buffer(8)
        token_out = ctypes.create_string_buffer(8)
        started = False
        if first:
            token_in.raw = U32.pack(first - 1) + bytes(4)
            started = True
        while got_total < want:
            chunk = want - got_total
            keys = ctypes.create_string_buffer(meta.key_size * chunk)
            values = ctypes.create_string_buffer(stride * chunk)
            got = ctypes.c_uint32(chunk)
            rc = self.lib.bpf_map_lookup_batch(
                self._fd(map_id), token_in if started else None, token_out, keys, values, ctypes.byref(got), None
            )
            errno = ctypes.get_errno() if rc != 0 else 0
            if rc != 0 and errno in NO_BATCH and not got_total:
                # (libbpf copies the count it sent back when the kernel refused)
                return None
            n = got.value
            keys_out.append(keys.raw[: n * meta.key_size])
            values_out.append(values.raw[: n * stride])
            got_total += n
            if rc != 0 and errno != 2:  # ENOENT: the end of the map
                raise KernelError(f"BPF map id {map_id} ({meta.name}): batch lookup: {os.strerror(errno)}")
            if rc != 0 or n == 0:
                return b"".join(keys_out), b"".join(values_out), True
            token_in.raw = token_out.raw
            started = True
        return b"".join(keys_out), b"".join(values_out), False

    def array(self, map_id: int, count: int) -> bytes:
        """Values of array elements 0 .. count-1, end to end (per-CPU values
        whole): one batch call where the kernel has them."""
        meta = self._map_meta(map_id)
        count = min(count, meta.max_entries)
        if meta.mmapable:
            # The kernel lays an array's elements 8-byte aligned (elem_size).
            elem = (meta.value_size + 7) // 8 * 8
            mapped = self._mapped.get(map_id)
            if mapped is None:
                length = -(-meta.max_entries * elem // mmap.PAGESIZE) * mmap.PAGESIZE
                mapped = self._mapped[map_id] = mmap.mmap(self._fd(map_id), length, mmap.MAP_SHARED, mmap.PROT_READ)
            raw = mapped[: count * elem]
            if elem == meta.value_size:
                return raw
            if meta.value_size == 4:
                return array.array("I", raw)[::2].tobytes()
            return b"".join(raw[i : i + meta.value_size] for i in range(0, len(raw), elem))
        got = None if map_id in self._no_batch else self._batch(map_id, 0, count)
        if got is None:
            self._no_batch.add(map_id)
            stride = self._stride(meta)
            return b"".join((self.lookup(map_id, U32.pack(i)) or bytes(stride)) for i in range(count))
        return got[1]

    def lookup_range(self, map_id: int, first: int, count: int) -> list[bytes]:
        """Elements first .. first + count - 1 of an array map."""
        meta = self._map_meta(map_id)
        stride = self._stride(meta)
        count = max(0, min(count, meta.max_entries - first))
        got = None if map_id in self._no_batch else self._batch(map_id, first, count)
        if got is None:
            self._no_batch.add(map_id)
            return [self.lookup(map_id, U32.pack(i)) or b"" for i in range(first, first + count)]
        raw = got[1]
        return [raw[i * stride : (i + 1) * stride] for i in range(len(raw) // stride)]

    def dump(self, map_id: int) -> tuple[bytes, bytes]:
        """Every element of a hash map: (keys, values), each end to end, in the
        kernel's order; batch calls of the whole map where the kernel has them."""
        meta = self._map_meta(map_id)
        got = None if map_id in self._no_batch else self._batch(map_id, None, max(meta.max_entries, 1))
        if got is not None:
            return got[0], got[1]
        self._no_batch.add(map_id)
        keys, values = [], []
        for key in self.keys(map_id):
            value = self.lookup(map_id, key)
            if value is not None:  # deleted since
                keys.append(key)
                values.append(value)
        return b"".join(keys), b"".join(values)

    def keys(self, map_id: int) -> list[bytes]:
        key_size = self._map_meta(map_id).key_size
        found = []
        prev = None
        nxt = ctypes.create_string_buffer(key_size)
        while self.lib.bpf_map_get_next_key(self._fd(map_id), prev, nxt) == 0:
            found.append(nxt.raw)
            prev = ctypes.create_string_buffer(nxt.raw, key_size)
            if len(found) > 1 << 20:
                break
        return found

    def update(self, map_id: int, key: bytes, value: bytes) -> None:
        rc = self.lib.bpf_map_update_elem(self._fd(map_id), key, value, 0)
        if rc != 0:
            raise KernelError(f"BPF map id {map_id}: update: {os.strerror(ctypes.get_errno())}")

    def delete(self, map_id: int, key: bytes) -> None:
        self.lib.bpf_map_delete_elem(self._fd(map_id), key)

    def interface_mac(self, ifname: str) -> str:
        return Path(f"/sys/class/net/{ifname}/address").read_text().strip()

    def cpus(self) -> int:
        return self.lib.libbpf_num_possible_cpus()

    def managed_neighbours(self, ifname: str) -> set[str]:
        found = json.loads(_run(["ip", "-j", "neigh", "show", "dev", ifname]) or "[]")
        return {entry["dst"] for entry in found if "managed" in entry}

    def neighbour(self, ifname: str, address: str, add: bool) -> None:
        if add:
            found = json.loads(_run(["ip", "-j", "neigh", "show", address, "dev", ifname]) or "[]")
            if any("PERMANENT" in entry.get("state", []) for entry in found):
                return  # someone's static entry: bpf_fib_lookup() finds it as it is
            _run(["ip", "neigh", "replace", address, "dev", ifname, "managed"])
        else:
            _run(["ip", "neigh", "del", address, "dev", ifname])


@dataclass
class _Layout:
    """Where things are in the maps right now (read from them)."""

    info: ProgramInfo
    servers: dict[str, int]  # address -> index
    server_entries: dict[int, XdpServer]
    selectors: dict[str, tuple[int, tuple[int, ...]]]  # name -> (id, descriptor)


class XdpBackend:
    """Reads kdsr's XDP state from an interface, and makes it what is wanted."""

    def __init__(self, io: MapsIO, obj: Path | None = None) -> None:
        self.io = io
        self.obj = obj or default_object()
        self.warnings: list[str] = []
        self.writes = 0
        # What the last read decoded, with the bytes it decoded it from
        # (``_layout``, ``_tables``, ``_services``).
        self._decoded: dict[str, tuple] = {}
        # Objects of the last read that equal compile's (``adopt``): the
        # selectors by name, with the descriptor and table read; the services
        # with the decoded list they equal.
        self._selectors_read: dict[str, tuple] = {}
        self._services_adopted: tuple[list, tuple[XdpService, ...]] | None = None
        self._digest: tuple[tuple, bytes] | None = None

    # ---------------------------------------------------------------- read
    def read(self, ifname: str) -> tuple[XdpState | None, str]:
        """(kdsr's state on ``ifname`` or None, a description of a foreign XDP program or "")."""
        info = self.io.program(ifname)
        if info is None:
            return None, ""
        if info.name != PROGRAM_NAME or not set(MAP_NAMES) <= set(info.maps):
            return None, f"XDP program {info.name or '(no name)'} (id {info.prog_id}, {info.mode})"
        layout = self._layout(info)
        return self._state(ifname, layout), ""

    def adopt(self, want: XdpState) -> None:
        """Keep what equals ``want`` in the last read as ``want``'s own objects
        (observe.keep_unchanged calls this after a diff or a read-back): the
        next read of the same bytes hands them back, so the diff, converge and
        the daemon's receipt meet compile's objects and stop at identity, as
        the nft backend's ``adopt`` does for tables.  Only what compares equal
        is kept, so a read returns the same values either way."""
        known = self._decoded.get("services")
        adopted = self._services_adopted
        if known is not None and not (adopted and adopted[0] is known[1] and adopted[1] is want.services):
            self._services_adopted = (known[1], want.services) if tuple(known[1]) == want.services else None
        for sel in want.selectors:
            hit = self._selectors_read.get(sel.name)
            if hit is not None and hit[2] is not sel and hit[2] == sel:
                self._selectors_read[sel.name] = (hit[0], hit[1], sel)

    def _layout(self, info: ProgramInfo) -> _Layout:
        # Each map is read whole from the kernel every time (a BPF map has no
        # generation to prove a copy current); what the decoding made of the
        # same bytes last time is reused, so an unchanged map costs its
        # read and one comparison of bytes.
        raw_servers = self.io.array(info.maps["servers"], MAX_SERVERS)
        known = self._decoded.get("servers")
        if known is not None and known[0] == raw_servers:
            servers, entries = known[1]
        else:
            servers, entries = {}, {}
            for index, (mac, flags, family, addr) in enumerate(_unpack_all(SERVER, raw_servers)):
                if family not in (4, 6):
                    continue
                address = _addr_text(family, addr)
                servers[address] = index
                entries[index] = XdpServer(address, _mac_text(mac) if flags & SERVER_HAS_MAC else "")
            self._decoded["servers"] = (raw_servers, (servers, entries))
        raw_selectors = self.io.array(info.maps["selectors"], MAX_SELECTORS)
        known = self._decoded.get("selectors")
        if known is not None and known[0] == raw_selectors:
            selectors = known[1]
        else:
            selectors = {}
            for index, desc in enumerate(_unpack_all(SELECTOR, raw_selectors)):
                if desc[1] == 0:
                    continue
                name = desc[8].split(b"\0", 1)[0].decode(errors="replace")
                selectors[name] = (index, desc)
            self._decoded["selectors"] = (raw_selectors, selectors)
        return _Layout(info, dict(servers), dict(entries), dict(selectors))

    def _tables(self, layout: _Layout) -> dict[str, tuple[str, ...]]:
        """Each selector's active table, as server addresses: the slots array
        read up to the end of the last region in one batch."""
        maps = layout.info.maps
        end = max((desc[4 + r] + desc[1] for _, desc in layout.selectors.values() for r in (0, 1)), default=0)
        raw = memoryview(self.io.array(maps["slots"], end)) if end else memoryview(b"")
        servers_raw = self._decoded["servers"][0]
        known: dict = self._decoded.get("tables", {})
        tables, memo = {}, {}
        address_of = {index: server.address for index, server in layout.server_entries.items()}
        for name, (_index, desc) in layout.selectors.items():
            size, active = desc[1], desc[0] & 1
            base = desc[4 + active]
            region = bytes(raw[base * U32.size : (base + size) * U32.size])
            key = (base, size, region, servers_raw)
            hit = known.get(name)
            if hit is not None and hit[0] == key:
                table = hit[1]
            else:
                indices = array.array("I", region)
                if sys.byteorder != "little":
                    indices.byteswap()
                table = tuple(address_of.get(i) or ("" if i == NO_SERVER else f"#{i}") for i in indices) + ("",) * (
                    size - len(indices)
                )
                if not any(table):
                    table = ()
            tables[name] = table
            memo[name] = (key, table)
        self._decoded["tables"] = memo
        return tables

    def _services(self, maps: dict[str, int], names_by_id: dict[int, str]) -> list[XdpService]:
        keys, values = self.io.dump(maps["services"])
        rkeys, rvalues = self.io.dump(maps["ranges"])
        key = (keys, values, rkeys, rvalues, tuple(sorted(names_by_id.items())))
        known = self._decoded.get("services")
        if known is not None and known[0] == key:
            return known[1]
        size = SVC_KEY.size
        services = []
        for i, (sel_id,) in enumerate(_unpack_all(U32, values)):
            addr, family, proto, port = SVC_KEY.unpack_from(keys, i * size)
            sel = names_by_id.get(sel_id, f"#{sel_id}")
            services.append(
                XdpService(_addr_text(family, addr), PROTOCOL_NAMES.get(proto, str(proto)), port, port, sel)
            )
        stride = 4 + RANGES_PER_KEY * PORT_RANGE.size
        for i in range(len(rvalues) // stride if stride else 0):
            addr, family, proto, _port = SVC_KEY.unpack_from(rkeys, i * size)
            count = U32.unpack_from(rvalues, i * stride)[0]
            for j in range(min(count, RANGES_PER_KEY)):
                first, last, sel_id = PORT_RANGE.unpack_from(rvalues, i * stride + 4 + j * PORT_RANGE.size)
                sel = names_by_id.get(sel_id, f"#{sel_id}")
                services.append(
                    XdpService(_addr_text(family, addr), PROTOCOL_NAMES.get(proto, str(proto)), first, last, sel)
                )
        services.sort(key=lambda s: s.ident)
        self._decoded["services"] = (key, services)
        return services

    def _state(self, ifname: str, layout: _Layout) -> XdpState:
        maps = layout.info.maps
        managed = self.io.managed_neighbours(ifname)
        names_by_id = {index: name for name, (index, _) in layout.selectors.items()}
        tables = self._tables(layout)
        selectors = []
        read: dict[str, tuple] = {}
        for name, (_index, desc) in sorted(layout.selectors.items()):
            active, size, seed, fields, base0, base1, encap, mtu, _name = desc
            table = tables[name]
            hit = self._selectors_read.get(name)
            if hit is not None and hit[0] == desc and hit[1] is table:
                selectors.append(hit[2])  # the same bytes: what they decoded to (or equal) last time
                read[name] = hit
                continue
            family = 6 if ":" in next((t for t in table if t), "") else 4
            if name.split("-")[-2:-1] == ["v6"]:
                family = 6
            selectors.append(
                XdpSelector(
                    name,
                    family,
                    FIELD_NAMES.get(fields, str(fields)),
                    seed,
                    size,
                    table,
                    mode=MODE_NAMES.get(encap, str(encap)),
                    path_mtu=mtu,
                )
            )
            read[name] = (desc, table, selectors[-1])
        self._selectors_read = read
        listed = self._services(maps, names_by_id)
        adopted = self._services_adopted
        services = adopted[1] if adopted is not None and adopted[0] is listed else tuple(listed)
        config = self.io.lookup(maps["config"], U32.pack(0))
        mac, _ifindex, loaded, source4, source6 = CONFIG.unpack_from(config) if config else (b"", 0, b"", b"", b"")
        config_mac = _mac_text(mac) if config else ""
        if config_mac != self.io.interface_mac(ifname):
            config_mac = ""
        stale = bool(config_mac) and loaded != self.object_digest()
        return XdpState(
            interface=ifname,
            services=services,
            selectors=tuple(selectors),
            servers=tuple(
                sorted(
                    (
                        XdpServer(s.address, s.mac, neighbour=not s.mac and s.address in managed)
                        for s in layout.server_entries.values()
                    ),
                    key=lambda s: s.ident,
                )
            ),
            mode=layout.info.mode,
            config_mac=config_mac,
            stale=stale,
            source4=_source_text(4, source4),
            source6=_source_text(6, source6),
        )

    def object_digest(self) -> bytes:
        """The first 8 bytes of the object file's SHA-256 (zeros without a
        file), hashed again when the file's size or modification time moves."""
        try:
            st = self.obj.stat()
            stamp = (str(self.obj), st.st_size, st.st_mtime_ns, st.st_ino)
            if self._digest is None or self._digest[0] != stamp:
                self._digest = (stamp, hashlib.sha256(self.obj.read_bytes()).digest()[:8])
            return self._digest[1]
        except OSError:
            return bytes(8)

    # ---------------------------------------------------------------- write
    def detach(self, ifname: str) -> None:
        """Detach kdsr's program (its maps go with it) and drop the managed
        neighbour entries kdsr made for its servers."""
        have, _foreign = self.read(ifname)
        self.io.detach(ifname)
        self.writes += 1
        if have is not None:
            self._drop_neighbours(ifname, {s.address for s in have.servers if s.neighbour})

    def attach(self, ifname: str, force: bool = False) -> None:
        mode = self.io.attach(ifname, self.obj, force)
        self.writes += 1
        if mode == "generic":
            self.warnings.append(
                f"{ifname}: the driver has no native XDP, so kdsr's program runs as generic XDP, after the "
                "socket buffer is built: it costs about what the nft engine does and gains little over it."
            )

    def converge(self, want: XdpState, found: Callable[[XdpState], None] | None = None) -> None:
        """Make the maps on ``want.interface`` hold ``want`` (the program is
        attached); ``found``: told what the maps held, before the first write
        (the apply's undo converges back to it)."""
        info = self.io.program(want.interface)
        if info is None or info.name != PROGRAM_NAME:
            raise KernelError(f"{want.interface}: kdsr's XDP program is not attached")
        maps = info.maps
        layout = self._layout(info)
        have = self._state(want.interface, layout)
        if found is not None:
            found(have)

        def write(map_name: str, key: bytes, value: bytes) -> None:
            self.io.update(maps[map_name], key, value)
            self.writes += 1

        def remove(map_name: str, key: bytes) -> None:
            self.io.delete(maps[map_name], key)
            self.writes += 1

        # 1. the interface's MAC (frames for it are the ones to balance) and
        # the L3 tunnels' outer sources
        if not have.config_mac or (have.source4, have.source6) != (want.source4, want.source6):
            ifindex = 0
            mac = _mac_bytes(self.io.interface_mac(want.interface))
            config = CONFIG.pack(
                mac, ifindex, self.object_digest(), _source_bytes(want.source4), _source_bytes(want.source6)
            )
            write("config", U32.pack(0), config)
        # 2. servers first (a table may name them only once they exist), and
        # the managed neighbour entries of those without a MAC
        have_neighbours = {s.address for s in have.servers if s.neighbour}
        for server in want.servers:
            if server.neighbour and server.address not in have_neighbours:
                self.io.neighbour(want.interface, server.address, True)
                self.writes += 1
        free_servers = sorted(set(range(MAX_SERVERS)) - set(layout.server_entries))
        index_of = dict(layout.servers)
        for server in want.servers:
            old = layout.server_entries.get(index_of.get(server.address, -1))
            if old is not None and old.mac == server.mac:
                continue
            if server.address not in index_of:
                if not free_servers:
                    raise KernelError(f"more than {MAX_SERVERS} servers on one XDP balancer")
                index_of[server.address] = free_servers.pop(0)
                zero = COUNTER.pack(0, 0) * self.io.cpus()
                self.io.update(maps["server_stats"], U32.pack(index_of[server.address]), zero)
            family, addr = _addr_bytes(server.address)
            flags = SERVER_HAS_MAC if server.mac else 0
            write(
                "servers", U32.pack(index_of[server.address]), SERVER.pack(_mac_bytes(server.mac), flags, family, addr)
            )
        # 3. selectors: a new one gets an id and two regions; a changed table
        # goes into the inactive region, then `active` flips
        have_tables = {s.name: s for s in have.selectors}
        used_ids = {index for index, _ in layout.selectors.values()}
        regions = sorted((base, desc[1]) for _, desc in layout.selectors.values() for base in (desc[4], desc[5]))
        id_of = {name: index for name, (index, _) in layout.selectors.items()}
        wanted_names = {s.name for s in want.selectors}
        for sel in want.selectors:
            if sel.name in layout.selectors and ((old := have_tables.get(sel.name)) is sel or old == sel):
                continue
            slots = [index_of[a] for a in sel.table] if sel.table else [NO_SERVER] * sel.size
            if sel.name in layout.selectors:
                index, desc = layout.selectors[sel.name]
                active = desc[0] & 1
                if have_tables[sel.name].table != sel.table:
                    target = desc[4 + (1 - active)]
                    for slot, value in enumerate(slots):
                        write("slots", U32.pack(target + slot), U32.pack(value))
                    active = 1 - active
                # The name fixes size, seed, fields and mode: only the
                # active region and the path MTU change in place.
                write("selectors", U32.pack(index), SELECTOR.pack(active, *desc[1:7], sel.path_mtu, desc[8]))
                continue
            index = next((i for i in range(MAX_SELECTORS) if i not in used_ids), None)
            if index is None:
                raise KernelError(f"more than {MAX_SELECTORS} selectors on one XDP balancer")
            used_ids.add(index)
            base0 = _first_fit(regions, sel.size)
            regions = sorted([*regions, (base0, sel.size)])
            base1 = _first_fit(regions, sel.size)
            regions = sorted([*regions, (base1, sel.size)])
            for slot, value in enumerate(slots):
                write("slots", U32.pack(base0 + slot), U32.pack(value))
            fields, encap = HASH_FIELDS[sel.fields], ENCAPS[sel.mode]
            desc = (0, sel.size, sel.seed, fields, base0, base1, encap, sel.path_mtu, sel.name.encode())
            write("selectors", U32.pack(index), SELECTOR.pack(*desc))
            id_of[sel.name] = index
        # 4. services (one element each; a VIP's and protocol's port ranges
        # are one element, rewritten whole); none to compare when the read
        # is compile's own tuple (``adopt``): it holds what is wanted
        same = have.services is want.services
        want_listed, have_listed = ((), ()) if same else (want.services, have.services)
        have_services = {s.ident: s for s in have_listed}
        want_services = {s.ident: s for s in want_listed}
        ranges: dict[bytes, list[XdpService]] = {}
        for svc in want_listed:
            if svc.first != svc.last:
                ranges.setdefault(service_key(svc.vip, svc.protocol, 0), []).append(svc)
            elif have_services.get(svc.ident) != svc:
                write("services", service_key(svc.vip, svc.protocol, svc.first), U32.pack(id_of[svc.selector]))
        have_ranges: dict[bytes, list[XdpService]] = {}
        for svc in have_listed:
            if svc.first != svc.last:
                have_ranges.setdefault(service_key(svc.vip, svc.protocol, 0), []).append(svc)
        for key, items in ranges.items():
            items.sort(key=lambda s: s.first)
            if sorted(have_ranges.get(key, []), key=lambda s: s.first) == items:
                continue
            if len(items) > RANGES_PER_KEY:
                raise KernelError(f"more than {RANGES_PER_KEY} port ranges on {items[0].vip} {items[0].protocol}")
            value = U32.pack(len(items)) + b"".join(PORT_RANGE.pack(s.first, s.last, id_of[s.selector]) for s in items)
            write("ranges", key, value.ljust(4 + RANGES_PER_KEY * PORT_RANGE.size, b"\0"))
        # 5. then what goes: services, selectors, servers (reverse order)
        for ident, svc in have_services.items():
            if ident in want_services or svc.first != svc.last:
                continue
            remove("services", service_key(svc.vip, svc.protocol, svc.first))
        for key in have_ranges:
            if key not in ranges:
                remove("ranges", key)
        for name, (index, _desc) in layout.selectors.items():
            if name not in wanted_names:
                write("selectors", U32.pack(index), SELECTOR.pack(0, 0, 0, 0, 0, 0, 0, 0, b""))
        want_servers = {s.address for s in want.servers}
        for address, index in layout.servers.items():
            if address not in want_servers:
                write("servers", U32.pack(index), SERVER.pack(b"\0" * 6, 0, 0, b"\0" * 16))
        self._drop_neighbours(want.interface, have_neighbours - {s.address for s in want.servers if s.neighbour})

    def _drop_neighbours(self, ifname: str, addresses: set[str]) -> None:
        for address in sorted(addresses):
            self.io.neighbour(ifname, address, False)
            self.writes += 1

    # ---------------------------------------------------------------- counters
    def _counted(self, info: ProgramInfo, layout: _Layout) -> tuple[dict[str, tuple[int, int]], dict]:
        """(server address -> (packets, bytes), service key -> (packets, bytes)), summed over CPUs."""
        cpus = self.io.cpus()

        def summed(raw: bytes | None) -> tuple[int, int]:
            if not raw:
                return 0, 0
            packets = sum(COUNTER.unpack_from(raw, i * COUNTER.size)[0] for i in range(cpus))
            octets = sum(COUNTER.unpack_from(raw, i * COUNTER.size)[1] for i in range(cpus))
            return packets, octets

        servers = {
            address: summed(self.io.lookup(info.maps["server_stats"], U32.pack(index)))
            for address, index in layout.servers.items()
        }
        services = {
            key: summed(self.io.lookup(info.maps["service_stats"], key))
            for key in self.io.keys(info.maps["service_stats"])
        }
        return servers, services

    def counters(self, ifname: str) -> dict:
        """Per server, per service and per event: packets and bytes summed over CPUs."""
        info = self.io.program(ifname)
        if info is None or info.name != PROGRAM_NAME:
            return {}
        layout = self._layout(info)
        cpus = self.io.cpus()
        servers, by_key = self._counted(info, layout)
        services = {}
        for key, counted in by_key.items():
            addr, family, proto, port = SVC_KEY.unpack(key[: SVC_KEY.size])
            host = _addr_text(family, addr)
            host = f"[{host}]" if family == 6 else host
            services[f"{PROTOCOL_NAMES.get(proto, proto)} {host}:{port}"] = counted
        events = {}
        for i, name in enumerate(EVENTS):
            raw = self.io.lookup(info.maps["events"], U32.pack(i))
            events[name] = sum(struct.unpack_from("<Q", raw, j * 8)[0] for j in range(cpus)) if raw else 0
        return {"servers": servers, "services": services, "events": events, "mode": info.mode}

    def carried(self, ifname: str) -> tuple[dict, dict] | None:
        """What kdsr's program on ``ifname`` counted, to carry into the
        program that replaces it (a newer object): its maps die with it, and
        the metrics promise counters that only grow."""
        info = self.io.program(ifname)
        if info is None or info.name != PROGRAM_NAME:
            return None
        return self._counted(info, self._layout(info))

    def carry_over(self, ifname: str, counted: tuple[dict, dict] | None) -> None:
        """Put ``counted`` (``carried()``, from the program replaced) into the
        new program's counters, on the first CPU's share."""
        info = self.io.program(ifname)
        if counted is None or info is None or info.name != PROGRAM_NAME:
            return
        layout = self._layout(info)
        rest = COUNTER.pack(0, 0) * (self.io.cpus() - 1)
        servers, services = counted
        for address, (packets, octets) in sorted(servers.items()):
            if address in layout.servers and packets:
                self.io.update(
                    info.maps["server_stats"], U32.pack(layout.servers[address]), COUNTER.pack(packets, octets) + rest
                )
                self.writes += 1
        for key, (packets, octets) in sorted(services.items()):
            if packets:
                self.io.update(info.maps["service_stats"], key, COUNTER.pack(packets, octets) + rest)
                self.writes += 1


def _unpack_all(layout: struct.Struct, raw: bytes):
    """Every whole element of ``raw`` (elements of ``layout.size`` end to end)."""
    whole = len(raw) - len(raw) % layout.size
    return layout.iter_unpack(memoryview(raw)[:whole])


def _first_fit(regions: list[tuple[int, int]], size: int) -> int:
    """The lowest base where ``size`` slots fit between the used ``regions`` (sorted)."""
    at = 0
    for base, length in regions:
        if base - at >= size:
            return at
        at = max(at, base + length)
    if at + size > MAX_SLOTS:
        raise KernelError(f"the XDP program's slot array ({MAX_SLOTS} slots) has no room for a {size}-slot table")
    return at


# The array maps' value sizes, as bpf/kdsr_xdp.c declares them (FakeIO.array)
FAKE_VALUE_SIZES = {"config": CONFIG.size, "selectors": SELECTOR.size, "slots": U32.size, "servers": SERVER.size}


class FakeIO:
    """An in-memory stand-in for the kernel's BPF maps and XDP hook (unit tests)."""

    def __init__(self, interfaces: dict[str, str] | None = None, cpus: int = 2) -> None:
        self.macs = interfaces or {"eth0": "02:00:00:00:00:01"}
        self.neighbours: dict[str, set[str]] = {}  # managed neighbour entries per interface
        self.attached: dict[str, ProgramInfo] = {}
        self.maps: dict[int, dict[bytes, bytes]] = {}
        self.names: dict[int, str] = {}  # map id -> name
        self._next_id = 100
        self._cpus = cpus

    def foreign(self, ifname: str, name: str = "other_prog") -> None:
        self._next_id += 1
        self.attached[ifname] = ProgramInfo(self._next_id, name, "driver", {})

    def program(self, ifname: str) -> ProgramInfo | None:
        return self.attached.get(ifname)

    def attach(self, ifname: str, obj: Path, force: bool) -> str:
        if ifname not in self.macs:
            raise KernelError(f"no interface {ifname}")
        if ifname in self.attached and not force:
            raise KernelError(f"{ifname}: an XDP program is attached already (EBUSY)")
        for map_id in self.attached.get(ifname, ProgramInfo(0, "", "")).maps.values():
            self.maps.pop(map_id, None)  # the replaced program's maps go with it
        maps = {}
        for name in MAP_NAMES:
            self._next_id += 1
            maps[name] = self._next_id
            self.maps[self._next_id] = {}
            self.names[self._next_id] = name
        self._next_id += 1
        self.attached[ifname] = ProgramInfo(self._next_id, PROGRAM_NAME, "driver", maps)
        return "driver"

    def detach(self, ifname: str) -> None:
        info = self.attached.pop(ifname, None)
        if info is None:
            raise KernelError(f"{ifname}: no XDP program")
        for map_id in info.maps.values():
            self.maps.pop(map_id, None)

    def lookup(self, map_id: int, key: bytes) -> bytes | None:
        return self.maps[map_id].get(key)

    def lookup_range(self, map_id: int, first: int, count: int) -> list[bytes]:
        return [self.maps[map_id].get(U32.pack(i), b"") for i in range(first, first + count)]

    def array(self, map_id: int, count: int) -> bytes:
        zero = bytes(FAKE_VALUE_SIZES[self.names[map_id]])
        held = self.maps[map_id]
        return b"".join(held.get(U32.pack(i), zero) for i in range(count))

    def dump(self, map_id: int) -> tuple[bytes, bytes]:
        held = self.maps[map_id]
        return b"".join(held), b"".join(held.values())

    def keys(self, map_id: int) -> list[bytes]:
        return list(self.maps[map_id])

    def update(self, map_id: int, key: bytes, value: bytes) -> None:
        self.maps[map_id][key] = value

    def delete(self, map_id: int, key: bytes) -> None:
        self.maps[map_id].pop(key, None)

    def interface_mac(self, ifname: str) -> str:
        return self.macs[ifname]

    def managed_neighbours(self, ifname: str) -> set[str]:
        return set(self.neighbours.get(ifname, set()))

    def neighbour(self, ifname: str, address: str, add: bool) -> None:
        held = self.neighbours.setdefault(ifname, set())
        (held.add if add else held.discard)(address)

    def cpus(self) -> int:
        return self._cpus
