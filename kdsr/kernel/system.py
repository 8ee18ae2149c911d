"""The real kernel: nftables through libnftables' JSON API, addresses through
rtnetlink (pyroute2), sysctls through /proc/sys."""

from __future__ import annotations

import errno
import ipaddress
import json
import os
from pathlib import Path

from kdsr.kernel import KernelError
from kdsr.kernel.nft_json import decode_table, devices_from_text
from kdsr.model import Address, NftTable

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


class SystemKernel:
    def __init__(self) -> None:
        self.writes = 0
        self._nft = None
        self._ipr = None

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

    def nft_read_table(self, family: str, name: str) -> tuple[NftTable | None, list[dict]]:
        if (family, name) not in self.nft_tables():
            return None, []
        rc, out, err = self._cmd(f"list table {family} {name}")
        if rc != 0:
            raise KernelError(f"nft list table {family} {name}: {err.strip()}")
        listing = json.loads(out)["nftables"]
        devices = {}
        if family == "netdev":
            # nft 1.0.6's JSON listing omits a netdev chain's device: read it
            # from the text listing.
            self.nft.set_json_output(False)
            try:
                rc, text, err = self._cmd(f"list table {family} {name}")
            finally:
                self.nft.set_json_output(True)
            if rc == 0:
                devices = devices_from_text(text)
        return decode_table(listing, devices), listing

    def nft_apply(self, commands: list[dict], check_only: bool = False) -> None:
        if not commands:
            return
        batch = {"nftables": [{"metainfo": {"json_schema_version": 1}}] + commands}
        self.nft.set_dry_run(check_only)
        try:
            rc, _out, err = self.nft.json_cmd(batch)
        finally:
            self.nft.set_dry_run(False)
        if rc != 0:
            raise KernelError(f"nftables rejected the transaction: {err.strip()}")
        if not check_only:
            self.writes += 1

    # ------------------------------------------------------------ addresses
    @property
    def ipr(self):
        if self._ipr is None:
            from pyroute2 import IPRoute

            self._ipr = IPRoute()
        return self._ipr

    def _index(self, ifname: str) -> int:
        found = self.ipr.link_lookup(ifname=ifname)
        if not found:
            raise KernelError(f"interface {ifname} does not exist")
        return found[0]

    def link_exists(self, ifname: str) -> bool:
        return bool(self.ipr.link_lookup(ifname=ifname))

    def addr_list(self, ifname: str) -> list[Address]:
        if not self.link_exists(ifname):
            return []
        result = []
        for msg in self.ipr.get_addr(index=self._index(ifname)):
            addr = msg.get_attr("IFA_ADDRESS")
            if msg["family"] == 2:
                addr = msg.get_attr("IFA_LOCAL") or addr
            label = msg.get_attr("IFA_LABEL") or ""
            if label == ifname:
                label = ""  # the kernel's default label is the interface name
            result.append(Address(ifname=ifname, cidr=f"{addr}/{msg['prefixlen']}", label=label))
        return result

    def _addr(self, op: str, addr: Address) -> None:
        iface = ipaddress.ip_interface(addr.cidr)
        kwargs = {"index": self._index(addr.ifname), "address": str(iface.ip), "prefixlen": iface.network.prefixlen}
        if addr.label:
            kwargs["label"] = addr.label
        try:
            self.ipr.addr(op, **kwargs)
        except Exception as exc:  # pyroute2 raises NetlinkError(code, msg)
            code = getattr(exc, "code", None)
            name = errno.errorcode.get(code, str(code)) if code else ""
            raise KernelError(f"{op} address {addr.cidr} on {addr.ifname}: {name} {exc}".strip()) from exc
        self.writes += 1

    def addr_add(self, addr: Address) -> None:
        self._addr("add", addr)

    def addr_del(self, addr: Address) -> None:
        self._addr("del", addr)

    def local_addresses(self) -> set[str]:
        found = set()
        for msg in self.ipr.get_addr():
            addr = msg.get_attr("IFA_LOCAL") or msg.get_attr("IFA_ADDRESS")
            if addr:
                found.add(str(ipaddress.ip_address(addr)))
        return found

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
