"""/proc/sys in memory (kdsr/kernel/sysctl.py's fake): a key that does not
exist cannot be written, as in /proc/sys."""

from __future__ import annotations

from kdsr.kernel import KernelError
from kdsr.kernel.fake.log import FakeLog


class FakeSysctl:
    def __init__(self, log: FakeLog) -> None:
        self.log = log
        self.writes = 0
        self.values: dict[str, str] = {}  # key -> value; tests put the keys a host has

    def read(self, key: str) -> str | None:
        return self.values.get(key)

    def write(self, key: str, value: str) -> None:
        if key not in self.values:
            raise KernelError(f"sysctl {key}: No such file or directory")
        self.log.write(f"sysctl {key}={value}")
        self.writes += 1
        self.values[key] = value
