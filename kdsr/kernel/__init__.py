"""Readers and writers of kernel state.  The only package with side effects.

``Kernel`` is the interface apply and the readers use; ``system.SystemKernel``
talks to the real kernel (libnftables, rtnetlink via pyroute2, /proc/sys),
``fake.FakeKernel`` is a validating in-memory stand-in for unit tests.
Every write goes through one of these methods, so ``writes`` counts them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

from kdsr.model import Address, AnnounceRoute, IpvsDest, IpvsService, Link, NftTable, Route, Rule

if TYPE_CHECKING:
    from kdsr.kernel.ipvs import IpvsCommand, IpvsStats


class KernelError(Exception):
    """The kernel (or the fake) refused an operation."""


class Kernel(Protocol):
    writes: int

    def nft_read_table(self, family: str, name: str, reuse: bool = False) -> NftTable | None: ...

    def nft_tables(self) -> list[tuple[str, str]]: ...

    # The table's libnftables JSON listing as the kernel has it now, counters
    # included, never a kept read (None: no such table); `kdsr show` reads
    # counters and slots from it without building the model.  The elements
    # of maps the packet path fills (flow pins) may be left out.
    def nft_listing(self, family: str, name: str) -> list[dict] | None: ...

    def nft_apply(self, commands: list[dict], check_only: bool = False, becomes: NftTable | None = None) -> bool: ...

    def nft_token(self, family: str, name: str) -> tuple[str, bool] | None: ...  # (token, read at it); see receipt.py

    # ``same`` equals ``read`` (what nft_read_table returned) as the diff
    # compares tables: keep ``same`` as that read (see observe.keep_unchanged).
    def nft_adopt(self, read: NftTable, same: NftTable) -> None: ...

    def addr_list(self, ifname: str) -> list[Address]: ...

    # Add (or delete) each address, in order, appending each that landed to
    # ``done``; a refusal raises KernelError once all were tried (a kernel
    # batch goes on past a refused message), naming the first refused.
    def addr_write(self, add: bool, addrs: Sequence[Address], done: list[Address]) -> None: ...

    def sysctl_read(self, key: str) -> str | None: ...

    def sysctl_write(self, key: str, value: str) -> None: ...

    def local_addresses(self) -> set[str]: ...

    def link_exists(self, ifname: str) -> bool: ...

    # L3 and IPVS
    def modules_missing(self, names: tuple[str, ...]) -> list[str]: ...

    def link_list(self, prefix: str) -> list[Link]: ...

    def link_add(self, link: Link) -> None: ...

    def link_del(self, name: str) -> None: ...

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

    def ipvs_list(self) -> list[IpvsService]: ...

    # Those of ``services`` the kernel holds, as it holds them, each listed
    # by its selector (an apply's read-back of what it wrote).
    def ipvs_list_some(self, services: list[IpvsService]) -> list[IpvsService]: ...

    # Every IPVS service with its counters and its destinations' (`kdsr show`,
    # the metrics): one read, whatever the number of services.
    def ipvs_stats(self) -> list[IpvsStats]: ...

    def ipvs_service(self, verb: str, svc: IpvsService) -> None: ...  # "-A" add, "-E" edit, "-D" delete

    def ipvs_dest(self, verb: str, svc: IpvsService, dest: IpvsDest) -> None: ...  # "-a", "-e", "-d"

    # Many ipvsadm writes in one go (ipvs.IpvsCommand).  Not a transaction:
    # raises KernelError naming a failed command; which of the others took
    # effect is unknown (SystemKernel: ipvsadm -R runs the lines after a
    # refused one; FakeKernel: stops there), so a caller lists the kernel again.
    def ipvs_batch(self, commands: list[IpvsCommand]) -> None: ...

    # BIRD (kdsr/kernel/bird.py): kdsr's fragment, checked and loaded.
    def bird_read(self, fragment: str) -> str | None: ...

    def bird_ready(self, config: str, fragment: str, socket: str) -> None: ...  # BirdError: missing, stopped

    def bird_check(self, config: str, fragment: str, text: str) -> None: ...  # BirdError: rejected

    def bird_running(self, socket: str) -> bool: ...

    # Check, write and (``reload``) `birdc configure`; without reload (BIRD
    # is not running) BIRD reads the file when it starts.
    def bird_install(self, config: str, fragment: str, socket: str, text: str, reload: bool = True) -> None: ...

    # keepalived (kdsr/kernel/keepalived.py): kdsr's fragment, checked with
    # `keepalived -t` and loaded by SIGHUP; and the track files (gates).
    def keepalived_read(self, fragment: str) -> str | None: ...

    def keepalived_ready(
        self, config: str, fragment: str, pid_file: str, track_dirs: tuple[str, ...] = ()
    ) -> None: ...  # KeepalivedError: missing, stopped, not included, no track directory

    def keepalived_check(self, config: str, fragment: str, text: str) -> None: ...  # KeepalivedError: rejected

    def keepalived_running(self, pid_file: str) -> bool: ...

    # ``text`` None removes the fragment; without ``reload`` keepalived is not running.
    def keepalived_install(
        self, config: str, fragment: str, pid_file: str, text: str | None, reload: bool = True
    ) -> None: ...

    def gate_read(self, path: str) -> str | None: ...  # the track file's value, None: no file

    def gate_write(self, path: str, value: str) -> None: ...

    def gate_remove(self, path: str) -> None: ...
