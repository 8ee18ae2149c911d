"""Readers and writers of kernel state.  The only package with side effects.

``Kernel`` is the interface apply and the readers use; ``system.SystemKernel``
talks to the real kernel (libnftables, rtnetlink via pyroute2, /proc/sys),
``fake.FakeKernel`` is a validating in-memory stand-in for unit tests.
Every write goes through one of these methods, so ``writes`` counts them.
"""

from __future__ import annotations

from typing import Protocol

from kdsr.model import Address, NftTable


class KernelError(Exception):
    """The kernel (or the fake) refused an operation."""


class Kernel(Protocol):
    writes: int

    def nft_read_table(self, family: str, name: str) -> tuple[NftTable | None, list[dict]]: ...

    def nft_tables(self) -> list[tuple[str, str]]: ...

    def nft_apply(self, commands: list[dict], check_only: bool = False) -> None: ...

    def addr_list(self, ifname: str) -> list[Address]: ...

    def addr_add(self, addr: Address) -> None: ...

    def addr_del(self, addr: Address) -> None: ...

    def sysctl_read(self, key: str) -> str | None: ...

    def sysctl_write(self, key: str, value: str) -> None: ...

    def local_addresses(self) -> set[str]: ...

    def link_exists(self, ifname: str) -> bool: ...
