"""sysctls through /proc/sys: read a key, write one (``key`` is its path
below /proc/sys, e.g. ``net/ipv4/conf/all/rp_filter``)."""

from __future__ import annotations

import os
from pathlib import Path

from kdsr.kernel import KernelError

PROC_SYS = Path("/proc/sys")


class Sysctl:
    def __init__(self) -> None:
        self.writes = 0

    def read(self, key: str) -> str | None:
        try:
            return (PROC_SYS / key).read_text().strip()
        except FileNotFoundError:
            return None

    def write(self, key: str, value: str) -> None:
        path = PROC_SYS / key
        try:
            with open(path, "w") as fh:
                fh.write(value)
        except OSError as exc:
            raise KernelError(f"sysctl {key.replace('/', '.')}={value}: {os.strerror(exc.errno or 0)}") from exc
        self.writes += 1
