"""Readers and writers of kernel state.  The only package with side effects.

One backend per kernel subsystem, each a small class with a validating fake
of its own (kdsr/kernel/fake/):

- ``nft.Nftables``: kdsr's nftables tables (libnftables; JSON to read);
- ``links.Links``: links, addresses, routes and rules (rtnetlink);
- ``ipvs.Ipvs``: IPVS services and destinations (ipvsadm);
- ``bird.Bird``: kdsr's BIRD fragment (bird -p, birdc);
- ``keepalived.Keepalived``: kdsr's keepalived fragment and its track files;
- ``sysctl.Sysctl``: /proc/sys;
- ``xdp.XdpBackend``: kdsr's XDP program and its maps (libbpf).

``Kernel`` holds one of each (``kernel.nft``, ``kernel.links``, ...):
``system.SystemKernel`` the real ones, ``fake.FakeKernel`` the fakes.  Every
write goes through a backend, and each counts its own; ``Kernel.writes`` is
their sum.  The backends do not import one another (tests/test_layers.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol

from kdsr.model import Address, AnnounceRoute, IpvsDest, IpvsService, Link, NftTable, Route, Rule
from kdsr.model_xdp import XdpState

if TYPE_CHECKING:
    from kdsr.kernel.ipvsadm import IpvsCommand, IpvsStats


class KernelError(Exception):
    """The kernel (or the fake) refused an operation."""


class NftBackend(Protocol):
    writes: int

    def read_table(self, family: str, name: str, reuse: bool = False) -> NftTable | None: ...

    def list_tables(self) -> list[tuple[str, str]]: ...

    # The table's libnftables JSON listing as the kernel has it now, counters
    # included, never a kept read (None: no such table); `kdsr show` reads
    # counters and slots from it without building the model.  The elements
    # of maps the packet path fills (flow pins) may be left out.
    def listing(self, family: str, name: str) -> list[dict] | None: ...

    def apply(self, commands: list[dict], check_only: bool = False, becomes: NftTable | None = None) -> bool: ...

    def token(self, family: str, name: str) -> tuple[str, bool] | None: ...  # (token, read at it); see receipt.py

    # ``same`` equals ``read`` (what read_table returned) as the diff
    # compares tables: keep ``same`` as that read (see observe.keep_unchanged).
    def adopt(self, read: NftTable, same: NftTable) -> None: ...

    def available(self) -> bool: ...  # nf_tables answers (often built in: no /sys/module entry)


class LinksBackend(Protocol):
    writes: int

    def link_exists(self, ifname: str) -> bool: ...

    def link_list(self, prefix: str) -> list[Link]: ...

    def link_add(self, link: Link) -> None: ...

    def link_del(self, name: str) -> None: ...

    def addr_list(self, ifname: str) -> list[Address]: ...

    # Add (or delete) each address, in order, appending each that landed to
    # ``done``; a refusal raises KernelError once all were tried (a kernel
    # batch goes on past a refused message), naming the first refused.
    def addr_write(self, add: bool, addrs: Sequence[Address], done: list[Address]) -> None: ...

    def local_addresses(self) -> set[str]: ...

    def route_list(self) -> list[Route]: ...

    def route_add(self, route: Route) -> None: ...

    def route_del(self, route: Route) -> None: ...

    # kdsr's announce table (naming.ANNOUNCE_TABLE): what BIRD may announce.
    def announce_list(self) -> list[AnnounceRoute]: ...

    def announce_add(self, route: AnnounceRoute) -> None: ...

    def announce_del(self, route: AnnounceRoute) -> None: ...

    def rule_list(self, priority: int) -> list[Rule]: ...

    def rule_add(self, rule: Rule) -> None: ...

    def rule_del(self, rule: Rule) -> None: ...


class IpvsBackend(Protocol):
    writes: int

    def list_all(self) -> list[IpvsService]: ...

    # Those of ``services`` the kernel holds, as it holds them, each listed
    # by its selector (an apply's read-back of what it wrote).
    def list_some(self, services: list[IpvsService]) -> list[IpvsService]: ...

    # Every IPVS service with its counters and its destinations' (`kdsr show`,
    # the metrics): one read, whatever the number of services.
    def stats(self) -> list[IpvsStats]: ...

    def service(self, verb: str, svc: IpvsService) -> None: ...  # "-A" add, "-E" edit, "-D" delete

    def dest(self, verb: str, svc: IpvsService, dest: IpvsDest) -> None: ...  # "-a", "-e", "-d"

    # Many ipvsadm writes in one go (ipvs.IpvsCommand).  Not a transaction:
    # raises KernelError naming a failed command; which of the others took
    # effect is unknown (Ipvs: ipvsadm -R runs the lines after a refused
    # one; FakeIpvs: stops there), so a caller lists the kernel again.
    def batch(self, commands: list[IpvsCommand]) -> None: ...


class BirdBackend(Protocol):
    """kdsr's fragment of BIRD's config, checked and loaded (kdsr/kernel/bird.py)."""

    writes: int

    def read(self, fragment: str) -> str | None: ...

    def ready(self, config: str, fragment: str, socket: str) -> None: ...  # BirdError: missing, stopped

    def check(self, config: str, fragment: str, text: str) -> None: ...  # BirdError: rejected

    def running(self, socket: str) -> bool: ...

    # Check, write and (``reload``) `birdc configure`; without reload (BIRD
    # is not running) BIRD reads the file when it starts.
    def install(self, config: str, fragment: str, socket: str, text: str, reload: bool = True) -> None: ...


class KeepalivedBackend(Protocol):
    """kdsr's keepalived fragment, checked with `keepalived -t` and loaded by
    SIGHUP; and the track files (gates).  kdsr/kernel/keepalived.py."""

    writes: int

    def read(self, fragment: str) -> str | None: ...

    def ready(
        self, config: str, fragment: str, pid_file: str, track_dirs: tuple[str, ...] = ()
    ) -> None: ...  # KeepalivedError: missing, stopped, not included, no track directory

    def check(self, config: str, fragment: str, text: str) -> None: ...  # KeepalivedError: rejected

    def running(self, pid_file: str) -> bool: ...

    # ``text`` None removes the fragment; without ``reload`` keepalived is not running.
    def install(self, config: str, fragment: str, pid_file: str, text: str | None, reload: bool = True) -> None: ...

    def gate_read(self, path: str) -> str | None: ...  # the track file's value, None: no file

    def gate_write(self, path: str, value: str) -> None: ...

    def gate_remove(self, path: str) -> None: ...


class SysctlBackend(Protocol):
    writes: int

    def read(self, key: str) -> str | None: ...  # "net/ipv4/conf/all/rp_filter"; None: no such key

    def write(self, key: str, value: str) -> None: ...


class XdpEngine(Protocol):
    """kdsr/kernel/xdp.py's XdpBackend (not imported here: it imports this package)."""

    writes: int
    warnings: list[str]  # what an attach found worth saying (generic XDP)

    def read(self, ifname: str) -> tuple[XdpState | None, str]: ...  # (kdsr's state, a foreign program)

    def attach(self, ifname: str, force: bool = False) -> None: ...

    def detach(self, ifname: str) -> None: ...

    def converge(self, want: XdpState, found: Callable[[XdpState], None] | None = None) -> None: ...

    def adopt(self, want: XdpState) -> None: ...  # keep the last read's equal parts as ``want``'s objects

    def counters(self, ifname: str) -> dict: ...


class Kernel(Protocol):
    nft: NftBackend
    links: LinksBackend
    ipvs: IpvsBackend
    bird: BirdBackend
    keepalived: KeepalivedBackend
    sysctl: SysctlBackend

    @property
    def xdp(self) -> XdpEngine: ...

    @property
    def writes(self) -> int: ...  # every backend's writes, summed

    # Kernel modules the names of which are missing and cannot be loaded.
    def modules_missing(self, names: tuple[str, ...]) -> list[str]: ...

    def close(self) -> None: ...
