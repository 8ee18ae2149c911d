"""The real kernel: one backend per subsystem (see kdsr/kernel/__init__.py)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from kdsr.kernel.bird import Bird
from kdsr.kernel.ipvs import Ipvs
from kdsr.kernel.keepalived import Keepalived
from kdsr.kernel.links import Links
from kdsr.kernel.nft import Nftables
from kdsr.kernel.sysctl import Sysctl


class SystemKernel:
    def __init__(self, cache_dir: str | os.PathLike | None = None) -> None:
        """``cache_dir``: the state directory, where table reads are kept
        across processes while the nftables generation allows (nft_cache.py)."""
        self.nft = Nftables(cache_dir)
        self.links = Links()
        self.ipvs = Ipvs()
        self.bird = Bird()
        self.keepalived = Keepalived()
        self.sysctl = Sysctl()
        self._xdp = None
        self._nf_tables_ok = False

    @property
    def xdp(self):
        """kdsr's XDP program and maps (kdsr/kernel/xdp.py), through libbpf."""
        if self._xdp is None:
            from kdsr.kernel.xdp import LibbpfIO, XdpBackend

            self._xdp = XdpBackend(LibbpfIO())
        return self._xdp

    @property
    def writes(self) -> int:
        backends = (self.nft, self.links, self.ipvs, self.bird, self.keepalived, self.sysctl, self._xdp)
        return sum(b.writes for b in backends if b is not None)

    def modules_missing(self, names: tuple[str, ...]) -> list[str]:
        missing = []
        for name in names:
            if name == "nf_tables":
                # Asked once per process: it does not go away.
                self._nf_tables_ok = self._nf_tables_ok or self.nft.available()
                if not self._nf_tables_ok:
                    missing.append(name)
                continue
            if Path("/sys/module", name).is_dir():
                continue
            result = subprocess.run(["modprobe", "-q", name], capture_output=True, text=True, check=False)
            if result.returncode != 0 or not Path("/sys/module", name).is_dir():
                missing.append(name)
        return missing

    def close(self) -> None:
        self.links.close()
